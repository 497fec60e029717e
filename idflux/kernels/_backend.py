"""Backend choice shared by the three ops: ``"auto" | "triton" | "torch"``.

``auto`` takes Triton for CUDA tensors and the PyTorch reference otherwise. ``triton`` with CPU
tensors runs the kernels under Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before* :mod:`idflux.kernels` is imported (``triton.jit`` reads it when a
kernel is defined); without it the call raises instead of silently taking another path.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")

# Read once, at import: kernels defined afterwards are interpreted or compiled for good.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launch configs ask on every call)."""
    n = _SM_COUNT.get(device.index)  # tensors' devices carry their index
    if n is None:
        n = _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def triton_usable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for ``op`` on ``device``; raise a clear error otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package; install it or use backend='torch'")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if INTERPRET:
            return "triton"
        raise RuntimeError(
            f"{op}: backend='triton' with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing idflux.kernels, move the tensors to CUDA, or use backend='torch'"
        )
    raise RuntimeError(f"{op}: no Triton kernel for device {device}; use backend='torch'")


def check_interpreter_dtype(op: str, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ValueError where Triton's interpreter would return wrong values: bf16 tensors on the CPU.

    The interpreter runs a kernel's arithmetic in numpy, which has no bfloat16: bf16 loads, dots
    and stores come out wrong (not merely imprecise). fp32 and fp16 are exact there; compiled
    kernels on CUDA handle bf16. Call it on the path that is about to launch a kernel
    (``resolve_backend`` returned ``"triton"``)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and INTERPRET:
        raise ValueError(
            f"{op}: backend='triton' on CPU tensors runs Triton's interpreter, which computes bf16 wrongly "
            "(numpy has no bfloat16); pass fp32 or fp16 tensors there, use backend='torch' (or 'auto') for bf16 "
            "on the CPU, or move the tensors to CUDA")


def backend_report() -> dict[str, str]:
    """Which implementation ``backend='auto'`` takes for each op, for CPU and CUDA tensors."""
    cuda = torch.cuda.is_available()
    rows = {}
    for op in ("region_attention", "cosine_infonce", "face_warp"):
        on_cuda = "triton" if (cuda and HAS_TRITON) else ("n/a (no CUDA device)" if not cuda else "torch")
        cpu_triton = "triton (interpreter)" if (HAS_TRITON and INTERPRET) else "needs TRITON_INTERPRET=1"
        rows[op] = f"cpu tensors: torch reference (backend='triton': {cpu_triton}); cuda tensors: {on_cuda}"
    return rows
