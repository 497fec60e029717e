"""Seeded differential fuzz of cosine_infonce: Triton (the interpreter on CPU) against the PyTorch
reference, loss and both gradients, NaN patterns included (issue 15).

Each case draws N, M, D (odd and non-power-of-two included), a shared bank or per-row gallery
indices, in-batch negatives, identity exclusions (rows with every candidate excluded arise), zero
rows, NaN injected into g, pos or a negative, tau, and fp32/fp16 (bf16: the torch path, which the
interpreter cannot run). ``IDFLUX_FUZZ_CASES`` sets the number of cases (default 200: about 20-35 s on a 2-core CPU).
"""

import os

import pytest
import torch

from idflux.kernels import _backend
from idflux.kernels.cosine_infonce import cosine_infonce
from idflux.kernels.cosine_infonce_ref import cosine_infonce_ref

CASES = int(os.environ.get("IDFLUX_FUZZ_CASES", "200"))
pytestmark = pytest.mark.skipif(not _backend.INTERPRET, reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)")


def draw_case(seed: int) -> dict:
    """One random problem (float64 tensors; the dtype is applied by the caller)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    def chance(p):
        return bool(torch.rand((), generator=gen) < p)

    shared = chance(0.4)
    N = pick([1, 2, 3, 5, 6]) if not (shared and chance(0.5)) else pick([16, 17, 19])  # 16+: row-tiled kernel
    D = pick([1, 3, 7, 16, 24, 33, 64])
    M = pick([0, 1, 5, 31, 64, 65, 130])
    K = max(1, M + pick([0, 3, 40]))
    pos = torch.randn(N, D, generator=gen, dtype=torch.float64)
    g = pos * pick([0.0, 1.0]) + torch.randn(N, D, generator=gen, dtype=torch.float64) * pick([0.5, 2.0])
    bank = torch.randn(M if shared else K, D, generator=gen, dtype=torch.float64) * pick([1.0, 10.0])
    kw = {"tau": pick([0.05, 0.1, 0.5, 1.0]), "in_batch": chance(0.5)}
    if not shared:
        kw["neg_index"] = torch.randint(0, K, (N, M), generator=gen)
    n_ids = pick([1, 2, max(1, N // 2), N])
    if chance(0.6):
        kw["ids"] = torch.randint(0, n_ids, (N,), generator=gen)
        if chance(0.7):
            kw["neg_ids"] = torch.randint(0, n_ids + 1, (bank.shape[0],), generator=gen)
            if chance(0.3):  # row 0's identity owns the whole bank: only in-batch candidates (or none) left
                kw["neg_ids"][:] = kw["ids"][0]
    for name, t in (("g", g), ("pos", pos), ("bank", bank)):
        if t.shape[0] and chance(0.25):
            t[int(torch.randint(t.shape[0], (1,), generator=gen))] = 0.0  # a zero row
    nan_in = pick([None, None, None, "g", "pos", "bank"])
    target = {"g": g, "pos": pos, "bank": bank}.get(nan_in)
    if target is not None and target.shape[0]:
        target[int(torch.randint(target.shape[0], (1,), generator=gen)), int(torch.randint(D, (1,), generator=gen))] = float("nan")
    return {"g": g, "pos": pos, "bank": bank, "kw": kw, "dtype": pick([torch.float32, torch.float16, torch.bfloat16]),
            "w": torch.randn(N, generator=gen, dtype=torch.float64)}


def run(case, backend, dtype):
    g = case["g"].to(dtype).requires_grad_()
    pos = case["pos"].to(dtype).requires_grad_()
    loss = cosine_infonce(g, pos, case["bank"].to(dtype), reduction="none", backend=backend, **case["kw"])
    dg, dpos = torch.autograd.grad((loss * case["w"].to(loss.dtype)).sum(), [g, pos], allow_unused=True)
    return [loss.detach().double(), dg.double(), dpos.double()]


def assert_same(got, want, tol, what):
    for name, a, b in zip(("loss", "dg", "dpos"), got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: {name} NaN pattern {torch.isnan(a).nonzero().tolist()} " \
                                                           f"vs reference {torch.isnan(b).nonzero().tolist()}"
        a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
        assert torch.isfinite(a).all() == torch.isfinite(b).all(), f"{what}: {name} inf pattern"
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=f"{what}: {name}")


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_triton_matches_reference(seed):
    case = draw_case(seed)
    dtype = case["dtype"]
    what = f"seed {seed}: N, D = {tuple(case['g'].shape)}, bank {tuple(case['bank'].shape)}, " \
           f"{ {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in case['kw'].items()} }, {dtype}"
    want = run(case, "torch", dtype)
    if dtype == torch.bfloat16:
        # The interpreter cannot run bf16 (it refuses it); the torch path must agree with itself at
        # fp32 on the bf16-rounded inputs, where it computes anyway.
        with pytest.raises(ValueError, match="bf16"):
            run(case, "triton", dtype)
        rounded = {**case, **{k: case[k].to(dtype).double() for k in ("g", "pos", "bank")}}
        assert_same(want, run(rounded, "torch", torch.float32), 1e-2, what)
        return
    got = run(case, "triton", dtype)
    assert_same(got, want, 1e-4 if dtype == torch.float32 else 2e-2, what)
    if dtype == torch.float32:  # and the reference against float64 (an oracle at higher precision)
        assert_same(want, [x.double() for x in run(case, "torch", torch.float64)], 1e-3, what)


def test_fuzz_draws_cover_the_cases_that_matter():
    """The draws reach every path: shared/indexed, row-tiled, in-batch, exclusions, zero rows, NaN."""
    seen = set()
    for seed in range(max(CASES, 40)):  # drawing is cheap: the coverage of the first 40 seeds at least
        c = draw_case(seed)
        kw, N = c["kw"], c["g"].shape[0]
        seen.add("indexed" if "neg_index" in kw else ("tiled" if N >= 16 else "shared"))
        seen |= {k for k in ("in_batch",) if kw[k]} | ({"neg_ids"} if "neg_ids" in kw else set())
        seen |= {f"nan_{n}" for n in ("g", "pos", "bank") if torch.isnan(c[n]).any()}
        seen |= {f"zero_{n}" for n in ("g", "pos", "bank") if (c[n].abs().sum(-1) == 0).any()}
        seen.add(str(c["dtype"]))
    want = {"indexed", "tiled", "shared", "in_batch", "neg_ids", "nan_g", "nan_pos", "nan_bank", "zero_g", "zero_pos",
            "torch.float32", "torch.float16", "torch.bfloat16"}
    assert want <= seen, f"draws miss {want - seen}"
