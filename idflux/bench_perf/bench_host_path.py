"""Host time of a region_attention call with the kernel launches stubbed out (``python -m
idflux.bench_perf.bench_host_path``).

At the engine's sizes a kernel takes microseconds, so the Python between the call and the launch
(input checks, the layout-cache lookup, autograd, allocations, argument marshalling) is a large
part of an eager call. This module times exactly that part on any machine: CPU tensors (tiny, so
allocation costs nothing), the Triton backend selected as if compiled, and every
``kernel[grid](...)`` replaced by a stub that returns at once. What remains is the host path a
CUDA call pays on top of its launches (a launch itself costs a few microseconds more on a GPU).

Rows: median and 20/80 percentiles of ``torch.utils.benchmark.Timer.blocked_autorange`` with
the calling thread's CPU time as its clock (``time.thread_time``: on a shared machine the wall
clock also counts time spent waiting for a core), one thread, each after the layout's first call (checked and planned once, as every module and
denoising step after the first sees it):
  packed_fwd_nograd   region_attention_packed under no_grad (generation: the engine's call)
  packed_fwd          the same with inputs that need a gradient (autograd records the call)
  dense_fwd           region_attention, dense form, inputs that need a gradient
  packed_fwd+bwd      forward and backward through autograd
  custom_op_fwd       the torch.library custom op (the torch.compile path) called directly
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import types

import torch

ROWS = ("packed_fwd_nograd", "packed_fwd", "dense_fwd", "packed_fwd+bwd", "custom_op_fwd")


class _StubKernel:
    """``kernel[grid](*args, **meta)`` that launches nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


@contextlib.contextmanager
def stubbed_launches():
    """region_attention with its Triton backend on CPU tensors and every launch a no-op."""
    from idflux.kernels import _backend

    ra = importlib.import_module("idflux.kernels.region_attention")
    names = ("_region_attention_fwd", "_region_attention_bwd", "_region_attention_bwd_dkdv")
    stub = types.SimpleNamespace(LOG2E=1.4426950408889634, **{n: _StubKernel() for n in names})
    saved = (_backend.INTERPRET, ra._KERNELS)
    _backend.INTERPRET, ra._KERNELS = True, stub
    try:
        yield ra
    finally:
        _backend.INTERPRET, ra._KERNELS = saved


def _layout(B=1, Nq=64, R=4, per_ref=8, H=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mem = torch.randint(0, 2 ** R, (B, Nq), generator=gen)
    offs = (torch.arange(R + 1) * per_ref).expand(B, -1).contiguous()
    q = torch.randn(B, H, Nq, D, generator=gen, requires_grad=True)
    k = torch.randn(B, H, R * per_ref, D, generator=gen, requires_grad=True)
    v = torch.randn(B, H, R * per_ref, D, generator=gen, requires_grad=True)
    b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
    qp = q.detach()[b_idx, :, t_idx].clone().requires_grad_()
    return q, k, v, mem, offs, qp, mem[b_idx, t_idx].contiguous(), b_idx.contiguous()


def measure(min_run_time: float = 1.0) -> dict[str, dict[str, float]]:
    """Host microseconds per call of each row (median, p20, p80)."""
    import time

    from torch.utils.benchmark import Timer

    from idflux.kernels import region_attention, region_attention_packed

    q, k, v, mem, offs, qp, pm, b_idx = _layout()
    results = {}
    torch.set_num_threads(1)
    with stubbed_launches() as ra:
        packed = lambda: region_attention_packed(qp, k, v, pm, b_idx, offs, backend="triton")  # noqa: E731
        dense = lambda: region_attention(q, k, v, mem, offs, backend="triton")  # noqa: E731
        grad = torch.ones(qp.shape)

        def packed_nograd():
            with torch.no_grad():
                return packed()

        def fwd_bwd():
            packed().backward(grad)

        entry = ra._check_packed(qp, k, v, pm, b_idx, offs, None)
        plan, _ = ra._plan_for(entry, pm, b_idx, k.shape[0], offs)
        pm32 = pm.to(torch.int32)
        op = lambda: ra._fwd_op(qp, k, v, pm32, offs, *plan, 0.25)  # noqa: E731
        fns = {"packed_fwd_nograd": packed_nograd, "packed_fwd": packed, "dense_fwd": dense,
               "packed_fwd+bwd": fwd_bwd, "custom_op_fwd": op}
        for name in ROWS:
            fns[name]()  # the layout's first call: checked, planned, cached
            m = Timer(stmt="fn()", globals={"fn": fns[name]}, num_threads=1, timer=time.thread_time).blocked_autorange(min_run_time=min_run_time)
            times = sorted(m.times)
            pick = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e6  # noqa: E731
            results[name] = {"us": m.median * 1e6, "p20": pick(0.2), "p80": pick(0.8)}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per row (Timer.blocked_autorange)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    res = measure(args.min_run_time)
    print(f"# region_attention host path, launches stubbed; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 1 thread, thread CPU time")
    for name, r in res.items():
        print(f"{name:<20} {r['us']:8.1f} us  (p20 {r['p20']:.1f}, p80 {r['p80']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
