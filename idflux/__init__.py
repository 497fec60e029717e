"""idflux: identity-consistent multi-person FLUX generation and training (the WithAnyone method).

The three hot paths live in :mod:`idflux.kernels` (``region_attention``, ``cosine_infonce``,
``face_warp``), each with a Triton kernel for CUDA and an exact PyTorch reference. Generation:
``from idflux import IDFluxPipeline`` (diffusers-style; imported on first use).
"""

__version__ = "0.1.0"
__all__ = ["IDFluxPipeline", "IDFluxPipelineOutput", "__version__"]


def __getattr__(name):
    if name in ("IDFluxPipeline", "IDFluxPipelineOutput"):
        from idflux.engine import diffusers_pipeline

        return getattr(diffusers_pipeline, name)
    raise AttributeError(f"module 'idflux' has no attribute {name!r}")
