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
clock also counts time spent waiting for a core), one thread, each after the call's first run
(the layout checked and planned, the launch parameters kept: what every module and denoising step
after the first sees):
  packed_fwd_nograd     region_attention_packed with inputs that need no gradient, grad mode off
                        (generation: the engine's call; the sampling loop runs under no_grad)
  dense_fwd_nograd      region_attention, the dense form, likewise
  packed_fwd            region_attention_packed with inputs that need a gradient (autograd records
                        the call: torch.autograd.Function.apply)
  packed_bwd            the backward's launcher alone (what the autograd node runs)
  packed_fwd+bwd        forward and torch.autograd.grad through the autograd engine
  custom_op_fwd_nograd  the torch.library op (the torch.compile path) called through the dispatcher
  custom_op_fwd         the same with inputs that need a gradient
and two floors that are PyTorch's own, for scale:
  floor_apply           Function.apply of a forward that only allocates its output
  floor_fwd+bwd         that Function's forward and torch.autograd.grad
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import types

import torch

ROWS = ("packed_fwd_nograd", "dense_fwd_nograd", "packed_fwd", "packed_bwd", "packed_fwd+bwd",
        "custom_op_fwd_nograd", "custom_op_fwd", "floor_apply", "floor_fwd+bwd")


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
    qd, kd, vd, qpd = (t.detach() for t in (q, k, v, qp))
    results = {}
    torch.set_num_threads(1)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            return torch.empty_like(a)

        @staticmethod
        def backward(ctx, g):
            return torch.empty_like(g), None, None

    with stubbed_launches() as ra:
        packed = lambda: region_attention_packed(qp, k, v, pm, b_idx, offs, backend="triton")  # noqa: E731
        grad = torch.ones(qp.shape)
        entry = ra._check_packed(qp, k, v, pm, b_idx, offs, None)
        plan, _ = ra._plan_for(entry, pm, b_idx, k.shape[0], offs)
        pm32 = pm.to(torch.int32)
        op = torch.ops.idflux.region_attention_fwd.default
        region_attention_packed(qpd, kd, vd, pm, b_idx, offs, backend="triton")
        launch = ra._REPEAT[ra._repeat_key(qpd, kd, vd, None, "triton", pm, b_idx, offs)].launch
        out, lse = launch(qpd, kd, vd)
        fns = {
            "packed_fwd_nograd": (lambda: region_attention_packed(qpd, kd, vd, pm, b_idx, offs, backend="triton"), False),
            "dense_fwd_nograd": (lambda: region_attention(qd, kd, vd, mem, offs, backend="triton"), False),
            "packed_fwd": (packed, True),
            "packed_bwd": (lambda: launch.backward(grad, qpd, kd, vd, out, lse), False),
            "packed_fwd+bwd": (lambda: torch.autograd.grad(packed(), (qp, k, v), grad), True),
            "custom_op_fwd_nograd": (lambda: op(qpd, kd, vd, pm32, offs, *plan, 0.25), False),
            "custom_op_fwd": (lambda: op(qp, k, v, pm32, offs, *plan, 0.25), True),
            "floor_apply": (lambda: Floor.apply(qp, k, v), True),
            "floor_fwd+bwd": (lambda: torch.autograd.grad(Floor.apply(qp, k, v), (qp,), grad), True),
        }
        for name in ROWS:
            fn, grad_mode = fns[name]
            with torch.set_grad_enabled(grad_mode):
                fn()  # the call's first run: checked, planned, kept
                m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=1,
                          timer=time.thread_time).blocked_autorange(min_run_time=min_run_time)
            times = sorted(m.times)
            pick = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e6  # noqa: E731
            results[name] = {"us": m.median * 1e6, "p20": pick(0.2), "p80": pick(0.8)}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per row (Timer.blocked_autorange)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if not args.min_run_time > 0:
        p.error(f"--min-run-time must be > 0 seconds, got {args.min_run_time}")
    from idflux.bench_perf.harness import cpu_name, git_commit, host_load

    res = measure(args.min_run_time)
    env = {"cpu": cpu_name(), "torch": torch.__version__, "commit": git_commit(), **host_load()}
    print(f"# region_attention host path, launches stubbed; {env['cpu']} ({env['cpus']} CPUs, load {env['load']}), "
          f"torch {env['torch']}, commit {env['commit']}, 1 thread, thread CPU time")
    for name, r in res.items():
        print(f"{name:<22} {r['us']:8.1f} us  (p20 {r['p20']:.1f}, p80 {r['p80']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
