"""Low-VRAM options: fp8 storage of frozen weights (upcast for compute), stage offloading, diffusers
group offload, and the peak memory a run reached; host to GPU copies that do not wait for the GPU
(``to_device``).

The peak is what ``generate`` reports: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
resident-set high-water mark (``resource.getrusage``) on the CPU. :func:`track_peak` resets the
mark where it can (CUDA always; Linux's ``/proc/self/clear_refs`` on the CPU) and measures a block.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (float8_e4m3fn weight, (out, 1) fp32 scale), one scale per output row
    (row amax maps to e4m3's largest value 448): ``w ~= q.float() * scale``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / _FP8_MAX).clamp_min(1e-12)
    return (w / scale).to(FP8), scale


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is stored in float8 (e4m3) with one fp32 scale per output row,
    and upcast to the activation dtype for the matmul: half the memory of bf16 storage.

    The fp8 bytes live in a uint8 buffer (``weight_u8``; ``weight_fp8`` is its float8 view), so a
    ``module.to(dtype)`` on the whole model never upcasts them. It subclasses ``nn.Linear`` (without
    a weight parameter; ``weight`` is the dequantized matrix, computed on access) so peft's LoRA
    layers wrap it as they wrap a Linear: see :mod:`idflux.engine.lora`.
    """

    def __init__(self, linear: nn.Linear | None = None, *, weight_fp8: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        """From a Linear (quantized with :func:`quantize_fp8`) or from stored parts: ``weight_fp8``
        (out, in) float8_e4m3fn, ``scale`` (out, 1) (or a scalar: one scale for the tensor), ``bias``."""
        nn.Module.__init__(self)
        if linear is not None:
            weight_fp8, scale = quantize_fp8(linear.weight)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        if weight_fp8 is None or weight_fp8.dtype != FP8 or weight_fp8.dim() != 2:
            raise ValueError(f"Fp8Linear: weight_fp8 must be a 2-D {FP8} tensor, got "
                             f"{None if weight_fp8 is None else (weight_fp8.dtype, tuple(weight_fp8.shape))}")
        out_features, in_features = weight_fp8.shape
        scale = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32, device=weight_fp8.device)
        self.register_buffer("weight_u8", weight_fp8.view(torch.uint8))
        self.register_buffer("scale", scale.float().reshape(-1, 1).expand(out_features, 1).contiguous())
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = in_features, out_features

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_u8.view(FP8)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in) in the scale's dtype (a new tensor on every access)."""
        return self.weight_fp8.to(self.scale.dtype) * self.scale

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fp8.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def store_linears_fp8(module: nn.Module) -> int:
    """Replace every nn.Linear inside ``module`` (frozen weights) by :class:`Fp8Linear`; returns the count.

    Run it on the CPU (or the meta device) before moving the module to the GPU: converting on the
    GPU needs the full-precision weights there first, which is the peak fp8 is meant to avoid.
    Linears already stored in fp8 are left as they are (calling it twice converts nothing).
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, Fp8Linear):
            setattr(module, name, Fp8Linear(child))
            count += 1
        else:
            count += store_linears_fp8(child)
    return count


def fp8_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` as stored (fp8 weights count one byte each)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def enable_group_offload(module: nn.Module, device, *, blocks_per_group: int = 1, use_stream: bool = True) -> bool:
    """Keep ``module`` (a diffusers model) on the CPU and move one group of blocks at a time to
    ``device`` for its forward (diffusers' group offloading, ``ModelMixin.enable_group_offload``;
    with ``use_stream`` on CUDA the next group is copied while the current one runs). Returns False
    (and changes nothing) where the module does not offer it."""
    if not hasattr(module, "enable_group_offload"):
        return False
    device = torch.device(device)
    stream = use_stream and device.type == "cuda"
    module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                num_blocks_per_group=blocks_per_group, use_stream=stream)
    return True


def _rss_high_water_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _reset_rss_high_water() -> bool:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets the resident-set high-water mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _rss_now_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm_bytes() -> int | None:
    """VmHWM from /proc/self/status (the high-water mark clear_refs resets; getrusage may not follow)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory(device) -> dict:
    """The peak memory so far, as a JSON-ready dict: ``{"device": "cuda:0", "kind":
    "cuda_max_allocated", "bytes": n, "gib": x}`` on CUDA (``torch.cuda.max_memory_allocated``),
    ``{"device": "cpu", "kind": "rss_high_water", ...}`` on the CPU (the process's resident set,
    VmHWM where Linux reports it, else ``getrusage``'s ru_maxrss)."""
    device = torch.device(device)
    if device.type == "cuda":
        n, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        hwm = _vm_hwm_bytes()
        n, kind = (hwm if hwm is not None else _rss_high_water_bytes()), "rss_high_water"
    return {"device": str(device), "kind": kind, "bytes": int(n), "gib": round(n / 2**30, 3)}


@dataclass
class PeakMemory:
    """What :func:`track_peak` measured: ``peak`` (dict of :func:`peak_memory` at the end of the block),
    ``start_bytes`` (memory in use when the block began) and ``reset`` (whether the high-water mark
    could be reset at the start; if not, a CPU peak may predate the block)."""

    device: str
    start_bytes: int | None = None
    reset: bool = False
    peak: dict | None = None

    def as_dict(self) -> dict:
        return {**(self.peak or {}), "start_bytes": self.start_bytes, "reset": self.reset}


@contextlib.contextmanager
def track_peak(device):
    """Measure the peak memory of a block: ``with track_peak("cuda") as m: ...``; then ``m.peak``
    (and ``m.as_dict()`` for a JSON sidecar). CUDA: ``reset_peak_memory_stats`` first; CPU (Linux):
    the RSS high-water mark is reset through ``/proc/self/clear_refs``."""
    device = torch.device(device)
    m = PeakMemory(str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        m.start_bytes, m.reset = torch.cuda.memory_allocated(device), True
    else:
        m.reset = _reset_rss_high_water()
        m.start_bytes = _rss_now_bytes()
    try:
        yield m
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        m.peak = peak_memory(device)


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
