"""Find device -> host synchronisations on CPU, where they cannot be timed: ``assert_no_host_sync(fn)``.

On CUDA a sync stalls the CPU until the GPU catches up and breaks CUDA-graph capture. On a CPU-only
machine nothing stalls, so this probe records the *operations* that would sync had the tensors been
on a GPU, while ``fn`` runs (forward and backward alike):

- aten ops seen by a ``TorchDispatchMode``: ``_local_scalar_dense`` (``.item()``, ``bool(t)``,
  ``int(t)``, ``float(t)``), ``is_nonzero``, ``equal``, ``nonzero`` (``torch.where(cond)``,
  ``argwhere``), the ``unique`` family, ``masked_select``, ``repeat_interleave`` without
  ``output_size``, ``bincount``, ``index``/``index_put`` with a boolean mask (a hidden nonzero), and
  copies between a CUDA device and another device (pageable copies wait for the stream);
- host reads that never reach the dispatcher on CPU tensors, so no mode sees them:
  ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.__array__`` are wrapped for the duration.

Every tensor is treated as if it lived on the GPU: an ``.item()`` on a deliberately CPU-side
tensor is reported too.

Triton's interpreter (``TRITON_INTERPRET=1``, the CPU stand-in for a kernel launch) copies the
launch arguments to host storages and back through aten ops and numpy; a compiled launch on CUDA
does nothing of the sort. Operations issued while a frame of ``triton/runtime/interpreter`` is on
the Python stack are therefore ignored. (In triton 3.9 those copies are ``empty``/``set_``/``copy_``
between CPU tensors plus ``data_ptr`` reads, none of them in the list above, so the exclusion is a
guard against other triton versions rather than something the current tests rely on.)
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "bincount",
    "unique_consecutive", "unique_dim", "unique_dim_consecutive", "_unique", "_unique2",
}
_HOST_READS = ("tolist", "numpy", "__array__")
_INTERPRETER = "triton/runtime/interpreter"
_HERE = os.path.abspath(__file__)


def _in_interpreter() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if _INTERPRETER in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


def _caller() -> str:
    """The innermost stack frame outside torch and this file: where the sync was asked for."""
    for fs in reversed(traceback.extract_stack()[:-1]):
        path = fs.filename.replace("\\", "/")
        if os.path.abspath(fs.filename) != _HERE and "/torch/" not in path and "<" not in path[:1]:
            return f"{os.path.relpath(fs.filename)}:{fs.lineno} ({fs.name})"
    return "?"


def _devices(*tensors) -> set[str]:
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def _syncs(func, args, kwargs) -> bool:
    """Whether ``func`` on ``args`` would make the host wait for a CUDA device."""
    name = func.overloadpacket.__name__
    if name in _ALWAYS or name.startswith("unique"):
        return True
    if name == "repeat_interleave":
        return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "copy_":
        devs = _devices(args[0], args[1])
        return "cuda" in devs and len(devs) > 1
    if name == "_to_copy":
        dst = kwargs.get("device")
        return dst is not None and "cuda" in {args[0].device.type, torch.device(dst).type} and args[0].device != torch.device(dst)
    return False


class HostSyncProbe(TorchDispatchMode):
    """Records the would-be syncs of everything run inside ``with HostSyncProbe() as probe:``.

    ``probe.found`` lists ``(op, where)`` pairs, ``where`` being the first frame outside torch.
    """

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self._saved: dict[str, object] = {}

    def _record(self, op: str) -> None:
        if not _in_interpreter():
            self.found.append((op, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self._record(str(func))
        return func(*args, **kwargs)

    def _wrap(self, name: str):
        original = getattr(torch.Tensor, name)
        probe = self

        def reads_to_host(tensor, *args, **kwargs):
            probe._record(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return reads_to_host

    def __enter__(self):
        for name in _HOST_READS:
            # Remember whether torch.Tensor defines it itself or inherits it from the C base class.
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._wrap(name))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, own in self._saved.items():
                if own is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, own)
            self._saved.clear()


def host_syncs(fn, *args, **kwargs) -> list[tuple[str, str]]:
    """Run ``fn(*args, **kwargs)`` under the probe; return the would-be syncs ``[(op, where), ...]``."""
    with HostSyncProbe() as probe:
        fn(*args, **kwargs)
    return probe.found


def assert_no_host_sync(fn, *args, **kwargs) -> None:
    """Fail, listing the ops and where they were issued, if ``fn(*args, **kwargs)`` would sync on CUDA."""
    found = host_syncs(fn, *args, **kwargs)
    assert not found, "host syncs: " + "; ".join(f"{op} at {where}" for op, where in found)
