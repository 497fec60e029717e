"""region_attention's repeat-call path: a call whose signature (layout tensors and their versions,
q/k/v shapes, strides, dtypes, devices, scale, backend) matches an earlier checked call skips the
checks and the launch arithmetic; anything that differs goes through them again. Also the
torch.library op's registrations (dispatch, autograd, no double backward) and inference-mode
layouts."""

import importlib

import pytest
import torch

from idflux.kernels import region_attention, region_attention_packed
from idflux.kernels._backend import INTERPRET

CUDA = torch.cuda.is_available()
KDEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRET), reason="no CUDA device and TRITON_INTERPRET is off")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]

ra = importlib.import_module("idflux.kernels.region_attention")


def case(B=2, H=2, Nq=40, D=16, R=3, per_ref=5, seed=0, device=KDEV, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mem = torch.randint(0, 2 ** R, (B, Nq), generator=gen)
    offs = (torch.arange(R + 1) * per_ref).expand(B, -1).contiguous()
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(dtype) for n in (Nq, R * per_ref, R * per_ref))
    return [t.to(device) for t in (q, k, v, mem, offs)]


def packed_of(q, mem):
    b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
    return q[b_idx, :, t_idx].contiguous(), mem[b_idx, t_idx].contiguous(), b_idx.contiguous()


def forbid_first_call_work(monkeypatch):
    """Every step a repeat call must skip raises when reached."""
    def boom(*a, **k):
        raise AssertionError("a repeat call ran the checks or the planning")

    for name in ("_check_inputs", "_check_packed", "_plan_for", "_groups_for", "_kernel_ready", "_check_layout_values"):
        monkeypatch.setattr(ra, name, boom)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_repeat_call_skips_checks_and_planning_and_matches_the_reference(monkeypatch, backend, packed):
    q, k, v, mem, offs = case()
    if packed:
        qp, pm, b_idx = packed_of(q, mem)
        call = lambda a, b, c: region_attention_packed(a, b, c, pm, b_idx, offs, backend=backend)  # noqa: E731
        want = ra.region_attention_packed_ref(qp.double(), k.double(), v.double(), pm, b_idx, offs, 0.25)
        q = qp
    else:
        call = lambda a, b, c: region_attention(a, b, c, mem, offs, backend=backend)  # noqa: E731
        want = ra.region_attention_ref(q.double(), k.double(), v.double(), mem, offs, 0.25)
    first = call(q, k, v)
    forbid_first_call_work(monkeypatch)
    again = call(q, k, v)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(again.double(), want, atol=2e-5, rtol=1e-4)
    # Gradients on the repeat path too (the backward's launches are kept per dO stride pattern).
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g = torch.randn_like(first)
    for _ in range(2):
        got = torch.autograd.grad(call(*leaves), leaves, g)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = (ra.region_attention_packed_ref(*ref_leaves, pm, b_idx, offs, 0.25) if packed
               else ra.region_attention_ref(*ref_leaves, mem, offs, 0.25))
    for name, a, b in zip("qkv", got, torch.autograd.grad(ref_out, ref_leaves, g.double())):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=f"d{name} on a repeat call")


@needs_triton
def test_repeat_call_launches_the_same_grids(launch_grids):
    grids = launch_grids
    q, k, v, mem, offs = case()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    region_attention(*leaves, mem, offs, backend="triton").sum().backward()
    first = list(grids)
    grids.clear()
    region_attention(*leaves, mem, offs, backend="triton").sum().backward()
    assert grids == first and len(first) >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_changed_signature_is_checked_again(backend):
    """Same layout, different k shape / strides / dtype / scale: each goes through the checks (a bad
    one is still a clear error) and each result matches the reference."""
    q, k, v, mem, offs = case()
    region_attention(q, k, v, mem, offs, backend=backend)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        region_attention(q, k[:, :, :-1], v, mem, offs, backend=backend)
    with pytest.raises(ValueError, match="membership must be"):
        region_attention(q[:, :, :-1], k, v, mem, offs, backend=backend)
    # Non-contiguous last dim (copied before the launch), other strides, another scale, fp16.
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    cases = [(qt, k, v, None), (q[:, :1], k[:, :1], v[:, :1], None), (q, k, v, 0.1)]
    if backend == "triton" or CUDA:
        cases.append((q.half(), k.half(), v.half(), None))
    for a, b, c, scale in cases:
        for _ in range(2):  # first call, then its repeat
            out = region_attention(a, b, c, mem, offs, scale=scale, backend=backend)
        want = ra.region_attention_ref(a.double(), b.double(), c.double(), mem, offs, scale or 0.25)
        tol = 2e-3 if a.dtype == torch.float16 else 2e-5
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
        assert out.dtype == a.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_made_under_inference_mode(backend):
    """Inference tensors have no version counter: such a layout is checked on every call (an
    in-place edit is still seen) instead of failing."""
    q, k, v, mem0, offs0 = case()
    want = region_attention(q, k, v, mem0, offs0, backend="torch")
    with torch.inference_mode():
        mem, offs = mem0.clone(), offs0.clone()
        for _ in range(2):
            torch.testing.assert_close(region_attention(q, k, v, mem, offs, backend=backend), want, atol=2e-5, rtol=1e-4)
        mem[0, 0] = 8  # bit 3, beyond R = 3
        with pytest.raises(ValueError, match="membership has bits beyond"):
            region_attention(q, k, v, mem, offs, backend=backend)


def test_the_repeat_cache_is_bounded():
    q, k, v, mem, offs = case(device="cpu")
    for i in range(ra._REPEAT_MAX + 10):
        region_attention(q, k, v, mem.clone(), offs, backend="torch")
    assert len(ra._REPEAT) <= ra._REPEAT_MAX


@needs_triton
def test_library_op_dispatch_autograd_and_no_double_backward():
    q, k, v, mem, offs = case()
    plan = ra._dense_plan(mem, offs.shape[1] - 1)[:4]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.idflux.region_attention_fwd(*leaves, mem, offs, *plan, 0.25)
    assert out.grad_fn is not None and not lse.requires_grad
    with torch.no_grad():
        out2, _ = torch.ops.idflux.region_attention_fwd(*leaves, mem, offs, *plan, 0.25)
    assert out2.grad_fn is None
    torch.testing.assert_close(out.detach(), out2)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = ra.region_attention_ref(*ref_leaves, mem, offs, 0.25)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, leaves, g, retain_graph=True),
                          torch.autograd.grad(want, ref_leaves, g.double())):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-4, msg=f"d{name} through the op")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out, leaves, g, create_graph=True)
    # The eager autograd path refuses a double backward as clearly.
    out = region_attention(*leaves, mem, offs, backend="triton")
    (dq,) = torch.autograd.grad(out, leaves[:1], g.clone().requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        dq.sum().backward()


def test_host_path_bench_measures_every_row_and_reaches_the_launches(monkeypatch):
    """bench_host_path's rows exist and each call reaches a (stubbed) launch; no timing asserted."""
    from idflux.bench_perf import bench_host_path as bh

    launched = []
    monkeypatch.setattr(bh._StubKernel, "_launch", staticmethod(lambda *a, **k: launched.append(len(a))))
    res = bh.measure(min_run_time=0.01)
    assert set(res) == set(bh.ROWS)
    assert all(r["us"] > 0 and r["p20"] <= r["p80"] for r in res.values())
    assert launched and min(launched) > 20  # every kernel argument passed


@needs_triton
def test_backend_availability_is_part_of_the_signature(monkeypatch):
    """A call that ran the kernels, repeated after triton became unusable, reports that instead of
    replaying the kept launch."""
    from idflux.kernels import _backend

    q, k, v, mem, offs = case()
    region_attention(q, k, v, mem, offs, backend="triton")
    monkeypatch.setattr(_backend, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton"):
        region_attention(q, k, v, mem, offs, backend="triton")
    if not CUDA:
        monkeypatch.setattr(_backend, "HAS_TRITON", True)
        monkeypatch.setattr(_backend, "INTERPRET", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            region_attention(q, k, v, mem, offs, backend="triton")


def test_host_path_bench_refuses_a_non_positive_run_time(capsys):
    from idflux.bench_perf import bench_host_path as bh

    with pytest.raises(SystemExit) as exc:
        bh.main(["--min-run-time", "0"])
    assert exc.value.code == 2 and "--min-run-time must be > 0" in capsys.readouterr().err
