"""NVTX ranges around blocks, the adapter and kernel calls: free when profiling is off.

``nvtx_range(name)`` is a no-op context unless profiling was switched on (``enable_nvtx(True)``,
done by ``idflux bench --profile DIR``), so hot loops pay one flag check and nothing else.
"""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False


def enable_nvtx(on: bool = True) -> None:
    global _ENABLED
    _ENABLED = bool(on) and torch.cuda.is_available()


@contextlib.contextmanager
def _nvtx(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


_NULL = contextlib.nullcontext()


def nvtx_range(name: str):
    """Context manager marking ``name`` in Nsight Systems timelines when profiling is on."""
    return _nvtx(name) if _ENABLED else _NULL
