"""Region-constrained identity cross-attention: ``region_attention``.

Image token i of image b attends, in one softmax, to the identity tokens of every reference whose
box it lies in; a token in no box receives exactly 0 (and 0 gradient). The mask is never built:
a per-token bitmask (``membership``) and each reference's key span (``ref_offsets``) are all the
op needs.
"""

from __future__ import annotations

import math

import torch

from idflux.kernels._backend import resolve_backend
from idflux.kernels.region_attention_ref import region_attention_ref

#: References per image the PyTorch reference handles (bits of an int64 bitmask).
MAX_REFS_TORCH = 62

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_inputs(q, k, v, membership, ref_offsets, scale, max_refs: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("membership", membership), ("ref_offsets", ref_offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"region_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"region_attention: {name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"region_attention: {name} must be a float tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"region_attention: q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them")
    B, H, Nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"region_attention: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"region_attention: k must be (B, H, Nkv, D) = ({B}, {H}, Nkv, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    for name, t in (("k", k), ("v", v), ("membership", membership), ("ref_offsets", ref_offsets)):
        if t.device != q.device:
            raise ValueError(f"region_attention: {name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    if membership.dtype not in _INT_DTYPES:
        raise ValueError(f"region_attention: membership must be an integer bitmask tensor, got {membership.dtype}")
    if membership.shape != (B, Nq):
        raise ValueError(f"region_attention: membership must be (B, Nq) = ({B}, {Nq}), got {tuple(membership.shape)}")
    if ref_offsets.dtype not in _INT_DTYPES:
        raise ValueError(f"region_attention: ref_offsets must be an integer tensor, got {ref_offsets.dtype}")
    if ref_offsets.dim() != 2 or ref_offsets.shape[0] != B or ref_offsets.shape[1] < 1:
        raise ValueError(f"region_attention: ref_offsets must be (B, R+1) with B = {B}, got {tuple(ref_offsets.shape)}")
    R = ref_offsets.shape[1] - 1
    if R > max_refs:
        raise ValueError(
            f"region_attention: ref_offsets describes R = {R} references per image; this backend supports at most "
            f"{max_refs} (split the references over several calls, or use backend='torch' which takes up to {MAX_REFS_TORCH})"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"region_attention: scale must be a positive finite number or None (1/sqrt(D)), got {scale!r}")
    # Data checks (one host sync on CUDA).
    offs = ref_offsets.long()
    Nkv = k.shape[2]
    if B and ((offs < 0).any() or (offs > Nkv).any()):
        raise ValueError(f"region_attention: ref_offsets must lie in [0, Nkv={Nkv}], got {ref_offsets.tolist()}")
    if R and (offs[:, 1:] < offs[:, :-1]).any():
        raise ValueError(
            f"region_attention: ref_offsets must be non-decreasing along each row (an image with fewer references "
            f"repeats its last offset), got {ref_offsets.tolist()}"
        )
    mem = membership.long()
    if mem.numel() and ((mem < 0).any() or (mem >> R).any()):
        bad = mem[(mem < 0) | ((mem >> R) != 0)][0].item()
        raise ValueError(
            f"region_attention: membership has bits beyond the R = {R} references of ref_offsets (e.g. value {bad}); "
            f"bit r must be < R"
        )


def region_attention(q, k, v, membership, ref_offsets, *, scale=None, backend="auto"):
    """Attention of image tokens to the identity tokens of the references whose box holds them.

    Args:
        q: (B, H, Nq, D) image-token queries, fp32 / fp16 / bf16 (fp64 on the torch backend).
        k, v: (B, H, Nkv, D) identity tokens of up to R references laid end to end.
        membership: (B, Nq) integer bitmask; bit r set when token i lies in reference r's box.
        ref_offsets: (B, R+1) integer; reference r of image b owns keys
            [ref_offsets[b, r], ref_offsets[b, r+1]). An image with fewer references repeats its
            last offset (empty spans).
        scale: softmax scale, default 1/sqrt(D).
        backend: "auto" (Triton on CUDA, reference otherwise), "triton" or "torch".

    Returns:
        (B, H, Nq, D) in q's dtype. Token i attends in one softmax to the union of the spans of its
        set bits; a token with no bit set (or whose references are all empty) gets exactly 0 output
        and 0 gradient. Differentiable in q, k and v.

    Example:
        >>> q = torch.randn(1, 2, 5, 8); k = v = torch.randn(1, 2, 6, 8)
        >>> membership = torch.tensor([[0, 1, 2, 3, 1]])          # token 3 sees both references
        >>> offsets = torch.tensor([[0, 4, 6]])                    # ref 0: keys 0-3, ref 1: keys 4-5
        >>> region_attention(q, k, v, membership, offsets, backend="torch").shape
        torch.Size([1, 2, 5, 8])
    """
    impl = resolve_backend("region_attention", backend, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))
    _check_inputs(q, k, v, membership, ref_offsets, scale, MAX_REFS_TORCH)
    if impl == "triton":
        raise NotImplementedError("region_attention: the Triton kernel is not built yet; use backend='torch'")
    return region_attention_ref(q, k, v, membership, ref_offsets, scale)
