"""Low-VRAM options: fp8 storage of frozen weights (upcast for compute) and stage offloading; host
to GPU copies that do not wait for the GPU (``to_device``)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


class Fp8Linear(nn.Module):
    """A frozen Linear whose weight is stored in float8 (e4m3) with one fp32 scale per output row,
    and upcast to the activation dtype for the matmul: half the memory of bf16 storage."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / _FP8_MAX).clamp_min(1e-12)
        self.register_buffer("weight_fp8", (w / scale).to(FP8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fp8.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def store_linears_fp8(module: nn.Module) -> int:
    """Replace every nn.Linear inside ``module`` (frozen weights) by :class:`Fp8Linear`; returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Fp8Linear(child))
            count += 1
        else:
            count += store_linears_fp8(child)
    return count


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, enabled: bool):
    """Move ``module`` to ``device`` for the block, back to the CPU after it (when ``enabled``)."""
    if not enabled:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> ``device`` without making the host wait for the GPU: a pageable copy to CUDA
    first waits for the stream, a pinned one with ``non_blocking`` does not."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
