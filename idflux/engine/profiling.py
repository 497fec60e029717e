"""Named ranges around kernels, adapter blocks and pipeline stages, and torch.profiler sessions.

``nvtx_range(name)`` is a no-op context unless ranges were switched on (``enable_ranges(True)``;
``idflux profile``, ``idflux generate/train --profile DIR`` and ``idflux bench --profile DIR`` do
it), so hot loops pay one flag check and nothing else. When on, each range is a
``torch.profiler.record_function`` (it shows in a torch.profiler trace, on the CPU too) and, on a
CUDA machine, an NVTX range (Nsight Systems timelines).

:func:`profile_session` runs a block under ``torch.profiler`` with the ranges on and writes a Chrome
trace (``<name>_trace.json``: Perfetto, chrome://tracing) and a short text table of the top kernels
by device time (CPU time where there is no CUDA) (``<name>_top.txt``).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

_ENABLED = False
_NVTX = False


def enable_ranges(on: bool = True) -> None:
    """Switch the named ranges on or off (record_function everywhere, NVTX where CUDA is present)."""
    global _ENABLED, _NVTX
    _ENABLED = bool(on)
    _NVTX = bool(on) and torch.cuda.is_available()


def enable_nvtx(on: bool = True) -> None:
    """Former name of :func:`enable_ranges` (kept for callers of the earlier API)."""
    enable_ranges(on)


def ranges_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def _range(name: str):
    with torch.profiler.record_function(name):
        if _NVTX:
            torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield


_NULL = contextlib.nullcontext()


def nvtx_range(name: str):
    """Context manager marking ``name`` in torch.profiler traces and Nsight timelines when ranges are on."""
    return _range(name) if _ENABLED else _NULL


def _device_time(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, attr, None)
        if value:
            return float(value)
    return 0.0


def top_table(prof, *, device: bool, n: int = 15) -> str:
    """The ``n`` events with the most self time: device (CUDA kernel) time when ``device``, else
    CPU time; one line each: total ms, calls, share, name."""
    events = [e for e in prof.key_averages() if e.key]
    key = _device_time if device else (lambda e: float(e.self_cpu_time_total))
    events = [e for e in events if key(e) > 0]
    events.sort(key=key, reverse=True)
    total = sum(key(e) for e in events) or 1.0
    what = "device (CUDA) self time" if device else "CPU self time"
    lines = [f"# top {min(n, len(events))} by {what}; total {total / 1e3:.3f} ms",
             f"{'ms':>10} {'calls':>7} {'share':>6}  name"]
    for e in events[:n]:
        lines.append(f"{key(e) / 1e3:10.3f} {e.count:7d} {100 * key(e) / total:5.1f}%  {e.key}")
    return "\n".join(lines) + "\n"


class ProfileResult:
    """What :func:`profile_session` wrote: ``trace`` (Chrome JSON) and ``table`` (text) paths, and
    the table's text."""

    def __init__(self):
        self.trace: Path | None = None
        self.table_path: Path | None = None
        self.table: str = ""
        self.profiler = None


@contextlib.contextmanager
def profile_session(out_dir, name: str, *, cuda: bool | None = None, top: int = 15, record_shapes: bool = False):
    """Run the block under torch.profiler (CPU, and CUDA when ``cuda`` or a GPU is present) with the
    named ranges on; on exit write ``<out_dir>/<name>_trace.json`` and ``<out_dir>/<name>_top.txt``.
    Yields a :class:`ProfileResult`, filled in on exit (also when the block raised)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    result = ProfileResult()
    was = _ENABLED
    enable_ranges(True)
    try:
        with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as prof:
            yield result
            if cuda:
                torch.cuda.synchronize()
    finally:
        enable_ranges(was)
        if "prof" in locals():
            result.profiler = prof
            result.trace = out / f"{name}_trace.json"
            prof.export_chrome_trace(str(result.trace))
            result.table = top_table(prof, device=cuda, n=top)
            result.table_path = out / f"{name}_top.txt"
            result.table_path.write_text(result.table)


def trace_names(path) -> set[str]:
    """The event names in a Chrome trace file (what Perfetto shows): for checks and tests."""
    doc = json.loads(Path(path).read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    return {e.get("name", "") for e in events if isinstance(e, dict)}


def run_profiled(fn, args, name: str) -> int:
    """``fn(args)`` (a CLI command) under :func:`profile_session` into ``args.profile``; the trace and
    the top-kernels table are written when it returns, and their paths printed."""
    inner = copy.copy(args)
    inner.profile = None
    with profile_session(args.profile, name) as result:
        code = fn(inner)
    print(result.table, end="")
    print(f"wrote {result.trace} (open in https://ui.perfetto.dev or chrome://tracing) and {result.table_path}")
    return code
