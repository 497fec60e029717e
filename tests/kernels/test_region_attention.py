"""region_attention: reference vs SDPA with the dense mask (an oracle nobody here wrote), gradients,
edge cases and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from idflux.kernels import region_attention
from idflux.kernels.region_attention_ref import dense_mask_from_membership


def random_case(B, H, Nq, D, spans, *, p_in=0.6, dtype=torch.float32, device="cpu", gen=None):
    """Random q/k/v, membership with overlaps and empty rows, offsets from per-image span lengths."""
    gen = gen or torch.Generator().manual_seed(0)
    R = max(len(s) for s in spans)
    offsets = torch.zeros(B, R + 1, dtype=torch.int64)
    for b, lens in enumerate(spans):
        lens = list(lens) + [0] * (R - len(lens))
        offsets[b, 1:] = torch.tensor(lens).cumsum(0)
    Nkv = int(offsets[:, -1].max().item()) if R else 1
    Nkv = max(Nkv, 1)
    q = torch.randn(B, H, Nq, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, Nkv, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, Nkv, D, generator=gen, dtype=torch.float64).to(dtype)
    bits = torch.rand(B, Nq, max(R, 1), generator=gen) < p_in / max(R, 1) ** 0.5
    weights = 2 ** torch.arange(max(R, 1), dtype=torch.int64)
    membership = (bits.long() * weights).sum(-1) if R else torch.zeros(B, Nq, dtype=torch.int64)
    return q.to(device), k.to(device), v.to(device), membership.to(device), offsets.to(device)


def sdpa_dense(q, k, v, membership, offsets, scale=None):
    """Oracle: SDPA with the dense boolean mask; rows with no allowed key set to 0 explicitly."""
    mask = dense_mask_from_membership(membership, offsets, k.shape[2])[:, None]  # (B, 1, Nq, Nkv)
    acc = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(q.to(acc), k.to(acc), v.to(acc), attn_mask=mask, scale=scale)
    empty = ~mask.any(-1, keepdim=True)
    return out.masked_fill(empty, 0.0).to(q.dtype), mask


SHAPES = [
    # B, H, Nq, D, per-image span lengths
    (1, 1, 1, 8, [[3]]),
    (1, 2, 7, 16, [[5, 2]]),
    (2, 3, 113, 32, [[8, 8, 8, 8], [8, 8]]),
    (1, 2, 263, 64, [[17, 0, 9]]),  # a reference with zero tokens
    (2, 1, 33, 64, [[264, 264], [264]]),
]


@pytest.mark.parametrize("B,H,Nq,D,spans", SHAPES)
def test_reference_matches_dense_sdpa(B, H, Nq, D, spans):
    q, k, v, mem, offs = random_case(B, H, Nq, D, spans)
    out = region_attention(q, k, v, mem, offs, backend="torch")
    want, mask = sdpa_dense(q, k, v, mem, offs)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5, msg="out")
    assert out.dtype == q.dtype


@pytest.mark.parametrize("B,H,Nq,D,spans", SHAPES[:4])
def test_reference_gradients_match_dense_sdpa(B, H, Nq, D, spans):
    q, k, v, mem, offs = random_case(B, H, Nq, D, spans, dtype=torch.float64)
    grad_out = torch.randn(B, H, Nq, D, dtype=torch.float64)
    got, want = {}, {}
    for fn, store in ((lambda *a: region_attention(*a, backend="torch"), got), (lambda *a: sdpa_dense(*a)[0], want)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        fn(qq, kk, vv, mem, offs).backward(grad_out)
        store.update(dq=qq.grad, dk=kk.grad, dv=vv.grad)
    for name in ("dq", "dk", "dv"):
        torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=1e-10, msg=name)


def test_masked_rows_are_exact_zero_in_output_and_grad():
    q, k, v, mem, offs = random_case(1, 2, 50, 16, [[4, 4]])
    mem[0, ::3] = 0
    q.requires_grad_()
    out = region_attention(q, k, v, mem, offs, backend="torch")
    out.backward(torch.randn_like(out))
    rows = mem[0] == 0
    assert torch.equal(out[0, :, rows], torch.zeros_like(out[0, :, rows])), "out on masked rows"
    assert torch.equal(q.grad[0, :, rows], torch.zeros_like(q.grad[0, :, rows])), "dq on masked rows"


def test_bits_only_on_empty_reference_give_zero():
    q, k, v, _, _ = random_case(1, 1, 4, 8, [[3]])
    offs = torch.tensor([[0, 3, 3]])  # reference 1 is empty
    mem = torch.tensor([[2, 2, 1, 3]])
    q[:, :, 3] = q[:, :, 2]
    out = region_attention(q, k, v, mem, offs, backend="torch")
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 8))
    torch.testing.assert_close(out[0, 0, 2], out[0, 0, 3], msg="bit on an empty reference changed the output")


@pytest.mark.parametrize("case", ["none", "all"])
def test_no_token_or_every_token_in_every_box(case):
    q, k, v, mem, offs = random_case(2, 2, 19, 8, [[5, 3, 4], [2, 2, 2]])
    mem.fill_(0 if case == "none" else 7)
    out = region_attention(q, k, v, mem, offs, backend="torch")
    if case == "none":
        assert torch.equal(out, torch.zeros_like(out))
    else:
        want = torch.stack([F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, : offs[b, -1]], v[b:b + 1, :, : offs[b, -1]])[0] for b in range(2)])
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_explicit_scale_and_noncontiguous_inputs():
    q, k, v, mem, offs = random_case(2, 3, 21, 16, [[6, 6], [4, 9]])
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    out = region_attention(qt, k[..., :], v, mem.int(), offs.int(), scale=0.3, backend="torch")
    want, _ = sdpa_dense(q, k, v, mem, offs, scale=0.3)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_gradcheck_float64():
    q, k, v, mem, offs = random_case(1, 2, 9, 4, [[3, 2, 0]], dtype=torch.float64)
    mem[0, 0] = 0
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: region_attention(a, b, c, mem, offs, backend="torch"), inputs)


def test_randomized_sweep_against_dense_sdpa():
    gen = torch.Generator().manual_seed(1234)
    for trial in range(60):
        B = int(torch.randint(1, 3, (1,), generator=gen))
        R = int(torch.randint(1, 6, (1,), generator=gen))
        spans = [torch.randint(0, 12, (R,), generator=gen).tolist() for _ in range(B)]
        Nq = int(torch.randint(1, 40, (1,), generator=gen))
        D = [4, 8, 16][trial % 3]
        q, k, v, mem, offs = random_case(B, 2, Nq, D, spans, p_in=float(torch.rand(1, generator=gen)), gen=gen)
        out = region_attention(q, k, v, mem, offs, backend="torch")
        want, _ = sdpa_dense(q, k, v, mem, offs)
        torch.testing.assert_close(out, want, atol=3e-5, rtol=3e-5, msg=f"trial {trial}: B={B} R={R} spans={spans} Nq={Nq}")


def _inputs():
    q, k, v, mem, offs = random_case(1, 2, 6, 8, [[3, 2]])
    return dict(q=q, k=k, v=v, membership=mem, ref_offsets=offs)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.randn(2, 6, 8)), "q must be 4-D"),
        (dict(k=torch.randn(1, 2, 5, 4), v=torch.randn(1, 2, 5, 4)), "k must be"),
        (dict(v=torch.randn(1, 2, 4, 8)), "k and v"),
        (dict(q=torch.randn(1, 2, 6, 8, dtype=torch.float64)), "share a dtype"),
        (dict(membership=torch.ones(1, 6)), "membership must be an integer"),
        (dict(membership=torch.ones(1, 5, dtype=torch.long)), r"membership must be \(B, Nq\)"),
        (dict(membership=torch.full((1, 6), 4, dtype=torch.long)), "membership has bits beyond"),
        (dict(membership=torch.full((1, 6), -1, dtype=torch.long)), "membership has bits beyond"),
        (dict(ref_offsets=torch.tensor([[0, 3, 1]])), "non-decreasing"),
        (dict(ref_offsets=torch.tensor([[0, 3, 9]])), r"ref_offsets must lie in"),
        (dict(ref_offsets=torch.tensor([0, 3, 5])), r"ref_offsets must be \(B, R\+1\)"),
        (dict(ref_offsets=torch.tensor([[0.0, 3.0, 5.0]])), "ref_offsets must be an integer"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = {**_inputs(), **change}
    with pytest.raises(ValueError, match=match):
        region_attention(args["q"], args["k"], args["v"], args["membership"], args["ref_offsets"], backend="torch")


def test_bad_scale_and_backend():
    a = _inputs()
    with pytest.raises(ValueError, match="scale"):
        region_attention(*a.values(), scale=-1.0, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        region_attention(*a.values(), backend="cuda")


def test_too_many_references_is_a_clear_error():
    q = torch.randn(1, 1, 2, 4)
    k = v = torch.randn(1, 1, 70, 4)
    offs = torch.arange(64).view(1, 64)
    with pytest.raises(ValueError, match="at most"):
        region_attention(q, k, v, torch.zeros(1, 2, dtype=torch.long), offs, backend="torch")


def test_default_scale_is_inverse_sqrt_d():
    q, k, v, mem, offs = random_case(1, 1, 5, 16, [[4]])
    a = region_attention(q, k, v, mem, offs, backend="torch")
    b = region_attention(q, k, v, mem, offs, scale=1 / math.sqrt(16), backend="torch")
    assert torch.equal(a, b)
