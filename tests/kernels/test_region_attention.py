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


# ---------------------------------------------------------------------------------------------
# Triton kernel: interpreter on CPU (small shapes), compiled on CUDA (larger shapes, low precision)
# ---------------------------------------------------------------------------------------------

from idflux.kernels import region_attention_packed  # noqa: E402
from idflux.kernels._backend import INTERPRET  # noqa: E402

CUDA = torch.cuda.is_available()
# The kernel tests run where Triton runs: compiled on CUDA, else interpreted on the CPU.
KDEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRET), reason="no CUDA device and TRITON_INTERPRET is off")


def nan_padded(t, pad_rows=5, pad_cols=3):
    """Same values as t (..., N, D) inside a NaN-filled buffer (..., N+pad_rows, D+pad_cols):
    any out-of-bounds read of the kernel turns into NaN in the result."""
    *lead, n, d = t.shape
    buf = torch.full((*lead, n + pad_rows, d + pad_cols), float("nan"), dtype=t.dtype, device=t.device)
    buf[..., :n, :d] = t
    return buf[..., :n, :d]


def garbage_padded_membership(mem):
    buf = torch.full((mem.shape[0], mem.shape[1] + 7), -1, dtype=mem.dtype, device=mem.device)
    buf[:, : mem.shape[1]] = mem
    return buf[:, : mem.shape[1]]


def check_kernel_vs_reference(q, k, v, mem, offs, *, atol, rtol, grad_atol=None, label=""):
    grad_atol = grad_atol or atol
    q, k, v = (nan_padded(t).requires_grad_() for t in (q, k, v))
    mem = garbage_padded_membership(mem)
    out = region_attention(q, k, v, mem, offs, backend="triton")
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = region_attention(qr, kr, vr, mem, offs, backend="torch")
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, msg=lambda m: f"{label} out: {m}")
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    want = torch.autograd.grad(ref, (qr, kr, vr), grad_out)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{label} {name} has NaN/inf"
        torch.testing.assert_close(g.double(), w, atol=grad_atol, rtol=rtol, msg=lambda m, n=name: f"{label} {n}: {m}")
    empty = mem == 0
    assert torch.equal(out.transpose(1, 2)[empty], torch.zeros_like(out.transpose(1, 2)[empty])), f"{label} out on masked rows"
    assert torch.equal(got[0].transpose(1, 2)[empty], torch.zeros_like(got[0].transpose(1, 2)[empty])), f"{label} dq on masked rows"


KERNEL_SHAPES = [
    (1, 1, 1, 16, [[3]]),
    (1, 2, 7, 16, [[5, 2]]),
    (2, 1, 113, 32, [[8, 8, 8, 8], [8, 8]]),
    (1, 1, 263, 64, [[17, 0, 9]]),     # a reference with zero tokens
    (1, 1, 70, 64, [[264, 264]]),       # SigLIP-sized spans, Nkv not a multiple of the block
    (1, 1, 40, 128, [[7, 30, 1]]),      # head dim 128
    (1, 1, 9, 24, [[5, 5]]),            # head dim not a power of two
]


@pytest.fixture(params=["launch", "wide"])
def key_blocks(request, monkeypatch):
    """fp32 launches take 16-key blocks (region_attention._block_n: larger ones spill on a GPU).
    "wide" gives fp32 the 16..64-key blocks that bf16/fp16 launches take, so the interpreter (fp32:
    it mishandles bf16) covers the production block sizes too."""
    if request.param == "wide":
        import importlib

        ra = importlib.import_module("idflux.kernels.region_attention")
        rule = ra._block_n
        monkeypatch.setattr(ra, "_block_n", lambda n_kv, n_refs, ieee=False, head_dim=64: rule(n_kv, n_refs, False, head_dim))
    return request.param


@needs_triton
@pytest.mark.parametrize("B,H,Nq,D,spans", KERNEL_SHAPES)
def test_kernel_matches_reference_fp32(B, H, Nq, D, spans, key_blocks):
    q, k, v, mem, offs = random_case(B, H, Nq, D, spans, device=KDEV)
    check_kernel_vs_reference(q, k, v, mem, offs, atol=2e-5, rtol=1e-4, label=f"{(B, H, Nq, D, spans)}")


@needs_triton
@pytest.mark.parametrize("case", ["none", "all", "empty_ref_only", "overlap_all"])
def test_kernel_edge_memberships(case):
    q, k, v, mem, offs = random_case(2, 2, 37, 16, [[5, 20, 0], [9, 3, 3]], device=KDEV)
    if case == "none":
        mem.zero_()
    elif case == "all":
        mem.fill_(0b111)
    elif case == "empty_ref_only":
        mem[0].fill_(0b100)  # image 0's reference 2 owns no keys
    else:
        mem[:, ::2] = 0b011
    check_kernel_vs_reference(q, k, v, mem, offs, atol=2e-5, rtol=1e-4, label=case)


@needs_triton
def test_kernel_1023_tokens():
    q, k, v, mem, offs = random_case(1, 1, 1023, 16, [[11, 6]], device=KDEV)
    check_kernel_vs_reference(q, k, v, mem, offs, atol=2e-5, rtol=1e-4, label="1023")


@needs_triton
def test_kernel_randomized_sweep(key_blocks):
    gen = torch.Generator().manual_seed(7 if key_blocks == "launch" else 8)
    # On CUDA every new (BLOCK_N, BLOCK_D) pair is a compile: fewer, larger cases there.
    for trial in range(40 if CUDA else (200 if key_blocks == "launch" else 100)):
        B = int(torch.randint(1, 3, (1,), generator=gen))
        R = int(torch.randint(1, 5, (1,), generator=gen))
        spans = [torch.randint(0, 40, (R,), generator=gen).tolist() for _ in range(B)]
        Nq = int(torch.randint(1, 90, (1,), generator=gen))
        D = [16, 32, 64, 8][trial % 4]
        p = float(torch.rand(1, generator=gen))
        q, k, v, mem, offs = random_case(B, 1, Nq, D, spans, p_in=p, gen=gen, device=KDEV)
        check_kernel_vs_reference(q, k, v, mem, offs, atol=3e-5, rtol=1e-4, label=f"trial {trial} {spans} Nq={Nq} D={D}")


@needs_triton
def test_packed_matches_dense_and_reference():
    q, k, v, mem, offs = random_case(3, 2, 50, 16, [[6, 9], [4, 4], [12, 0]], device=KDEV)
    mem[1, :20] = 0
    dense = region_attention(q, k, v, mem, offs, backend="torch")
    b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
    shuffle = torch.randperm(b_idx.numel())  # packed tokens in any image order
    b_idx, t_idx = b_idx[shuffle], t_idx[shuffle]
    qp = q[b_idx, :, t_idx].clone().requires_grad_()  # (T, H, D)
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = region_attention_packed(qp, kk, vv, mem[b_idx, t_idx], b_idx, offs, backend="triton")
    torch.testing.assert_close(out, dense[b_idx, :, t_idx], atol=2e-5, rtol=1e-4, msg="packed out vs dense")
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (qp, kk, vv))
    ref = region_attention_packed(qr, kr, vr, mem[b_idx, t_idx], b_idx, offs, backend="torch")
    g = torch.randn_like(ref)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (qp, kk, vv), g), torch.autograd.grad(ref, (qr, kr, vr), g)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


@needs_triton
def test_packed_bad_image_index():
    q, k, v, mem, offs = random_case(2, 1, 4, 16, [[3], [2]], device=KDEV)
    with pytest.raises(ValueError, match="image_index"):
        region_attention_packed(q[0, 0].unsqueeze(1), k, v, mem[0], torch.tensor([0, 1, 2, 0]), offs, backend="triton")


@needs_triton
def test_custom_op_registration_and_compile():
    q, k, v, mem, offs = random_case(1, 2, 20, 16, [[5, 7]], device=KDEV)
    from idflux.kernels.region_attention import _dense_plan, _fwd_op

    plan = _dense_plan(mem, offs.shape[1] - 1)[:4]  # (the fifth, sizes, only feeds the eager launch sizes)
    torch.library.opcheck(_fwd_op, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mem, offs, *plan, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # fullgraph: no graph break (value checks are skipped under compile, the tile plan is traced).
    fn = torch.compile(lambda a, b, c: region_attention(a, b, c, mem, offs, backend="triton") * 2, backend="aot_eager", fullgraph=True)
    out = fn(q, k, v)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = 2 * region_attention(qr, kr, vr, mem, offs, backend="torch")
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (qr, kr, vr), g)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"compiled d{name}")
    b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
    qp = q.detach()[b_idx, :, t_idx].clone().requires_grad_()
    packed = torch.compile(lambda a: region_attention_packed(a, k, v, mem[b_idx, t_idx], b_idx, offs, backend="triton"),
                           backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(packed(qp), want.detach()[b_idx, :, t_idx] / 2, atol=2e-5, rtol=1e-4, msg="compiled packed")


def test_triton_backend_without_interpreter_is_a_clear_error(monkeypatch):
    from idflux.kernels import _backend

    monkeypatch.setattr(_backend, "INTERPRET", False)
    q, k, v, mem, offs = random_case(1, 1, 3, 8, [[2]])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        region_attention(q, k, v, mem, offs, backend="triton")


def attention_in_dtype(q, k, v, mem, offs):
    """PyTorch's own attention carried out in q's (low) precision: the error budget of the kernel."""
    mask = dense_mask_from_membership(mem, offs, k.shape[2])[:, None]
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    out = torch.softmax(s, dim=-1) @ v
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Nq,D,spans", [(1024, 64, [[264] * 4]), (4097, 64, [[8] * 4]), (147, 128, [[100, 3, 0, 37]]), (1023, 64, [[264, 264]])])
def test_kernel_low_precision_cuda(dtype, Nq, D, spans):
    q, k, v, mem, offs = random_case(2, 4, Nq, D, spans * 2, dtype=torch.float32, device="cuda")
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    lowt = [t.detach().clone().requires_grad_() for t in low]
    out_ref = region_attention(*ref, mem, offs, backend="torch")
    out_torch_low = attention_in_dtype(*lowt, mem, offs)
    out = region_attention(*low, mem, offs, backend="triton")
    assert out.dtype == dtype
    err_kernel = (out.double() - out_ref).abs().max().item()
    err_torch = (out_torch_low.double() - out_ref).abs().max().item()
    assert err_kernel <= 2 * err_torch + 1e-5, f"out: kernel error {err_kernel} > 2x torch {dtype} error {err_torch}"
    g = torch.randn_like(out_ref)
    want = torch.autograd.grad(out_ref, ref, g)
    got = torch.autograd.grad(out, low, g.to(dtype))
    base = torch.autograd.grad(out_torch_low, lowt, g.to(dtype))
    for name, a, b, w in zip(("dq", "dk", "dv"), got, base, want):
        ek, et = (a.double() - w).abs().max().item(), (b.double() - w).abs().max().item()
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert ek <= 3 * et + 1e-4, f"{name}: kernel error {ek} > 3x torch {dtype} error {et}"
    empty = mem == 0
    assert (out.transpose(1, 2)[empty] == 0).all() and (got[0].transpose(1, 2)[empty] == 0).all()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_packed_bf16_cuda_matches_dense():
    q, k, v, mem, offs = random_case(2, 24, 4096, 64, [[264] * 4, [264, 264, 0, 0]], p_in=0.3, device="cuda")
    q, k, v = (t.bfloat16() for t in (q, k, v))
    dense = region_attention(q, k, v, mem, offs, backend="triton")
    b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
    packed = region_attention_packed(q[b_idx, :, t_idx], k, v, mem[b_idx, t_idx], b_idx, offs, backend="triton")
    torch.testing.assert_close(packed, dense[b_idx, :, t_idx])


def test_non_tensor_input_is_a_type_error():
    a = _inputs()
    with pytest.raises(TypeError, match="membership must be a torch.Tensor"):
        region_attention(a["q"], a["k"], a["v"], [[1, 2, 0, 0, 1, 3]], a["ref_offsets"], backend="torch")


def test_packed_reference_bad_shapes():
    q, k, v, mem, offs = random_case(2, 1, 4, 8, [[3], [2]])
    qp = q[0].transpose(0, 1)  # (4, 1, 8)
    with pytest.raises(ValueError, match=r"q must be 3-D"):
        region_attention_packed(q, k, v, mem[0], torch.tensor([0, 1, 1, 0]), offs, backend="torch")
    with pytest.raises(ValueError, match=r"membership must be \(T,\)"):
        region_attention_packed(qp, k, v, mem, torch.tensor([0, 1, 1, 0]), offs, backend="torch")
    with pytest.raises(ValueError, match=r"image_index must be \(T,\)"):
        region_attention_packed(qp, k, v, mem[0], torch.tensor([0, 1]), offs, backend="torch")
    with pytest.raises(ValueError, match="image_index must lie in"):
        region_attention_packed(qp, k, v, mem[0], torch.tensor([0, 1, 2, 0]), offs, backend="torch")
    with pytest.raises(ValueError, match="image_index must be an integer"):
        region_attention_packed(qp, k, v, mem[0], torch.tensor([0.0, 1, 1, 0]), offs, backend="torch")


def test_validated_layout_is_rechecked_after_in_place_change():
    q, k, v, mem, offs = random_case(1, 1, 6, 8, [[3, 2]])
    region_attention(q, k, v, mem, offs, backend="torch")
    region_attention(q, k, v, mem, offs, backend="torch")  # remembered: no second check needed
    mem[0, 0] = 4  # bit 2, beyond R = 2
    with pytest.raises(ValueError, match="membership has bits beyond"):
        region_attention(q, k, v, mem, offs, backend="torch")
    mem[0, 0] = 1
    offs[0, 1] = 7
    with pytest.raises(ValueError, match="ref_offsets must lie in"):
        region_attention(q, k, v, mem, offs, backend="torch")


def test_fresh_tensors_are_checked_even_at_a_recycled_address():
    q, k, v, _, offs = random_case(1, 1, 6, 8, [[3, 2]])
    for _ in range(20):
        region_attention(q, k, v, torch.ones(1, 6, dtype=torch.long), offs, backend="torch")
        with pytest.raises(ValueError, match="membership has bits beyond"):
            region_attention(q, k, v, torch.full((1, 6), 8, dtype=torch.long), offs, backend="torch")


@needs_triton
def test_packed_plan_follows_image_index_changes():
    q, k, v, mem, offs = random_case(2, 1, 30, 16, [[5, 4], [3, 6]], device=KDEV)
    mem[mem == 0] = 1
    b_idx, t_idx = torch.arange(2, device=KDEV).repeat_interleave(30), torch.arange(30, device=KDEV).repeat(2)
    qp = q[b_idx, :, t_idx]
    first = region_attention_packed(qp, k, v, mem[b_idx, t_idx], b_idx, offs, backend="triton")
    b_idx[:30] = 1  # same tensor, changed in place: the cached tile plan must not be reused
    second = region_attention_packed(qp, k, v, mem[b_idx, t_idx], b_idx, offs, backend="triton")
    want = region_attention_packed(qp, k, v, mem[b_idx, t_idx], b_idx, offs, backend="torch")
    torch.testing.assert_close(second, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(first, second)


@needs_triton
@pytest.mark.parametrize("strategy", ["key_parallel", "atomic", "auto"])
def test_both_backward_strategies_match_reference(monkeypatch, strategy):
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")  # the module (the package exports a function of that name)
    monkeypatch.setattr(ra, "BWD_DKDV", strategy)
    q, k, v, mem, offs = random_case(2, 2, 77, 32, [[5, 40, 0], [9, 3, 70]], device=KDEV)
    check_kernel_vs_reference(q, k, v, mem, offs, atol=3e-5, rtol=1e-4, label=strategy)
    b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
    ours = [q[b_idx, :, t_idx].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    out = region_attention_packed(*ours[:3], mem[b_idx, t_idx], b_idx, offs, backend="triton")
    ref = region_attention_packed(*theirs, mem[b_idx, t_idx], b_idx, offs, backend="torch")
    g = torch.randn_like(ref)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, ours, g), torch.autograd.grad(ref, theirs, g)):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4, msg=f"packed {strategy} {name}")


def _plan_case(gen, B, N, R):
    mem = torch.randint(0, 2 ** R, (B, N), generator=gen)
    mem[torch.rand(B, N, generator=gen) < 0.4] = 0
    return mem


@pytest.mark.parametrize("seed", range(6))
def test_tile_plan_invariants(seed):
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")
    gen = torch.Generator().manual_seed(seed)
    B, N, R = 1 + seed % 3, [1, 63, 64, 65, 200, 513][seed], 1 + seed % 4
    mem = _plan_case(gen, B, N, R)
    tiles, rows, ref_tiles, ref_counts, sizes = ra._dense_plan(mem, R)
    bm = ra._BLOCK_M
    assert tiles.shape[0] == -(-B * N // bm) + 2 * B and tiles.is_contiguous() and ref_tiles.is_contiguous()
    n_work = int(sizes[0])
    assert int(sizes[1]) == int((mem == 0).sum()), "sizes: tokens in no box"
    planned, zero_rows = [], []
    for t, (b, first, end) in enumerate(tiles.tolist()):
        assert 0 <= end - first <= bm
        toks = rows[first:end].long()
        patterns = mem[b, toks]
        # work tiles (tokens in a box) first, then zero tiles, then empty ones
        assert (t < n_work) == (end > first and bool((patterns != 0).all())), f"tile {t}: work tiles first (n_work {n_work})"
        if end > first and (patterns == 0).any():
            assert (patterns == 0).all(), f"tile {t} mixes tokens in no box with planned ones"
            zero_rows += [(b, i) for i in toks.tolist()]
            continue
        assert torch.equal(patterns, patterns.sort().values), "tokens of a tile not sorted by pattern"
        planned += [(b, i) for i in toks.tolist()]
        for r in range(R):
            holds = bool(((patterns >> r) & 1).any())
            listed = t in ref_tiles[b * R + r, : ref_counts[b * R + r]].tolist()
            assert holds == listed, f"tile {t} reference {r}: holds {holds}, listed {listed}"
    assert sorted(planned) == sorted((b, i) for b, i in (mem != 0).nonzero().tolist()), "tokens in a box: planned once"
    assert sorted(zero_rows) == sorted((b, i) for b, i in (mem == 0).nonzero().tolist()), "tokens in no box: one zero tile"


@needs_triton
def test_kernel_many_tiles_several_images_overlapping_boxes():
    q, k, v, mem, offs = random_case(3, 2, 300, 16, [[9, 20, 3, 14], [5, 5, 5, 5], [30, 0, 2, 7]], p_in=0.7, device=KDEV)
    mem[1, 100:] = 0b1111  # every token of the tail of image 1 in all four boxes
    check_kernel_vs_reference(q, k, v, mem, offs, atol=3e-5, rtol=1e-4, label="many tiles")


@needs_triton
def test_every_output_row_is_written_by_the_kernels(monkeypatch):
    """out, LSE and dq are allocated uninitialised: fill those buffers with NaN to prove that the
    plan's tiles (planned and zero tiles) write every row."""
    real_empty_like, real_empty = torch.empty_like, torch.empty

    def nan_empty_like(t, *a, **kw):
        x = real_empty_like(t, *a, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    def nan_empty(*a, **kw):
        x = real_empty(*a, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    q, k, v, mem, offs = random_case(2, 2, 150, 16, [[5, 9, 3], [7, 0, 4]], p_in=0.5, device=KDEV)
    mem[1, :70] = 0
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    monkeypatch.setattr(torch, "empty", nan_empty)
    check_kernel_vs_reference(q, k, v, mem, offs, atol=3e-5, rtol=1e-4, label="NaN-filled buffers")
    # Spans that cover every key: dk/dv are allocated uninitialised too (no memset), so every key,
    # including those of a reference no token is in, must be stored by the dk/dv kernel.
    q, k, v, mem, offs = random_case(2, 2, 90, 16, [[5, 9, 3], [10, 0, 7]], p_in=0.5, device=KDEV)
    mem[0] &= 5  # image 0: no token in box 1
    check_kernel_vs_reference(q, k, v, mem, offs, atol=3e-5, rtol=1e-4, label="NaN-filled dk/dv")
    empty_q = q[:, :, :0]
    out = region_attention(empty_q.requires_grad_(), k.requires_grad_(), v, mem[:, :0], offs, backend="triton")
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)), "no query: dk must be exactly 0"


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_no_host_sync_once_a_layout_is_known(packed):
    """The tile plan is built on the device (no sync); input checks read values only the first time
    a layout is seen. After that a call, forward and backward, never waits for the device."""
    from sync_probe import assert_no_host_sync

    q, k, v, mem, offs = random_case(2, 2, 70, 16, [[5, 9], [7, 3]], device=KDEV)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if packed:
        b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
        qp = q.detach()[b_idx, :, t_idx].clone().requires_grad_()
        pm = mem[b_idx, t_idx]
        call = lambda: region_attention_packed(qp, k, v, pm, b_idx, offs, backend="triton")  # noqa: E731
        inputs = (qp, k, v)
    else:
        call = lambda: region_attention(q, k, v, mem, offs, backend="triton")  # noqa: E731
        inputs = (q, k, v)
    from sync_probe import host_syncs

    assert host_syncs(call), "the first call reads the layout's values back (the probe must see it)"

    def step():
        out = call()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    assert_no_host_sync(step)


def test_tile_plan_is_built_without_host_sync():
    import importlib

    from sync_probe import assert_no_host_sync

    ra = importlib.import_module("idflux.kernels.region_attention")
    mem = _plan_case(torch.Generator().manual_seed(3), 3, 130, 4)
    assert_no_host_sync(lambda: ra._dense_plan(mem, 4))
    assert_no_host_sync(lambda: ra._packed_plan(mem.reshape(-1), torch.arange(3).repeat_interleave(130), 3, 4))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_calls_after_the_first_never_sync():
    q, k, v, mem, offs = random_case(2, 24, 1024, 64, [[264] * 4, [264, 264, 0, 0]], p_in=0.3, device="cuda")
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = region_attention(q, k, v, mem, offs, backend="triton")  # first sight: checks read values once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = region_attention(q, k, v, mem, offs, backend="triton")
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
def test_split_dkdv_walk_matches_reference(monkeypatch, split):
    """Several programs share a key block's tile list and add fp32 partials (forced here; on a GPU
    the split is picked per layout to fill the device)."""
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")
    monkeypatch.setattr(ra, "DKDV_SPLIT", split)
    q, k, v, mem, offs = random_case(2, 2, 300, 16, [[9, 20, 3], [5, 0, 30]], p_in=0.8, device=KDEV)
    check_kernel_vs_reference(q, k, v, mem, offs, atol=3e-5, rtol=1e-4, label=f"split {split}")


def test_dkdv_grid_sizes_from_the_layout_hint(monkeypatch):
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")
    cpu = torch.device("cpu")
    assert ra._dkdv_grid(1, 4, 24, 1056, 64, None, cpu) == (17, 1), "no hint: static key blocks, no split"
    assert ra._dkdv_grid(1, 4, 24, 1056, 64, (6, 264), cpu) == (5, 1), "hint: key blocks of the longest span"

    class Props:
        multi_processor_count = 132

    from idflux.kernels import _backend

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(_backend, "_SM_COUNT", {})  # the SM count is cached per device
    cuda = torch.device("cuda")
    assert ra._dkdv_grid(1, 4, 24, 1056, 64, (6, 264), cuda) == (5, 1), "480 programs fill 132 SMs twice"
    assert ra._dkdv_grid(1, 4, 24, 32, 16, (6, 8), cuda) == (1, 3), "ArcFace branch: 96 programs -> split 3"
    assert ra._dkdv_grid(1, 1, 24, 8, 16, (40, 8), cuda) == (1, 11), "one big box: 24 programs -> split 11"
    assert ra._dkdv_grid(1, 1, 24, 8, 16, (2, 8), cuda) == (1, 1), "never more than half the list"
    monkeypatch.setattr(ra, "DKDV_SPLIT", 4)
    assert ra._dkdv_grid(1, 4, 24, 32, 16, (6, 8), cuda) == (1, 4)


def test_backward_strategy_auto_takes_one_kernel_where_the_walks_would_split(monkeypatch):
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")
    assert ra.BWD_DKDV == "auto"
    assert ra._atomic_bwd(3) and not ra._atomic_bwd(1), "auto: atomic exactly where the dk/dv walk would be split"
    assert not ra._atomic_bwd(3, head_dim=128), "not at head dim 128 (that kernel spills there)"
    monkeypatch.setattr(ra, "DKDV_SPLIT", 3)
    assert not ra._atomic_bwd(3), "a forced split runs the key-parallel kernel it asks for"
    monkeypatch.setattr(ra, "BWD_DKDV", "atomic")
    assert ra._atomic_bwd(1)
    monkeypatch.setattr(ra, "BWD_DKDV", "fast")
    with pytest.raises(ValueError, match="BWD_DKDV"):
        ra._atomic_bwd(1)


def test_key_blocks_fit_the_spans():
    """Whole blocks of the largest power of 2 that fits a span, the tail in 16-key blocks."""
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")
    assert ra._block_n(4 * 264, 4) == 64 and ra._TAIL_N == 16, "SigLIP: 264 = 4 x 64 + a 16-key block"
    assert ra._block_n(4 * 8, 4) == 16, "ArcFace: 8 keys in one 16-key block"
    assert ra._block_n(40, 1) == 32 and ra._block_n(4 * 264, 4, head_dim=128) == 32
    assert ra._block_n(4 * 264, 4, ieee=True) == 16


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_eager_launch_runs_work_tiles_only(launch_grids, packed):
    """With the layout's sizes known (eager), one program per work tile: no program for tokens in
    no box (their zeros come from the allocation) and none for the static bound's empty tiles."""
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")
    grids = launch_grids
    q, k, v, mem, offs = random_case(2, 2, 150, 16, [[5, 9, 3], [7, 0, 4]], p_in=0.5, device=KDEV)
    mem[1, :100] = 0
    if packed:
        b_idx, t_idx = torch.arange(2).repeat_interleave(150), torch.arange(150).repeat(2)  # tokens in no box too
        q = q[b_idx, :, t_idx].clone()
        call = lambda a, b, c: region_attention_packed(a, b, c, mem[b_idx, t_idx], b_idx, offs, backend="triton")  # noqa: E731
    else:
        call = lambda a, b, c: region_attention(a, b, c, mem, offs, backend="triton")  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = call(*leaves)
    counts = ((mem != 0).sum(1) + ra._BLOCK_M - 1) // ra._BLOCK_M
    assert grids[0] == ("_region_attention_fwd", (int(counts.sum()), 2))
    out.backward(torch.ones_like(out))
    assert grids[1] == ("_region_attention_bwd", (int(counts.sum()), 2))
    theirs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = (region_attention_packed(*theirs, mem[b_idx, t_idx], b_idx, offs, backend="torch") if packed
           else region_attention(*theirs, mem, offs, backend="torch"))
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(leaves, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=3e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("case", ["Nq=0", "Nkv=0", "R=0", "H=0", "uint8"])
def test_degenerate_sizes_forward_and_backward(case):
    B, H, Nq, D, Nkv = 2, 2, 7, 16, 5
    mem = torch.randint(0, 4, (B, Nq))
    offs = torch.tensor([[0, 3, 5], [0, 2, 5]])
    if case == "Nq=0":
        Nq, mem = 0, mem[:, :0]
    elif case == "Nkv=0":
        Nkv, offs = 0, torch.zeros(B, 3, dtype=torch.long)
    elif case == "R=0":
        mem, offs = torch.zeros(B, Nq, dtype=torch.long), torch.zeros(B, 1, dtype=torch.long)
    elif case == "H=0":
        H = 0
    else:
        mem = mem.to(torch.uint8)
    q, k, v = (torch.randn(B, H, n, D, device=KDEV, requires_grad=True) for n in (Nq, Nkv, Nkv))
    mem, offs = mem.to(KDEV), offs.to(KDEV)
    out = region_attention(q, k, v, mem, offs, backend="triton")
    ref = region_attention(*(t.detach().double().requires_grad_() for t in (q, k, v)), mem, offs, backend="torch")
    assert out.shape == (B, H, Nq, D)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or (torch.isfinite(g).all() and g.shape == t.shape) for g, t in zip(grads, (q, k, v)))


@needs_triton
def test_packed_form_with_no_tokens():
    k = torch.randn(2, 2, 5, 16, device=KDEV, requires_grad=True)
    q = torch.randn(0, 2, 16, device=KDEV, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long, device=KDEV)
    out = region_attention_packed(q, k, k, empty, empty, torch.tensor([[0, 3, 5], [0, 2, 5]], device=KDEV), backend="triton")
    assert out.shape == (0, 2, 16)
    (dk,) = torch.autograd.grad(out.sum(), (k,))
    assert torch.equal(dk, torch.zeros_like(dk))


# ---------------------------------------------------------------------------------------------
# The reference's token groups (the CPU path): slices where a layout is sorted, cached per layout
# ---------------------------------------------------------------------------------------------

from idflux.kernels.region_attention_ref import region_attention_packed_ref, token_groups  # noqa: E402


def test_token_groups_slices_spans_and_indices():
    offs = torch.tensor([[0, 3, 3, 7], [0, 2, 5, 5]])
    # image 0: two tokens of ref 0, a no-box token, refs 0+2 (spans touch through empty ref 1),
    # a token of the empty ref 1 only; image 1: refs 0+1 on non-adjacent rows.
    mem = torch.tensor([1, 1, 0, 5, 2, 3, 1, 3])
    img = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    groups = token_groups(mem, img, offs)
    got = [(b, rows if isinstance(rows, slice) else rows.tolist(), keys if isinstance(keys, slice) else keys.tolist())
           for b, rows, keys in groups]
    assert got == [(0, slice(0, 2), slice(0, 3)), (0, slice(3, 4), slice(0, 7)),
                   (1, slice(6, 7), slice(0, 2)), (1, [5, 7], slice(0, 5))]
    # refs 0 and 2 of image 1 in one pattern: two spans that do not touch -> an index tensor
    (_, _, keys), = token_groups(torch.tensor([5]), torch.tensor([0]), torch.tensor([[0, 2, 4, 6]]))
    assert keys.tolist() == [0, 1, 4, 5]
    assert token_groups(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), offs) == []


@pytest.mark.parametrize("sort", [False, True], ids=["scattered", "sorted"])
def test_packed_reference_matches_dense_sdpa_both_assemblies(sort):
    """Unsorted tokens take the index_copy assembly, tokens sorted by (image, pattern) the slice and
    concatenation one (with zero rows between and after groups); both equal SDPA with the mask."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, mem, offs = random_case(2, 3, 41, 16, [[6, 0, 5], [4, 9]], gen=gen)
    b_idx, t_idx = torch.arange(2).repeat_interleave(41), torch.arange(41).repeat(2)
    pm = mem[b_idx, t_idx]
    if sort:
        order = torch.argsort(pm, stable=True)
        order = order[torch.argsort(b_idx[order], stable=True)]
        b_idx, t_idx, pm = b_idx[order], t_idx[order], pm[order]
    qp = q[b_idx, :, t_idx].clone().requires_grad_()
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    groups = token_groups(pm, b_idx, offs)
    assert all(isinstance(r, slice) for _, r, _ in groups) == sort
    out = region_attention_packed(qp, kk, vv, pm, b_idx, offs, backend="torch")
    want, _ = sdpa_dense(q, k, v, mem, offs)
    torch.testing.assert_close(out, want[b_idx, :, t_idx], atol=2e-5, rtol=2e-5, msg="out")
    go = torch.randn(out.shape, generator=gen)
    out.backward(go)
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    full = torch.zeros_like(want)
    full[b_idx, :, t_idx] = go
    sdpa_dense(q2, k2, v2, mem, offs)[0].backward(full)
    for name, got, ref in (("dq", qp.grad, q2.grad[b_idx, :, t_idx]), ("dk", kk.grad, k2.grad), ("dv", vv.grad, v2.grad)):
        torch.testing.assert_close(got, ref, atol=5e-5, rtol=5e-5, msg=name)


def test_reference_groups_follow_in_place_layout_changes():
    q, k, v, mem, offs = random_case(1, 2, 30, 8, [[4, 5]])
    first = region_attention(q, k, v, mem, offs, backend="torch")
    mem[0, :10] = 3 - mem[0, :10].clamp(max=3)  # same tensor, new values: cached groups must not be reused
    second = region_attention(q, k, v, mem, offs, backend="torch")
    torch.testing.assert_close(second, sdpa_dense(q, k, v, mem, offs)[0], atol=2e-5, rtol=2e-5)
    assert not torch.equal(first, second)
    # the cached groups serve later calls with the same layout tensors, and agree with fresh ones
    again = region_attention_packed_ref(q[0].transpose(0, 1), k, v, mem[0], torch.zeros(30, dtype=torch.long), offs)
    torch.testing.assert_close(region_attention(q, k, v, mem, offs, backend="torch")[0].transpose(0, 1), again)


def _packed_case(gen):
    B, H, D, R, per = 2, 2, 16, 3, 5
    mem = torch.randint(0, 2 ** R, (B, 30), generator=gen)
    b_idx, t_idx = (mem != 0).nonzero(as_tuple=True)
    q = torch.randn(b_idx.numel(), H, D, generator=gen)
    k, v = (torch.randn(B, H, R * per, D, generator=gen) for _ in range(2))
    offs = (torch.arange(R + 1) * per).expand(B, -1).contiguous()
    return q, k, v, mem[b_idx, t_idx], b_idx, offs


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_checked_layout_from_host_copies_spares_the_first_call_its_read_back(backend):
    from sync_probe import assert_no_host_sync, host_syncs

    from idflux.kernels.region_attention import checked_layout

    gen = torch.Generator().manual_seed(3)
    q, k, v, pm, b_idx, offs = _packed_case(gen)
    call = lambda m, i, o: region_attention_packed(q, k, v, m, i, o, backend=backend)  # noqa: E731
    fresh = [t.clone() for t in (pm, b_idx, offs)]
    assert host_syncs(lambda: call(*fresh)), "an unchecked layout is read back on its first call"
    device = [t.clone() for t in (pm, b_idx, offs)]  # stand-ins for the GPU copies of (pm, b_idx, offs)
    checked_layout(device[0], device[2], k.shape[2], k.shape[0], image_index=device[1], host=(pm, b_idx, offs))
    if backend == "triton":
        assert_no_host_sync(lambda: call(*device))
    else:  # the reference path still groups tokens on its first call; only the value checks are spared
        assert not [w for _, w in host_syncs(lambda: call(*device)) if "_layout_entry" in w or "_check_layout_values" in w]
    torch.testing.assert_close(call(*device), call(pm, b_idx, offs))
    if backend == "triton":  # the dk/dv sizes taken from the host plan equal the device plan's own
        import importlib

        ra = importlib.import_module("idflux.kernels.region_attention")
        entry = ra._layout_entry("t", device[0], device[1], device[2], k.shape[2], offs.shape[1] - 1, k.shape[0])
        plan, hint = entry[("plan", ra._BLOCK_M)]
        sizes = ra._packed_plan(device[0], device[1], k.shape[0], offs.shape[1] - 1)[4]
        assert hint == ra._hint(plan[3], device[2], sizes)


def test_checked_layout_checks_the_host_values_and_shapes():
    from idflux.kernels.region_attention import checked_layout

    gen = torch.Generator().manual_seed(4)
    q, k, v, pm, b_idx, offs = _packed_case(gen)
    bad = pm.clone()
    bad[0] = 1 << 5  # a bit beyond R = 3
    with pytest.raises(ValueError, match="membership has bits beyond"):
        checked_layout(pm, offs, k.shape[2], k.shape[0], image_index=b_idx, host=(bad, b_idx, offs))
    with pytest.raises(ValueError, match="image_index must lie in"):
        checked_layout(pm, offs, k.shape[2], 1, image_index=b_idx, host=(pm, b_idx, offs))
    with pytest.raises(ValueError, match="host ref_offsets has shape"):
        checked_layout(pm, offs, k.shape[2], k.shape[0], image_index=b_idx, host=(pm, b_idx, offs[:1]))
    with pytest.raises(ValueError, match="host must hold an image_index"):
        checked_layout(pm, offs, k.shape[2], k.shape[0], image_index=b_idx, host=(pm, None, offs))
    checked_layout(pm, offs, k.shape[2], k.shape[0], image_index=b_idx)  # no host copies: the tensors themselves
    pm[0] = 1 << 5  # changed in place after the check: the next call checks again
    with pytest.raises(ValueError, match="membership has bits beyond"):
        region_attention_packed(q, k, v, pm, b_idx, offs, backend="torch")


# ---------------------------------------------------------------------------------------------
# Issue 15: masked keys contribute nothing (NaN included), in-place layout edits, bf16 on the
# interpreter, D = 0
# ---------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("poison", ["v", "k", "v_inf"])
@pytest.mark.parametrize("packed", [False, True])
def test_non_finite_keys_of_one_reference_stay_out_of_tokens_that_do_not_see_it(poison, packed):
    """Tokens of reference 0 and of reference 1 share a tile; reference 1's values (or keys) hold
    NaN / inf. The tokens that see only reference 0 must come out exactly as the reference computes
    them (finite), forward and every gradient, as on the torch path."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, mem, offs = random_case(1, 2, 20, 16, [[6, 5]], gen=gen, device=KDEV)
    mem[0] = torch.tensor([1, 2] * 10)  # one tile, both patterns
    bad = {"v": (v, float("nan")), "k": (k, float("nan")), "v_inf": (v, float("inf"))}[poison]
    bad[0][0, :, 7, 3] = bad[1]  # a key of reference 1
    if packed:
        qq = q[0].transpose(0, 1).clone()
        args = (mem[0], torch.zeros(20, dtype=torch.long, device=KDEV), offs)
        call = lambda a, b, c, backend: region_attention_packed(a, b, c, *args, backend=backend)  # noqa: E731
        rows = lambda t: t[mem[0] == 1]  # noqa: E731
    else:
        qq = q
        call = lambda a, b, c, backend: region_attention(a, b, c, mem, offs, backend=backend)  # noqa: E731
        rows = lambda t: t[:, :, mem[0] == 1]  # noqa: E731
    ours = [t.clone().requires_grad_() for t in (qq, k, v)]
    theirs = [t.detach().double().requires_grad_() for t in (qq, k, v)]
    out, ref = call(*ours, "triton"), call(*theirs, "torch")
    assert torch.isfinite(rows(ref)).all()
    torch.testing.assert_close(rows(out).double(), rows(ref), atol=2e-5, rtol=1e-4, msg="out of reference-0 tokens")
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(KDEV)
    g = torch.where(torch.isfinite(ref), g, torch.zeros_like(g))  # no upstream gradient through the poisoned rows
    got = torch.autograd.grad(out, ours, g.to(out.dtype))
    want = torch.autograd.grad(ref, theirs, g)
    torch.testing.assert_close(rows(got[0]).double(), rows(want[0]), atol=3e-5, rtol=1e-4, msg="dq of reference-0 tokens")
    for name, a, w in zip(("dk", "dv"), got[1:], want[1:]):
        torch.testing.assert_close(a[..., :6, :].double(), w[..., :6, :], atol=3e-5, rtol=1e-4, msg=f"{name} of reference 0")


@needs_triton
@pytest.mark.parametrize("what", ["ref_offsets", "membership"])
def test_in_place_layout_edit_after_a_triton_call_is_checked_again(what):
    """The layout cache keys on the tensors' version counters: an in-place edit after a first call
    is checked again, so the kernels never read past k/v with stale offsets."""
    q, k, v, mem, offs = random_case(1, 1, 6, 16, [[3, 2]], device=KDEV)
    region_attention(q, k, v, mem, offs, backend="triton")
    if what == "ref_offsets":
        offs[0, 2] = 40  # past Nkv = 5
        match = "ref_offsets must lie in"
    else:
        mem[0, 0] = 4  # bit 2, beyond R = 2
        match = "membership has bits beyond"
    with pytest.raises(ValueError, match=match):
        region_attention(q, k, v, mem, offs, backend="triton")
    b_idx = torch.zeros(6, dtype=torch.long, device=KDEV)
    with pytest.raises(ValueError, match=match):
        region_attention_packed(q[0].transpose(0, 1), k, v, mem[0], b_idx, offs, backend="triton")


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_bf16_on_the_interpreter_is_refused(monkeypatch, packed):
    from idflux.kernels import _backend

    monkeypatch.setattr(_backend, "INTERPRET", True)
    q, k, v, mem, offs = random_case(1, 1, 6, 16, [[3, 2]], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter.*bf16"):
        if packed:
            region_attention_packed(q[0].transpose(0, 1), k, v, mem[0], torch.zeros(6, dtype=torch.long), offs, backend="triton")
        else:
            region_attention(q, k, v, mem, offs, backend="triton")
    out = region_attention(q, k, v, mem, offs, backend="torch")  # the reference takes bf16
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_zero_head_dim_is_a_clear_error(backend):
    q, k, v = torch.randn(1, 2, 5, 0), torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 0)
    mem, offs = torch.ones(1, 5, dtype=torch.long), torch.tensor([[0, 4]])
    with pytest.raises(ValueError, match="head dim"):
        region_attention(q, k, v, mem, offs, backend=backend)
    with pytest.raises(ValueError, match="head dim"):
        region_attention_packed(q[0].transpose(0, 1), k, v, mem[0], torch.zeros(5, dtype=torch.long), offs, backend=backend)
