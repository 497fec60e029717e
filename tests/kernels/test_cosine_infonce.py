"""cosine_infonce: reference vs F.cross_entropy on explicit logits (an oracle nobody here wrote),
gradients, float64 gradcheck, degenerate inputs, bad input, and the Triton kernel (interpreter on
CPU, compiled on CUDA) against the reference."""

import pytest
import torch
import torch.nn.functional as F

from idflux.kernels import _backend
from idflux.kernels.cosine_infonce import cosine_infonce
from idflux.kernels.cosine_infonce_ref import cosine_infonce_ref
from sync_probe import assert_no_host_sync, host_syncs

REDUCTIONS = ("mean", "sum", "none")
VARIANTS = ("shared", "index", "index_inbatch_ids", "shared_inbatch_ids", "inbatch_ids_only")
needs_interpreter = pytest.mark.skipif(not _backend.INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(N, D, M, variant, *, K=None, dtype=torch.float32, device="cpu", seed=0):
    """g near pos (moderate losses), a bank, and the keyword arguments of ``variant``.

    ids collide across rows (in-batch exclusion) and neg_ids hit the rows' ids (bank exclusion).
    """
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(N, D, generator=gen, dtype=torch.float64)
    g = pos + 1.5 * torch.randn(N, D, generator=gen, dtype=torch.float64)
    K = K or max(2 * M, 8)
    indexed = variant.startswith("index")
    bank = torch.randn(K if indexed else M, D, generator=gen, dtype=torch.float64)
    kw = {}
    if indexed:
        kw["neg_index"] = torch.randint(0, K, (N, M), generator=gen)
    if "inbatch" in variant:
        kw["in_batch"] = True
    if "ids" in variant:
        kw["ids"] = torch.randint(0, max(1, N // 2), (N,), generator=gen)
        if variant != "inbatch_ids_only":
            kw["neg_ids"] = torch.randint(0, max(1, N // 2) + 2, (bank.shape[0],), generator=gen)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return g.to(device, dtype), pos.to(device, dtype), bank.to(device, dtype), kw


def ce_oracle(g, pos, negatives, *, neg_index=None, tau=0.1, in_batch=False, ids=None, neg_ids=None, reduction="mean"):
    """F.normalize + explicit logits (class 0 = positive, excluded = -inf) + F.cross_entropy, float64."""
    u = F.normalize(g.double(), dim=-1, eps=1e-6)
    v = F.normalize(pos.double(), dim=-1, eps=1e-6)
    bank = F.normalize(negatives.double(), dim=-1, eps=1e-6)
    N = u.shape[0]
    rows = []
    for n in range(N):
        cand = bank if neg_index is None else bank[neg_index[n]]
        logit = [(u[n] * v[n]).sum(-1, keepdim=True), cand @ u[n]]
        if ids is not None and neg_ids is not None:
            cand_ids = neg_ids if neg_index is None else neg_ids[neg_index[n]]
            logit[1] = torch.where(cand_ids == ids[n], float("-inf"), logit[1])
        if in_batch:
            others = [m for m in range(N) if m != n and (ids is None or ids[m] != ids[n])]
            logit.append(v[others] @ u[n])
        rows.append(torch.cat(logit) / tau)
    width = max(r.numel() for r in rows)
    logits = torch.stack([F.pad(r, (0, width - r.numel()), value=float("-inf")) for r in rows])
    target = torch.zeros(N, dtype=torch.long, device=u.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def losses_and_grads(fn, g, pos, negatives, kw, reduction, w):
    """fn's loss and (dg, dpos) under the upstream gradient w (per row for "none", scalar otherwise)."""
    g = g.detach().clone().requires_grad_()
    pos = pos.detach().clone().requires_grad_()
    loss = fn(g, pos, negatives, reduction=reduction, **kw)
    dg, dpos = torch.autograd.grad(loss, [g, pos], w if reduction == "none" else w.sum())
    return loss.detach(), dg, dpos


def natural_scale(x, w, reduction, tau):
    """Size of the terms a gradient (x given) or the loss (x None) is a difference of.

    Logits are O(1/tau) and d/dx terms O(w_n / (tau ||x_n||)); when the loss is tiny they cancel
    (p_pos - 1 -> 0), so fp32 error is judged on this scale, not on the result's own size.
    """
    N = w.shape[0]
    row_w = {"none": w.abs(), "sum": w.sum().abs().expand(N), "mean": w.sum().abs().expand(N) / N}[reduction].double().cpu()
    if x is None:
        return (row_w.max() / tau).item() if reduction != "none" else 1.0 / tau
    return (row_w / (tau * x.double().cpu().norm(dim=1).clamp_min(1e-6))).max().item()


# N in {1, 3, 64}, D in {7, 64, 512}, M in {1, 100, 4096}, tau in {0.05, 0.1, 1.0}: every value
# appears with several others; gathered variants stay where the float64 oracle is cheap.
GRID = [
    (1, 7, 1, 0.05), (1, 512, 4096, 0.1), (3, 7, 100, 1.0), (3, 64, 1, 0.1), (3, 512, 100, 0.05),
    (64, 64, 100, 0.1), (64, 7, 4096, 1.0), (64, 512, 4096, 0.05),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("N,D,M,tau", GRID)
def test_reference_matches_cross_entropy(N, D, M, tau, variant):
    if variant.startswith("index") and N * M * D > 2_000_000:
        pytest.skip("gathered float64 oracle too large for a CPU test; shared bank covers this size")
    g, pos, bank, kw = make_case(N, D, M, variant)
    w = torch.randn(N, dtype=torch.float64)
    for reduction in REDUCTIONS:
        loss, dg, dpos = losses_and_grads(cosine_infonce_ref, g, pos, bank, {**kw, "tau": tau}, reduction, w.float())
        want, want_dg, want_dpos = losses_and_grads(ce_oracle, g.double(), pos.double(), bank, {**kw, "tau": tau}, reduction, w)
        assert loss.dtype == torch.float32, f"loss dtype {loss.dtype}"
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5, msg=f"loss ({reduction})")
        for name, got, want_grad, x in (("dg", dg, want_dg, g), ("dpos", dpos, want_dpos, pos)):
            scale = natural_scale(x, w, reduction, tau)
            torch.testing.assert_close(got.double(), want_grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{name} ({reduction})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_inputs_accumulate_in_fp32(dtype):
    g, pos, bank, kw = make_case(5, 64, 300, "index_inbatch_ids", dtype=dtype)
    w = torch.randn(5, dtype=torch.float64)
    loss, dg, dpos = losses_and_grads(cosine_infonce, g, pos, bank, {**kw, "backend": "torch"}, "none", w.float())
    want, want_dg, want_dpos = losses_and_grads(ce_oracle, g.double(), pos.double(), bank, kw, "none", w)
    assert loss.dtype == torch.float32 and dg.dtype == dtype and dpos.dtype == dtype
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5, msg="loss")  # same rounded inputs
    tol = 2e-3 if dtype == torch.float16 else 1e-2  # only the gradient's final cast to dtype
    torch.testing.assert_close(dg.double(), want_dg, rtol=tol, atol=tol * want_dg.abs().max().item(), msg="dg")
    torch.testing.assert_close(dpos.double(), want_dpos, rtol=tol, atol=tol * want_dpos.abs().max().item(), msg="dpos")


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_gradcheck_float64(variant):
    g, pos, bank, kw = make_case(4, 5, 6, variant, K=9, dtype=torch.float64)
    g.requires_grad_()
    pos.requires_grad_()
    for reduction in REDUCTIONS:
        fn = lambda a, b: cosine_infonce_ref(a, b, bank, tau=0.3, reduction=reduction, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (g, pos)), f"gradcheck g, pos ({variant}, {reduction})"


def test_auto_on_cpu_is_the_reference_and_negatives_get_no_gradient():
    g, pos, bank, kw = make_case(3, 16, 20, "index_inbatch_ids")
    bank.requires_grad_()
    g.requires_grad_()
    loss = cosine_infonce(g, pos, bank, **kw)
    assert torch.equal(loss, cosine_infonce_ref(g, pos, bank, **kw)), "loss (auto on CPU)"
    loss.backward()
    assert bank.grad is None, "negatives must receive no gradient"
    assert g.grad is not None and torch.isfinite(g.grad).all(), "dg"


# ---------------------------------------------------------------- degenerate inputs, both backends

BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_and_zero_vectors_give_no_nan(backend):
    D = 8
    v = torch.randn(D)
    g = torch.stack([v, torch.zeros(D), v, torch.zeros(D)])
    pos = torch.stack([v, v, torch.zeros(D), torch.zeros(D)])
    bank = torch.stack([v, v, torch.zeros(D), -v, 2 * v])
    for in_batch in (False, True):
        g_ = g.clone().requires_grad_()
        pos_ = pos.clone().requires_grad_()
        loss = cosine_infonce(g_, pos_, bank, tau=0.05, in_batch=in_batch, reduction="none", backend=backend)
        dg, dpos = torch.autograd.grad(loss.sum(), [g_, pos_])
        for name, t in (("loss", loss), ("dg", dg), ("dpos", dpos)):
            assert torch.isfinite(t).all(), f"{name} not finite (in_batch={in_batch}): {t}"
        # A zero query has cosine 0 with every candidate: loss = log(number of candidates).
        n_cand = 1 + bank.shape[0] + (3 if in_batch else 0)
        torch.testing.assert_close(loss[1], torch.tensor(n_cand, dtype=torch.float32).log(), msg="loss of a zero g")
        want = cosine_infonce_ref(g, pos, bank, tau=0.05, in_batch=in_batch, reduction="none")
        torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5, msg="loss vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_excluded_rows_have_zero_loss_and_gradient(backend):
    N, D, K, M = 4, 16, 12, 7
    g, pos, bank, _ = make_case(N, D, M, "index", K=K)
    ids = torch.tensor([0, 1, 2, 2])
    neg_ids = torch.full((K,), 5)
    neg_ids[:6] = 0  # row 0 draws only from entries 0..5: all of its own identity
    neg_index = torch.randint(0, K, (N, M))
    neg_index[0] = torch.randint(0, 6, (M,))
    cases = {
        "indexed, row 0 excluded": dict(neg_index=neg_index, ids=ids, neg_ids=neg_ids),
        "indexed + in-batch, row 0 excluded": dict(neg_index=neg_index, ids=torch.tensor([0, 0, 0, 0]), neg_ids=neg_ids, in_batch=True),
        "M = 0, no in-batch": dict(neg_index=torch.zeros(N, 0, dtype=torch.long)),
        "M = 0, in-batch, one identity": dict(neg_index=torch.zeros(N, 0, dtype=torch.long), in_batch=True, ids=torch.zeros(N, dtype=torch.long)),
    }
    for name, kw in cases.items():
        g_ = g.clone().requires_grad_()
        pos_ = pos.clone().requires_grad_()
        loss = cosine_infonce(g_, pos_, bank, reduction="none", backend=backend, **kw)
        dg, dpos = torch.autograd.grad(loss.sum(), [g_, pos_])
        assert loss[0].item() == 0.0, f"loss of the all-excluded row ({name}): {loss[0].item()}"
        assert torch.all(dg[0] == 0), f"dg of the all-excluded row ({name}): {dg[0]}"
        if name.startswith("M = 0"):
            assert torch.all(loss == 0) and torch.all(dg == 0) and torch.all(dpos == 0), f"loss/dg/dpos ({name})"
        if name == "indexed, row 0 excluded":
            assert torch.all(dpos[0] == 0), f"dpos of the all-excluded row ({name}): {dpos[0]}"
            assert torch.all(loss[1:] > 0), f"other rows keep their loss ({name})"
    # An empty shared bank.
    loss = cosine_infonce(g, pos, bank[:0], backend=backend)
    assert loss.item() == 0.0, "loss with an empty shared bank"


# ---------------------------------------------------------------------------------- bad input

def _bad_inputs():
    g, pos, bank, _ = make_case(3, 8, 10, "shared")
    idx = torch.zeros(3, 4, dtype=torch.long)
    ids = torch.zeros(3, dtype=torch.long)
    return [
        (dict(g=g[0]), "g"),
        (dict(g=torch.zeros(0, 8)), "g"),
        (dict(g=g.long()), "g"),
        (dict(g=[[1.0]]), "g"),
        (dict(pos=pos[:2]), "pos"),
        (dict(pos=pos.int()), "pos"),
        (dict(negatives=bank[:, :5]), "negatives"),
        (dict(negatives=bank[None]), "negatives"),
        (dict(negatives=bank.to(torch.int32)), "negatives"),
        (dict(neg_index=idx.float()), "neg_index"),
        (dict(neg_index=idx.bool()), "neg_index"),
        (dict(neg_index=idx[:2]), "neg_index"),
        (dict(neg_index=idx[0]), "neg_index"),
        (dict(neg_index=idx + 10), "neg_index"),
        (dict(neg_index=idx - 1), "neg_index"),
        (dict(ids=ids[:2]), "ids"),
        (dict(ids=ids.float()), "ids"),
        (dict(ids=ids, neg_ids=torch.zeros(9, dtype=torch.long)), "neg_ids"),
        (dict(ids=ids, neg_ids=torch.zeros(10)), "neg_ids"),
        (dict(neg_ids=torch.zeros(10, dtype=torch.long)), "neg_ids"),
        (dict(tau=0.0), "tau"),
        (dict(tau=-0.1), "tau"),
        (dict(tau=float("inf")), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(tau="0.1"), "tau"),
        (dict(reduction="avg"), "reduction"),
        (dict(in_batch=1), "in_batch"),
        (dict(backend="cuda"), "backend"),
        (dict(pos=pos.to("meta")), "pos"),
        (dict(check=1), "check"),
        (dict(check=None), "check"),
    ]


def _bad_call(i):
    """(positional args g/pos/negatives, the remaining bad keyword args, the argument's name) of case i."""
    g, pos, bank, _ = make_case(3, 8, 10, "shared")
    bad, name = _bad_inputs()[i]
    args = dict(g=g, pos=pos, negatives=bank)
    args.update({k: bad.pop(k) for k in list(bad) if k in args})
    return args, bad, name


@pytest.mark.parametrize("i", range(len(_bad_inputs())))
def test_bad_input_raises_value_error_naming_the_argument(i):
    args, bad, name = _bad_call(i)
    with pytest.raises(ValueError, match=rf"cosine_infonce: {name}\b"):
        cosine_infonce(args["g"], args["pos"], args["negatives"], **bad)


@pytest.mark.parametrize("i", range(len(_bad_inputs())))
def test_check_false_keeps_every_check_but_the_index_range(i):
    """check=False skips only the neg_index range check (the one that reads data back)."""
    args, bad, name = _bad_call(i)
    idx = bad.get("neg_index")
    values_only = isinstance(idx, torch.Tensor) and idx.dtype == torch.long and idx.shape == (3, 4)  # idx + 10, idx - 1
    if not values_only:
        bad.setdefault("check", False)
        with pytest.raises(ValueError, match=rf"cosine_infonce: {name}\b"):
            cosine_infonce(args["g"], args["pos"], args["negatives"], **bad)
    else:  # out-of-range values: excluded candidates, every negative here, so loss 0
        loss = cosine_infonce(args["g"], args["pos"], args["negatives"], check=False, **bad)
        assert loss.item() == 0.0, f"loss with every neg_index out of range: {loss.item()}"


# ------------------------------------------------------------------- Triton kernel vs reference

def _check_against_reference(g, pos, bank, kw, *, tau, rtol, atol, low_precision_of=None):
    """Kernel vs reference (fp32 on the same inputs), loss and both gradients, all reductions.

    With ``low_precision_of`` = the fp32 originals (g, pos, bank), the kernel's error against the fp32 truth must
    stay within 2x (loss) / 3x (gradients) of the reference's own error at the inputs' precision.
    """
    N = g.shape[0]
    w = torch.randn(N, device=g.device)
    for reduction in REDUCTIONS:
        got = losses_and_grads(cosine_infonce, g, pos, bank, {**kw, "tau": tau, "backend": "triton"}, reduction, w)
        ref = losses_and_grads(cosine_infonce, g, pos, bank, {**kw, "tau": tau, "backend": "torch"}, reduction, w)
        assert got[0].dtype == torch.float32 and got[1].dtype == g.dtype and got[2].dtype == pos.dtype, "dtypes"
        scales = [natural_scale(x, w, reduction, tau) for x in (None, g, pos)]
        if low_precision_of is None:
            for name, a, b, scale in zip(("loss", "dg", "dpos"), got, ref, scales):
                torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * scale, msg=f"{name} ({reduction})")
        else:
            truth = losses_and_grads(cosine_infonce, *low_precision_of, {**kw, "tau": tau, "backend": "torch"}, reduction, w)
            for name, a, b, t, k, scale in zip(("loss", "dg", "dpos"), got, ref, truth, (2, 3, 3), scales):
                err = (a.float() - t.float()).abs().max().item()
                ref_err = (b.float() - t.float()).abs().max().item()
                bound = k * ref_err + atol * scale
                assert err <= bound, f"{name} ({reduction}): kernel error {err:.3g} > {k}x reference error {ref_err:.3g}"


INTERP_CASES = [
    # N, D, M, tau, variant
    (1, 7, 1, 0.05, "shared"),
    (3, 16, 113, 0.1, "index"),
    (5, 33, 300, 0.1, "index_inbatch_ids"),
    (8, 64, 70, 1.0, "shared_inbatch_ids"),
    (4, 24, 130, 0.05, "inbatch_ids_only"),
    # a shared bank from 16 rows on: the row-tiled kernel (odd N, D and M; partial row tiles)
    (16, 32, 100, 0.1, "shared"),
    (21, 24, 70, 0.1, "shared_inbatch_ids"),
    (40, 64, 130, 0.05, "shared_inbatch"),
    (17, 7, 1, 1.0, "shared_ids"),
]


@needs_interpreter
@pytest.mark.parametrize("N,D,M,tau,variant", INTERP_CASES)
def test_triton_interpreter_matches_reference(N, D, M, tau, variant):
    g, pos, bank, kw = make_case(N, D, M, variant)
    _check_against_reference(g, pos, bank, kw, tau=tau, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_triton_interpreter_strided_inputs_and_int32_indices():
    """Transposed / sliced views and int32 ids: the kernel must use the strides it is given."""
    N, D, M, K = 4, 24, 50, 80
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(D, N, generator=gen).T  # stride (1, N)
    pos = torch.randn(N, 2 * D, generator=gen)[:, ::2]  # stride (2D, 2)
    bank = torch.randn(K, D + 5, generator=gen)[:, 3:D + 3]
    kw = dict(neg_index=torch.randint(0, K, (M, N), generator=gen, dtype=torch.int32).T, in_batch=True,
              ids=torch.tensor([1, 2, 1, 3], dtype=torch.int32), neg_ids=torch.randint(0, 4, (2 * K,), generator=gen)[::2])
    _check_against_reference(g, pos, bank, kw, tau=0.1, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_triton_interpreter_fp16_inputs():
    """fp16 loads are upcast in the kernel (bf16 only on CUDA: the interpreter mishandles it)."""
    g, pos, bank, kw = make_case(6, 40, 150, "index_inbatch_ids")
    _check_against_reference(g.half(), pos.half(), bank.half(), kw, tau=0.1, rtol=0, atol=1e-3, low_precision_of=(g, pos, bank))


@needs_interpreter
@pytest.mark.parametrize("wrt", ["g", "pos"])
@pytest.mark.parametrize("variant", ["index_inbatch_ids", "shared"])
def test_triton_interpreter_gradient_to_one_input_only(wrt, variant):
    """The backward launch computes only the gradient asked for; the other input gets none."""
    g, pos, bank, kw = make_case(5, 20, 40, variant)
    w = torch.randn(5)
    grads = []
    for backend in ("triton", "torch"):
        x = {"g": g.clone(), "pos": pos.clone()}
        x[wrt].requires_grad_()
        loss = cosine_infonce(x["g"], x["pos"], bank, reduction="none", backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, [x[wrt]], w)
        other = "pos" if wrt == "g" else "g"
        assert x[other].grad is None
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5, msg=f"d loss / d {wrt}")


@needs_interpreter
def test_triton_interpreter_in_batch_sum_spans_several_row_blocks(monkeypatch):
    """N larger than the backward's row block: the in-batch share of d/d pos sums over blocks."""
    import importlib

    C = importlib.import_module("idflux.kernels.cosine_infonce")  # the module (the package exports the function)
    monkeypatch.setattr(C, "_bwd_block_n", lambda D: 4)
    g, pos, bank, kw = make_case(11, 16, 30, "shared_inbatch_ids")
    _check_against_reference(g, pos, bank, kw, tau=0.1, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,M,variant", [
    (1, 7, 1, "shared"), (8, 512, 4097, "index"), (64, 512, 4096, "index_inbatch_ids"),
    (37, 1023, 1000, "shared_inbatch_ids"), (256, 128, 16385, "index"), (16, 1024, 300, "inbatch_ids_only"),
])
def test_triton_cuda_matches_reference(N, D, M, variant, dtype):
    g, pos, bank, kw = make_case(N, D, M, variant, device="cuda")
    if dtype == torch.float32:
        _check_against_reference(g, pos, bank, kw, tau=0.1, rtol=1e-4, atol=1e-4)
    else:
        _check_against_reference(g.to(dtype), pos.to(dtype), bank.to(dtype), kw, tau=0.1, rtol=0, atol=1e-3,
                                 low_precision_of=(g, pos, bank))


@needs_cuda
def test_triton_cuda_all_excluded_and_zero_rows():
    g, pos, bank, kw = make_case(6, 64, 500, "index_inbatch_ids", device="cuda")
    g[1] = 0
    kw["in_batch"] = False
    kw["ids"] = torch.tensor([0, 0, 0, 1, 1, 2], device="cuda")
    kw["neg_ids"] = torch.where(torch.arange(bank.shape[0], device="cuda") % 2 == 0, 2, 0)
    kw["neg_index"][5] = 2 * torch.randint(0, bank.shape[0] // 2, (500,), device="cuda")  # row 5: only id 2
    g = g.requires_grad_()
    loss = cosine_infonce(g, pos, bank, reduction="none", backend="triton", **kw)
    (dg,) = torch.autograd.grad(loss.sum(), [g])
    assert loss[5].item() == 0.0 and torch.all(dg[5] == 0), f"all-excluded row: loss {loss[5].item()}"
    assert torch.isfinite(loss).all() and torch.isfinite(dg).all(), "no NaN"
    want = cosine_infonce(g.detach(), pos, bank, reduction="none", backend="torch", **kw)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-4, msg="loss")


# ------------------------------------------------- check=False: no host sync, out-of-range indices

def _out_of_range_case(N=5, D=12, K=9, M=11, seed=7):
    """Indexed bank with in-batch negatives and id exclusion; some neg_index entries out of [0, K)
    (negative, K, huge), and the same problem with those entries pointing instead at an extra bank
    row K + n whose neg_id is row n's id (excluded by the id rule): the expected result."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, D, generator=gen)
    pos = g + torch.randn(N, D, generator=gen)
    bank = torch.randn(K + N, D, generator=gen)
    ids = torch.tensor([0, 1, 1, 2, 3])[:N]
    neg_ids = torch.randint(0, 6, (K + N,), generator=gen)
    neg_ids[K:] = ids
    neg_index = torch.randint(0, K, (N, M), generator=gen)
    bad = torch.zeros(N, M, dtype=torch.bool)
    bad[0, 1], bad[2, :4], bad[3, M - 1], bad[4, :] = True, True, True, True  # row 4: nothing left in the bank
    wild = torch.tensor([-1, K, 2**40, -(2**40)]).repeat(N * M)[: N * M].view(N, M)
    kw = dict(in_batch=True, ids=ids, tau=0.2)
    broken = dict(kw, neg_index=torch.where(bad, wild, neg_index), neg_ids=neg_ids[:K])
    expected = dict(kw, neg_index=torch.where(bad, K + torch.arange(N)[:, None], neg_index), neg_ids=neg_ids)
    return g, pos, bank, broken, expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_excludes_out_of_range_indices(backend):
    g, pos, bank, broken, expected = _out_of_range_case()
    w = torch.randn(g.shape[0])
    got = losses_and_grads(cosine_infonce, g, pos, bank[:9], {**broken, "backend": backend, "check": False}, "none", w)
    want = losses_and_grads(cosine_infonce_ref, g, pos, bank, expected, "none", w)
    for name, a, b in zip(("loss", "dg", "dpos"), got, want):
        assert torch.isfinite(a).all(), f"{name} not finite"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} with out-of-range neg_index ({backend})")
    with pytest.raises(ValueError, match="neg_index"):  # check=True (the default) still refuses them
        cosine_infonce(g, pos, bank[:9], backend=backend, **broken)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_empty_gallery_excludes_every_index(backend):
    g, pos, _, _, _ = _out_of_range_case()
    loss = cosine_infonce(g, pos, g.new_zeros(0, g.shape[1]), neg_index=torch.zeros(5, 3, dtype=torch.long),
                          reduction="none", backend=backend, check=False)
    assert torch.all(loss == 0), f"loss with K = 0: {loss}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["index_inbatch_ids", "shared_inbatch_ids"])
def test_check_false_never_syncs(backend, variant):
    g, pos, bank, kw = make_case(4, 8, 12, variant)
    g.requires_grad_()
    pos.requires_grad_()

    def step():
        loss = cosine_infonce(g, pos, bank, backend=backend, check=False, **kw)
        loss.backward()

    assert_no_host_sync(step)
    assert g.grad is not None and pos.grad is not None and torch.isfinite(g.grad).all(), "the probed step ran backward"
    found = host_syncs(lambda: cosine_infonce(g, pos, bank, backend=backend, **kw))
    if "neg_index" in kw:  # the probe's positive control: check=True reads neg_index back once
        assert [op for op, _ in found] == ["Tensor.tolist"] and "cosine_infonce.py" in found[0][1], f"check=True syncs: {found}"
    else:
        assert not found, f"no value to check without neg_index, yet: {found}"


@needs_cuda
def test_triton_cuda_check_false_out_of_range_and_never_syncs():
    """On the GPU, CUDA's own sync detector (set_sync_debug_mode) must stay silent too."""
    g, pos, bank, broken, expected = _out_of_range_case()
    cuda = lambda kw: {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}  # noqa: E731
    g, pos, bank, broken, expected = g.cuda().requires_grad_(), pos.cuda(), bank.cuda(), cuda(broken), cuda(expected)
    small = bank[:9]

    def step():
        loss = cosine_infonce(g, pos, small, backend="triton", check=False, reduction="none", **broken)
        return loss, torch.autograd.grad(loss.sum(), g)[0]

    step()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, dg = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_no_host_sync(step)
    want = cosine_infonce_ref(g, pos, bank, reduction="none", **expected)
    (want_dg,) = torch.autograd.grad(want.sum(), g)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4, msg="loss with out-of-range neg_index (CUDA)")
    torch.testing.assert_close(dg, want_dg, rtol=1e-4, atol=1e-4, msg="dg with out-of-range neg_index (CUDA)")


# ------------------------------------------------------------------- the sync probe itself

def test_sync_probe_sees_host_reads_and_ignores_the_triton_interpreter():
    x = torch.randn(6)
    cases = {
        "item": (lambda: x.sum().item(), "aten._local_scalar_dense.default"),
        "bool": (lambda: bool(x.sum() > 0), "aten._local_scalar_dense.default"),
        "tolist": (lambda: x.tolist(), "Tensor.tolist"),
        "numpy": (lambda: x.numpy(), "Tensor.numpy"),
        "boolean mask": (lambda: x[x > 0], "aten.index.Tensor"),
        "nonzero": (lambda: torch.where(x > 0), "aten.nonzero.default"),
        "unique": (lambda: torch.unique(x), "unique"),
        "repeat_interleave": (lambda: torch.repeat_interleave(torch.tensor([1, 2])), "aten.repeat_interleave.Tensor"),
        "equal": (lambda: torch.equal(x, x), "aten.equal.default"),
    }
    for name, (fn, op) in cases.items():
        found = [f for f, _ in host_syncs(fn)]
        assert found and op in found[0], f"{name}: probe found {found}, expected {op}"
    assert not host_syncs(lambda: torch.where(x > 0, x, 0.0).sum() * 2), "device-only ops reported as syncs"
    assert not host_syncs(lambda: torch.repeat_interleave(x, torch.tensor([1] * 6), output_size=6)), "sized repeat_interleave"
    # What Triton's interpreter does inside a launch (stand-in: code compiled under its file name) is ignored.
    inside = compile("x.sum().item(); x.tolist()", "/site-packages/triton/runtime/interpreter.py", "exec")
    assert not host_syncs(exec, inside, {"x": x}), "host reads inside the interpreter must be ignored"
    assert "tolist" not in torch.Tensor.__dict__ and torch.Tensor.__dict__["__array__"], "probe restores Tensor methods"


@needs_interpreter
@pytest.mark.parametrize("variant", ["shared", "shared_inbatch_ids"])
def test_row_tiled_shared_kernel_equals_the_per_row_kernel(monkeypatch, variant):
    import importlib

    ci = importlib.import_module("idflux.kernels.cosine_infonce")  # the module (the package exports the function)
    g, pos, bank, kw = make_case(19, 40, 90, variant, seed=4)
    w = torch.randn(19, dtype=torch.float64)
    tiled = losses_and_grads(cosine_infonce, g, pos, bank, {**kw, "backend": "triton"}, "none", w)
    monkeypatch.setattr(ci, "SHARED_TILE_MIN_ROWS", 10**9)
    per_row = losses_and_grads(cosine_infonce, g, pos, bank, {**kw, "backend": "triton"}, "none", w)
    for name, a, b in zip(("loss", "dg", "dpos"), tiled, per_row):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- non-finite and zero rows (issue 15)

def _loss_and_grads(g, pos, bank, kw, backend):
    g_ = g.clone().requires_grad_()
    pos_ = pos.clone().requires_grad_()
    loss = cosine_infonce(g_, pos_, bank, reduction="none", backend=backend, **kw)
    dg, dpos = torch.autograd.grad(loss.sum(), [g_, pos_])
    return loss.detach(), dg, dpos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,N", [("index", 5), ("index_inbatch_ids", 5), ("shared", 4), ("shared", 17),
                                       ("shared_inbatch_ids", 17)])
def test_nan_row_propagates_and_matches_the_reference(backend, variant, N):
    """A NaN row of g makes that row's loss and gradient NaN (it used to give loss 0 and zero gradient
    on Triton); the other rows keep finite values equal to the reference's."""
    g, pos, bank, kw = make_case(N, 12, 9, variant, dtype=torch.float32)
    g[2, 5] = float("nan")
    loss, dg, dpos = _loss_and_grads(g, pos, bank, kw, backend)
    ref = _loss_and_grads(g, pos, bank, kw, "torch")
    assert torch.isnan(loss[2]) and torch.isnan(dg[2]).all(), f"row 2 must be NaN: loss {loss[2]}, dg {dg[2]}"
    others = torch.arange(N) != 2
    assert torch.isfinite(loss[others]).all() and torch.isfinite(dg[others]).all(), "the other rows stay finite"
    for name, a, b in zip(("loss", "dg", "dpos"), (loss, dg, dpos), ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs from the reference"
        torch.testing.assert_close(a.nan_to_num(7.0), b.nan_to_num(7.0), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_positive_or_a_kept_negative_propagates(backend):
    N, D, M, K = 5, 10, 6, 12
    g, pos, bank, _ = make_case(N, D, M, "index", K=K)
    neg_index = torch.randint(1, K, (N, M))
    neg_index[3, 0] = 0  # only row 3 draws bank row 0
    bank[0, 1] = float("nan")
    loss, dg, _ = _loss_and_grads(g, pos, bank, dict(neg_index=neg_index), backend)
    assert torch.isnan(loss[3]) and torch.isnan(dg[3]).all()
    assert torch.isfinite(loss[torch.arange(N) != 3]).all()
    pos[1, 0] = float("nan")  # in-batch: every row that keeps pos[1] as a negative turns NaN
    ids = torch.tensor([0, 1, 2, 1, 4])  # row 3 shares row 1's identity: pos[1] is excluded for it
    loss, dg, dpos = _loss_and_grads(g, pos, bank[1:], dict(in_batch=True, ids=ids), backend)
    ref = _loss_and_grads(g, pos, bank[1:], dict(in_batch=True, ids=ids), "torch")
    assert torch.isnan(loss[[0, 1, 2, 4]]).all() and torch.isfinite(loss[3]), loss
    for name, a, b in zip(("loss", "dg", "dpos"), (loss, dg, dpos), ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("variant,N", [("index_inbatch_ids", 5), ("shared_inbatch_ids", 17)])
def test_zero_rows_get_a_finite_zero_gradient(backend, dtype, variant, N):
    """fp16 zero rows of g / pos used to give inf gradients (1 / 1e-6 cast to fp16); a row whose norm
    is below 1e-6 now gets exactly zero gradient on both backends, and the other rows match the
    reference."""
    g, pos, bank, kw = make_case(N, 16, 20, variant, dtype=dtype)
    g[1] = 0
    pos[3] = 0
    g[4] = 1e-7 if dtype == torch.float32 else 6e-8  # below eps, not zero
    bank[0] = 0  # a zero candidate: at tau = 1 its softmax weight over its norm (1e6) overflowed fp16
    kw = {**kw, "tau": 1.0}
    loss, dg, dpos = _loss_and_grads(g, pos, bank, kw, backend)
    for name, t in (("loss", loss), ("dg", dg), ("dpos", dpos)):
        assert torch.isfinite(t).all(), f"{name} not finite: {t}"
    assert torch.all(dg[1] == 0) and torch.all(dg[4] == 0) and torch.all(dpos[3] == 0), "zero rows: zero gradient"
    ref = _loss_and_grads(g, pos, bank, kw, "torch")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("loss", "dg", "dpos"), (loss, dg, dpos), ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=name)


@needs_interpreter
def test_triton_interpreter_refuses_bf16():
    g, pos, bank, kw = make_case(3, 8, 10, "index")
    for which in ("g", "pos", "negatives"):
        args = {"g": g, "pos": pos, "negatives": bank}
        args[which] = args[which].bfloat16()
        with pytest.raises(ValueError, match="interpreter.*bf16"):
            cosine_infonce(args["g"], args["pos"], args["negatives"], backend="triton", **kw)
    # the reference takes bf16 on the CPU, and auto picks it
    assert torch.isfinite(cosine_infonce(g.bfloat16(), pos.bfloat16(), bank.bfloat16(), **kw))


def test_launch_plan_at_the_goal_shape():
    """Issue 17: N 64, M 4096, D 512, per-row gallery indices, bf16, on a 132-SM part: one wave of
    resident programs (no partial second wave), every SM busy, 16-byte loads of the gathered rows."""
    from idflux.kernels.cosine_infonce import _launch_config, launch_plan
    plan = launch_plan(64, 4096, 512, torch.bfloat16, 132)
    assert plan["kernel"] == "_cosine_infonce_fwd_kernel" and plan["grid"] == (64, 4)
    assert plan["waves"] <= 1.0 and plan["programs"] > 0.9 * plan["resident_per_sm"] * 132
    assert plan["load_bytes"] == 16 and plan["splits"] * plan["candidates_per_program"] >= 4096
    # the launcher sizes a launch the same way given the device's SM count
    assert _launch_config(64, 4096, 512, 132)[3] == plan["splits"]
    for N, M, D in [(1, 4096, 512), (8, 65536, 512), (256, 4096, 512), (64, 100, 7), (3, 0, 16)]:
        for gathered in (True, False):
            p = launch_plan(N, M, D, torch.float16, 132, gathered=gathered, in_batch=True)
            C = M + N
            assert p["splits"] * p["candidates_per_program"] >= C, (N, M, D, gathered, p)
            rows = p["grid"][0]
            assert p["waves"] <= 1.0 or p["splits"] == 1 or rows * (p["splits"] - 1) < p["resident_per_sm"] * 132
    with pytest.raises(ValueError, match="N must"):
        launch_plan(0, 10, 8)
