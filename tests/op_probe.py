"""Count what a call costs the host on a GPU, measured on the CPU: ``host_ops(fn)``.

Each aten op a Python-side path dispatches is, on CUDA, a kernel launch or an allocation with its
own host overhead (several microseconds each), and each Triton launch is one more. At the sizes the
identity adapter runs (tens of microseconds of kernel time per call) these dominate, so the tests
pin the counts of the hot paths: a change that adds a host-side op shows up as a failing count.

Ops issued inside Triton's interpreter (the CPU stand-in for a launch: it copies the arguments
through aten ops) are not counted; the launch itself is counted once, as ``triton:<kernel>``.
View and metadata ops (``view``, ``as_strided``, ``t``, ``detach``, ``alias``...) launch nothing
and are not counted either.
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

from sync_probe import _in_interpreter

# Ops that only make a new tensor header over the same storage (no launch, no allocation).
_METADATA = {
    "view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "detach", "alias", "select", "slice",
    "unsqueeze", "squeeze", "reshape", "_reshape_alias", "split", "split_with_sizes", "unbind", "narrow", "view_as",
    "unflatten", "flatten", "lift_fresh", "_to_copy_noop", "diagonal", "expand_as", "chunk", "movedim", "unfold",
}


class HostOpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _METADATA and not _in_interpreter():
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def host_ops(fn, *args, **kwargs) -> collections.Counter:
    """aten ops (metadata ops excluded) and Triton launches (``triton:<name>``) of ``fn(*args)``."""
    from triton.runtime.interpreter import GridExecutor

    counter = HostOpCounter()
    original = GridExecutor.__call__

    def launch(self, *a, **k):
        counter.ops[f"triton:{self.fn.__name__}"] += 1
        return original(self, *a, **k)

    GridExecutor.__call__ = launch
    try:
        with counter:
            fn(*args, **kwargs)
    finally:
        GridExecutor.__call__ = original
    return counter.ops
