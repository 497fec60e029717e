"""Exact PyTorch reference of region-constrained identity cross-attention.

Token i of image b attends, in one softmax, to the union of the key spans of the references whose
bit is set in ``membership[b, i]``; a token with no bit set gets 0. Tokens that share a membership
pattern attend to the same keys, so the reference groups them and runs one unmasked attention per
(image, pattern): no dense mask, and only in-box tokens cost anything. That makes it both the oracle
and a fast CPU path.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _pattern_spans(pattern: int, offsets: list[int]) -> list[tuple[int, int]]:
    """The key spans of ``pattern``'s references, empty ones dropped and touching ones merged."""
    spans: list[tuple[int, int]] = []
    for r in range(len(offsets) - 1):
        s, e = offsets[r], offsets[r + 1]
        if (pattern >> r) & 1 and e > s:
            if spans and spans[-1][1] == s:
                spans[-1] = (spans[-1][0], e)
            else:
                spans.append((s, e))
    return spans


def token_groups(membership, image_index, ref_offsets) -> list[tuple]:
    """Tokens grouped by (image, membership pattern), with the keys each group attends to.

    membership (T,) integer bitmask, image_index (T,) in [0, B), ref_offsets (B, R+1). Returns a list
    of (b, rows, keys), one per group that attends to at least one key, in (image, pattern) order:
    ``rows`` (the group's tokens, ascending) and ``keys`` are slices where contiguous (views, no
    gather: a layout sorted by pattern, as the engine's, has contiguous groups; a one-reference
    pattern has one key span), int64 index tensors on membership's device otherwise. Reads the
    values on the host: the CPU path, computed once per layout by the public ops.
    """
    dev = membership.device
    mem = membership.reshape(-1).long().cpu()
    img = image_index.reshape(-1).long().cpu()
    offsets = ref_offsets.long().cpu().tolist()
    if mem.numel() == 0:
        return []
    pairs, inverse = torch.unique(torch.stack([img, mem], 1), dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=pairs.shape[0]).tolist()
    groups, start = [], 0
    for (b, pattern), n in zip(pairs.tolist(), counts):
        rows, start = order[start:start + n], start + n
        spans = _pattern_spans(pattern, offsets[b]) if pattern else []
        if not spans:  # no bit, or bits only on empty references: nothing to attend to
            continue
        if len(spans) == 1:
            keys = slice(*spans[0])
        else:
            keys = torch.cat([torch.arange(s, e) for s, e in spans]).to(dev)
        first = int(rows[0])
        rows = slice(first, first + n) if int(rows[-1]) - first + 1 == n else rows.to(dev)
        groups.append((b, rows, keys))
    return groups


def dense_token_groups(membership, ref_offsets) -> list[tuple]:
    """:func:`token_groups` of a dense layout, membership (B, Nq): token ``b * Nq + i`` is in image b."""
    B, Nq = membership.shape
    image_index = torch.arange(B * Nq, device=membership.device) // max(Nq, 1)
    return token_groups(membership.reshape(-1), image_index, ref_offsets)


def _grouped_attention(q, k, v, groups, acc, scale):
    """(T, H, D) attention output of the packed queries q, one unmasked SDPA per group; rows of no
    group are 0.

    The groups' queries come out of q in one operation (a split when every group is a slice, else
    one index_select), so the backward writes q's gradient once instead of one q-sized buffer per
    group."""
    T, H, D = q.shape
    if not groups:
        # No token attends anywhere: keep the (all-zero) result in the autograd graph of q, k and v,
        # so backward gives zero gradients instead of "does not require grad".
        empty = (k[:, :, :0].sum() + v[:, :, :0].sum() + q[:0].sum()).to(acc)  # 0, in the graph
        return q.new_zeros((T, H, D), dtype=acc) + empty
    contiguous = all(isinstance(rows, slice) for _, rows, _ in groups)
    if contiguous:
        groups = sorted(groups, key=lambda g: g[1].start)
        sizes, is_group, at = [], [], 0  # the groups and the gaps between them tile [0, T)
        for _, rows, _ in groups:
            if rows.start > at:
                sizes.append(rows.start - at)
                is_group.append(False)
            sizes.append(rows.stop - rows.start)
            is_group.append(True)
            at = rows.stop
        if at < T:
            sizes.append(T - at)
            is_group.append(False)
        parts = q.split(sizes)
        queries = [p for p, g in zip(parts, is_group) if g]
    else:
        rows = [torch.arange(r.start, r.stop, device=q.device) if isinstance(r, slice) else r for _, r, _ in groups]
        index = torch.cat(rows)
        queries = q.index_select(0, index).split([r.numel() for r in rows])
    outs = []
    # PyTorch's fused SDPA returns 0 for a row whose every score is NaN or -inf (it takes the row
    # for fully masked), where softmax gives NaN: with a non-finite key (a poisoned reference) the
    # groups take the math kernel, so a token that sees NaN gets NaN, as in the Triton kernels.
    # (One reduction over k per call; a host sync on CUDA, where backend="torch" is opt-in.)
    ieee = not bool(torch.isfinite(k).all())
    with (sdpa_kernel(SDPBackend.MATH) if ieee else contextlib.nullcontext()):
        for (b, _, keys), qs in zip(groups, queries):
            # 4-D (1, H, n, D): the rank SDPA's fused CPU kernel takes (3-D goes to the slower math path).
            qs = qs.transpose(0, 1).to(acc)[None]
            ks, vs = k[b, :, keys].to(acc)[None], v[b, :, keys].to(acc)[None]
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    if contiguous:  # one concatenation with zero rows in the gaps, no scatter
        it = iter(outs)
        return torch.cat([next(it) if g else q.new_zeros((n, H, D), dtype=acc) for n, g in zip(sizes, is_group)])
    return q.new_zeros((T, H, D), dtype=acc).index_copy(0, index, torch.cat(outs))


def region_attention_packed_ref(q, k, v, membership, image_index, ref_offsets, scale=None, groups=None):
    """Reference of the packed form: q (T, H, D) in-box tokens of several images, membership (T,),
    image_index (T,); k, v (B, H, Nkv, D). Returns (T, H, D) in q's dtype, computed in fp32
    (float64 stays float64). One unmasked attention per (image, pattern) group; ``groups`` is
    :func:`token_groups` of the layout when the caller has it already. Assumes valid input."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    if groups is None:
        groups = token_groups(membership, image_index, ref_offsets)
    return _grouped_attention(q, k, v, groups, acc, scale).to(q.dtype)


def region_attention_ref(q, k, v, membership, ref_offsets, scale=None, groups=None):
    """Reference region attention. Shapes as :func:`idflux.kernels.region_attention`.

    Computes in fp32 (float64 stays float64) and returns ``q.dtype``: the packed reference on the
    B * Nq tokens. ``groups``: :func:`dense_token_groups` of the layout when the caller has it.
    Assumes valid input.
    """
    B, H, Nq, D = q.shape
    if groups is None:
        groups = dense_token_groups(membership, ref_offsets)
    # One transposed copy of q, then row gathers from it: ~2x faster on the CPU than gathering each
    # group from the (B, H, Nq, D) strides.
    qp = q.transpose(1, 2).reshape(B * Nq, H, D)
    out = region_attention_packed_ref(qp, k, v, None, None, ref_offsets, scale, groups)
    return out.view(B, Nq, H, D).transpose(1, 2)


def dense_mask_from_membership(membership, ref_offsets, n_kv: int):
    """(B, Nq, Nkv) boolean mask equivalent to ``membership`` / ``ref_offsets`` (for oracles and baselines)."""
    B, _ = membership.shape
    R = ref_offsets.shape[1] - 1
    pos = torch.arange(n_kv, device=membership.device)
    # owner[b, j] = reference owning key j (R if none)
    owner = torch.full((B, n_kv), R, dtype=torch.long, device=membership.device)
    for r in range(R - 1, -1, -1):
        inside = (pos >= ref_offsets[:, r : r + 1]) & (pos < ref_offsets[:, r + 1 : r + 2])
        owner = torch.where(inside, torch.full_like(owner, r), owner)
    bits = (membership.long()[:, :, None] >> owner.clamp(max=62)[:, None, :]) & 1
    return (bits == 1) & (owner[:, None, :] < R)
