"""Exact PyTorch reference of region-constrained identity cross-attention.

Token i of image b attends, in one softmax, to the union of the key spans of the references whose
bit is set in ``membership[b, i]``; a token with no bit set gets 0. Tokens that share a membership
pattern attend to the same keys, so the reference groups them and runs one unmasked attention per
(image, pattern): no dense mask, and only in-box tokens cost anything. That makes it both the oracle
and a fast CPU path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pattern_keys(pattern: int, offsets: list[int]) -> list[int]:
    """Key positions attended by a token whose membership bitmask is ``pattern``."""
    keys: list[int] = []
    for r in range(len(offsets) - 1):
        if (pattern >> r) & 1:
            keys.extend(range(offsets[r], offsets[r + 1]))
    return keys


def region_attention_ref(q, k, v, membership, ref_offsets, scale=None):
    """Reference region attention. Shapes as :func:`idflux.kernels.region_attention`.

    Computes in fp32 (float64 stays float64) and returns ``q.dtype``. Assumes valid input.
    """
    B, H, Nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    offsets = ref_offsets.cpu().tolist()
    rows_all, outs = [], []
    for b in range(B):
        patterns, inverse = torch.unique(membership[b], return_inverse=True)
        for j, pattern in enumerate(patterns.tolist()):
            keys = pattern_keys(pattern, offsets[b]) if pattern else []
            if not keys:  # no bit, or bits only on empty references: nothing to attend to
                continue
            rows_t = (inverse == j).nonzero().squeeze(1)
            keys_t = torch.tensor(keys, device=q.device)
            qs = q[b, :, rows_t].to(acc)
            ks = k[b, :, keys_t].to(acc)
            vs = v[b, :, keys_t].to(acc)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale))  # (H, n_rows, D)
            rows_all.append(rows_t + b * Nq)
    out = q.new_zeros((B * Nq, H, D), dtype=acc)
    if not outs and B:
        # No token attends anywhere: keep the (all-zero) result in the autograd graph of q, k and v,
        # so backward gives zero gradients instead of "does not require grad".
        empty = (k[0, :, :0].sum() + v[0, :, :0].sum()).to(acc)
        outs.append(q[0, :, :0].to(acc) + empty)
        rows_all.append(torch.zeros(0, dtype=torch.long, device=q.device))
    if outs:
        o = torch.cat(outs, dim=1).transpose(0, 1)  # (rows, H, D)
        out = out.index_copy(0, torch.cat(rows_all), o)
    return out.view(B, Nq, H, D).transpose(1, 2).to(q.dtype)


def region_attention_packed_ref(q, k, v, membership, image_index, ref_offsets, scale=None):
    """Reference of the packed form: q (T, H, D) in-box tokens of several images, membership (T,),
    image_index (T,); k, v (B, H, Nkv, D). Returns (T, H, D)."""
    out = torch.zeros_like(q, dtype=torch.promote_types(q.dtype, torch.float32))
    for b in image_index.unique().tolist():
        rows = (image_index == b).nonzero().squeeze(1)
        qb = q[rows].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
        ob = region_attention_ref(qb, k[b : b + 1], v[b : b + 1], membership[rows].unsqueeze(0), ref_offsets[b : b + 1], scale)
        out = out.index_copy(0, rows, ob[0].transpose(0, 1).to(out.dtype))
    return out.to(q.dtype)


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
