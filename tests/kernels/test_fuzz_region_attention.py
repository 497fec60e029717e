"""Seeded differential fuzz of region_attention: the Triton kernels (interpreter on the CPU, fp32
and fp16) against the float64 reference, forward and every gradient, dense and packed forms; bf16
through the torch path. Random shapes (odd Nq and Nkv, head dims that are not powers of two),
references (empty spans, keys no reference owns), memberships (random, empty, all, none of one
image), both backward strategies and split dk/dv walks, and NaN/inf injected where no token may
look: keys and values of a reference outside a token's box, keys no reference owns, queries of
tokens in no box. A token must get from the kernel exactly what the reference gives it: finite
where the reference is finite (close in value), non-finite where it is not.
"""

import importlib

import pytest
import torch

from idflux.kernels import _backend, region_attention, region_attention_packed

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or _backend.INTERPRET),
                                  reason="no CUDA device and TRITON_INTERPRET is off")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RA = importlib.import_module("idflux.kernels.region_attention")
TOL = {torch.float32: (3e-5, 1e-4, 5e-5), torch.float16: (4e-3, 5e-3, 2e-2), torch.bfloat16: (3e-2, 3e-2, 6e-2)}


def _case(gen, dtype):
    """One random case: (q, k, v, membership, offsets, packed index or None, what was poisoned)."""
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    B, H, R = ri(1, 3), ri(1, 2), ri(0, 5)
    D = [8, 16, 24, 32][ri(0, 3)]
    Nq = ri(1, 70)
    spans = torch.randint(0, 21, (B, R), generator=gen) * (torch.rand(B, R, generator=gen) > 0.15)
    offs = torch.zeros(B, R + 1, dtype=torch.long)
    offs[:, 1:] = spans.cumsum(1)
    Nkv = int(offs[:, -1].max()) + ri(0, 3)  # a few keys no reference owns
    q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (Nq, Nkv, Nkv))
    mode = ri(0, 5)
    if R == 0:
        mem = torch.zeros(B, Nq, dtype=torch.long)
    elif mode == 0:
        mem = torch.zeros(B, Nq, dtype=torch.long)
    elif mode == 1:
        mem = torch.full((B, Nq), 2 ** R - 1, dtype=torch.long)
    else:
        mem = torch.randint(0, 2 ** R, (B, Nq), generator=gen)
        mem[torch.rand(B, Nq, generator=gen) < 0.3] = 0
        if mode == 2:
            mem[ri(0, B - 1)] = 0  # one image with no token in a box
    poisoned = []
    if R and torch.rand(1, generator=gen) < 0.5:  # a non-finite key or value of one reference
        b, r = ri(0, B - 1), ri(0, R - 1)
        if offs[b, r + 1] > offs[b, r]:
            j = ri(int(offs[b, r]), int(offs[b, r + 1]) - 1)
            t = (k, v)[ri(0, 1)]
            t[b, ri(0, H - 1), j, ri(0, D - 1)] = float("nan") if torch.rand(1, generator=gen) < 0.7 else float("inf")
            poisoned.append((b, r))
    if Nkv > offs[:, -1].min():  # keys that no reference of some image owns: never read
        b = int(torch.argmin(offs[:, -1]))
        k[b, :, int(offs[b, -1]):] = float("nan")
        v[b, :, int(offs[b, -1]):] = float("inf")
    packed = None
    if ri(0, 1):
        b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
        if ri(0, 3) == 0:  # tokens in no box in the packed form too
            b_idx, t_idx = torch.arange(B).repeat_interleave(Nq), torch.arange(Nq).repeat(B)
        perm = torch.randperm(b_idx.numel(), generator=gen)
        packed = (b_idx[perm], t_idx[perm])
    else:
        q.transpose(1, 2)[mem == 0] = float("nan")  # queries of tokens in no box: never read
    cast = lambda t: t.to(dtype).to(DEV)  # noqa: E731
    return cast(q), cast(k), cast(v), mem.to(DEV), offs.to(DEV), packed, poisoned


def _run(q, k, v, mem, offs, packed, backend, dtype, g=None):
    """Output and (q, k, v) gradients of one form; q rows of the packed form gathered first."""
    if packed is not None:
        b_idx, t_idx = (x.to(DEV) for x in packed)
        q = q[b_idx, :, t_idx]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if packed is not None:
        out = region_attention_packed(*leaves, mem[b_idx, t_idx], b_idx, offs, backend=backend)
    else:
        out = region_attention(*leaves, mem, offs, backend=backend)
    if g is None:
        return out, None
    return out, torch.autograd.grad(out, leaves, g.to(dtype))


def _compare(got, want, atol, rtol, label, *, exact_pattern=True):
    """Close where the reference is finite; the same finite/non-finite pattern (``exact_pattern``), or
    for gradients, non-finite nowhere the reference is finite. The float64 reference's own backward
    spreads a poisoned key's NaN over its whole reference's dk/dv (0 x NaN in its matrix products)
    where the kernels keep the entries that never met it finite: the kernels may be cleaner there,
    never dirtier."""
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    if exact_pattern:
        assert torch.equal(bad_got, bad_want), f"{label}: non-finite at {bad_got.sum()} entries, reference at {bad_want.sum()}"
    else:
        extra = bad_got & ~bad_want
        assert not extra.any(), f"{label}: non-finite at {extra.sum()} entries where the reference is finite"
    torch.testing.assert_close(torch.where(bad_want, 0.0, got.double()), torch.where(bad_want, 0.0, want),
                               atol=atol, rtol=rtol, msg=lambda m: f"{label}: {m}")


def _check(gen, dtype, backend, label):
    q, k, v, mem, offs, packed, poisoned = _case(gen, dtype)
    want, _ = _run(q, k, v, mem, offs, packed, "torch", torch.float64)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(DEV)
    g = torch.where(torch.isfinite(want), g, 0.0)  # no upstream gradient into rows that are already non-finite
    want, want_grads = _run(q, k, v, mem, offs, packed, "torch", torch.float64, g)
    got, got_grads = _run(q, k, v, mem, offs, packed, backend, dtype, g)
    atol, rtol, gtol = TOL[dtype]
    label = f"{label} {dtype} {tuple(q.shape)} Nkv={k.shape[2]} offs={offs.tolist()} packed={packed is not None} poisoned={poisoned}"
    assert got.dtype == dtype and got.shape == want.shape
    _compare(got, want, atol, rtol, label + " out")
    for name, a, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        _compare(a, w, gtol, rtol, f"{label} {name}", exact_pattern=False)
    rows = (mem != 0) if packed is None else (mem[packed[0].to(DEV), packed[1].to(DEV)] != 0)
    zero = got.transpose(1, 2)[~rows] if packed is None else got[~rows]
    assert torch.equal(zero, torch.zeros_like(zero)), f"{label}: tokens in no box must get exactly 0"


@needs_triton
@pytest.mark.parametrize("chunk", range(4))
def test_fuzz_triton_against_reference(chunk, monkeypatch):
    """60 cases per chunk (240 in all) on the kernels, fp32 and fp16, each backward strategy."""
    gen = torch.Generator().manual_seed(1000 + chunk)
    for i in range(60):
        dtype = (torch.float32, torch.float16)[i % 2]
        strategy = ("key_parallel", "atomic")[(i // 2) % 2]
        split = (None, None, 2)[i % 3]
        monkeypatch.setattr(RA, "BWD_DKDV", strategy)
        monkeypatch.setattr(RA, "DKDV_SPLIT", split)
        _check(gen, dtype, "triton", f"chunk {chunk} case {i} {strategy} split={split}")


def test_fuzz_bf16_torch_path_against_reference():
    """bf16 runs on the reference (the interpreter refuses it): 80 cases, NaN/inf kept out of the tokens that do not see it."""
    gen = torch.Generator().manual_seed(2000)
    for i in range(80):
        _check(gen, torch.bfloat16, "torch", f"bf16 case {i}")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("poison", ["k_nan", "k_nan_every_key", "v_inf"])
def test_a_token_that_sees_nan_gets_nan_and_no_other_token_does(backend, dtype, poison):
    """The case the fuzz found (chunk 2, case 25): a one-key reference whose key holds NaN. Every
    score of the tokens in its box alone is NaN, and softmax of NaN is NaN: both backends return
    NaN there (PyTorch's fused CPU SDPA alone returns 0 for such a row; the reference takes the
    math kernel when a key is non-finite). Tokens outside its box stay finite and exact."""
    if backend == "torch" and dtype == torch.float16 and not torch.cuda.is_available():
        dtype = torch.float32  # (fp16 SDPA on the CPU: same semantics, tested on CUDA)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (9, 6, 6))
    offs = torch.tensor([[0, 1, 4, 6]])  # reference 0 owns one key
    mem = torch.tensor([[1, 1, 2, 3, 4, 6, 0, 5, 2]])
    if poison == "k_nan":
        k[0, 0, 0, 3] = float("nan")
    elif poison == "k_nan_every_key":
        k[0, :, 0] = float("nan")
    else:
        v[0, 1, 0, 5] = float("inf")
    q, k, v = (t.to(dtype).to(DEV) for t in (q, k, v))
    out = region_attention(q, k, v, mem.to(DEV), offs.to(DEV), backend=backend).float().cpu()
    sees_ref0 = (mem[0] & 1).bool()
    bad = ~torch.isfinite(out)  # (1, H, Nq, D)
    assert bad[0][:, sees_ref0].any(-1).any(0).all(), f"every token in box 0 sees the poison: {bad.any(-1)}"
    assert not bad[0][:, ~sees_ref0].any(), "a token outside box 0 got a non-finite value"
    clean = region_attention(*(t.double().cpu() for t in (q, k, v)), mem, offs, backend="torch")
    torch.testing.assert_close(out[0][:, ~sees_ref0].double(), clean[0][:, ~sees_ref0], atol=4e-3, rtol=5e-3)
