"""FLUX backbone, identity adapter, regions, faces, sampling, the diffusers-style ``IDFluxPipeline``
and the generation CLI.

``IDFluxPipeline`` is imported on first use (it pulls in diffusers), so ``import idflux.engine``
stays light.
"""

__all__ = ["IDFluxPipeline", "IDFluxPipelineOutput"]


def __getattr__(name):
    if name in __all__:
        from idflux.engine import diffusers_pipeline

        return getattr(diffusers_pipeline, name)
    raise AttributeError(f"module 'idflux.engine' has no attribute {name!r}")
