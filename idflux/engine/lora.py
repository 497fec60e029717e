"""LoRA on the FLUX backbone, the way diffusers loads it, fp8 storage included.

A LoRA file (safetensors only: nothing from a file executes) is read here and handed to diffusers'
``FluxLoraLoaderMixin.lora_state_dict``, which accepts the diffusers/peft naming
(``transformer.<module>.lora_A.weight``/``lora_B``, with optional ``.alpha``) and converts the
kohya/sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``), XLabs and BFL
layouts; the adapter is then injected with peft (``FluxTransformer2DModel.load_lora_adapter``).
Each LoRA is a named peft adapter: several can be loaded, scaled (:func:`set_lora_scale`) and
removed (:func:`unload_lora`).

fp8: :class:`idflux.engine.lowvram.Fp8Linear` is an ``nn.Linear`` to peft, so the LoRA layer wraps
the fp8 Linear: ``y = fp8_linear(x) + scale * B(A(x))``. The fp8 weights are never rewritten (no
re-quantization and no rounding of the delta into e4m3), the LoRA matrices stay in the model's
dtype, and unloading gives back the exact fp8 model. Merging (``fuse_lora``) is not supported on
fp8 Linears for that reason.

Example::

    name = load_lora(pipe.parts.transformer, "style.safetensors", scale=0.8)
    set_lora_scale(pipe.parts.transformer, 0.5, name)
    unload_lora(pipe.parts.transformer)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def lora_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict in diffusers naming, network alphas or None) of a LoRA safetensors file.
    Raises FileNotFoundError / ValueError naming the file; text-encoder entries are dropped."""
    from diffusers.loaders import FluxLoraLoaderMixin
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found (a .safetensors LoRA for FLUX.1-dev; pass it as --lora FILE[:scale])")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file {path}: only .safetensors is read (pickled .bin/.pt files could execute code)")
    raw = load_file(str(path))
    if not raw:
        raise ValueError(f"LoRA file {path} holds no tensors")
    state, alphas = FluxLoraLoaderMixin.lora_state_dict(raw, return_alphas=True)
    state = {k: v for k, v in state.items() if k.startswith("transformer.")}
    if alphas:
        alphas = {k: v for k, v in alphas.items() if k.startswith("transformer.")} or None
    if not state:
        raise ValueError(f"LoRA file {path} has no FLUX transformer LoRA weights (expected diffusers/peft keys "
                         "transformer.<module>.lora_A.weight or kohya keys lora_unet_<block>.lora_down.weight)")
    return state, alphas


def lora_names(transformer) -> list[str]:
    """Names of the LoRA adapters loaded into ``transformer`` (in load order)."""
    return list(getattr(transformer, "peft_config", {}) or {})


def _check_scale(scale) -> float:
    scale = float(scale)
    if not torch.isfinite(torch.tensor(scale)):
        raise ValueError(f"LoRA scale must be a finite number, got {scale}")
    return scale


def load_lora(transformer, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Load a LoRA file into the FLUX ``transformer`` (a diffusers ``FluxTransformer2DModel``, fp8
    Linears allowed) as peft adapter ``adapter_name`` (default ``lora<n>``) at ``scale``; every
    loaded adapter stays active. Returns the adapter's name.

    The effective weight of a targeted Linear is ``W + scale * (alpha / rank) * B @ A`` (kohya files
    have alpha folded into A and B by diffusers' conversion).
    """
    scale = _check_scale(scale)
    names = lora_names(transformer)
    if adapter_name is None:
        adapter_name = f"lora{len(names)}"
        while adapter_name in names:
            adapter_name += "_"
    elif adapter_name in names:
        raise ValueError(f"load_lora: an adapter named {adapter_name!r} is already loaded ({names}); pick another name "
                         "or unload_lora first")
    state, alphas = lora_state_dict(path)
    from diffusers.loaders import FluxLoraLoaderMixin

    FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                                   adapter_name=adapter_name)
    if adapter_name not in lora_names(transformer):
        raise ValueError(f"LoRA file {path} matched no module of the transformer (is it a LoRA for FLUX?)")
    set_lora_scale(transformer, scale, adapter_name)
    return adapter_name


def set_lora_scale(transformer, scale: float, adapter_name: str | None = None) -> None:
    """Set the scale of one loaded adapter (default: every one); scale 0 gives the backbone's output exactly."""
    scale = _check_scale(scale)
    names = lora_names(transformer)
    if not names:
        raise ValueError("set_lora_scale: no LoRA is loaded")
    if adapter_name is not None and adapter_name not in names:
        raise ValueError(f"set_lora_scale: no adapter named {adapter_name!r}; loaded: {names}")
    scales = getattr(transformer, "_idflux_lora_scales", {})
    for name in names:
        if adapter_name is None or name == adapter_name:
            scales[name] = scale
    transformer._idflux_lora_scales = scales
    transformer.set_adapters(names, [scales.get(n, 1.0) for n in names])


def unload_lora(transformer) -> None:
    """Remove every LoRA adapter, giving back the original modules (fp8 Linears untouched)."""
    if lora_names(transformer):
        transformer.unload_lora()
    transformer._idflux_lora_scales = {}
