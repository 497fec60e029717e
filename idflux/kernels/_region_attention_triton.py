"""Triton kernels of region attention: block-sparse forward and backward, the mask never built.

One program = one query tile (BLOCK_M tokens of one image) x one head. The tile tests each
reference's bit over its tokens and visits only the key blocks of references that at least one of
its tokens belongs to; a tile with no member token writes zeros and stops. References own disjoint
key spans, so the union of a token's references is visited once, in one online softmax.

LSE convention (log2 units, scale folded in): a row with no key gets LSE = +inf, so every
recomputed probability exp2(s - LSE) of that row is exactly 0 in the backward (s is -inf or finite,
never +inf), without NaN.

Backward: dq from the same tiling over queries (one program per query tile and head); dk/dv from
one program per key block of a reference and head, which walks its image's query tiles and skips
those with no token in that box, accumulating in registers and storing once (no atomics: with
8-264 keys per reference, atomics from every query tile all hit the same few cache lines). The
atomic variant (every query tile adds into fp32 dk/dv) stays selectable for tuning runs.

Dense and packed forms share both kernels: packed rows (in-box tokens of several images, (T, H, D))
are read through a permutation that groups them by image, with a per-tile (image, first, end) table.

Written in the Triton subset that 3.6 compiles and 3.9 interprets: pointer arithmetic with masks,
no block pointers, fixed configs.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile_rows(TILES, PERM, pid_m, tiles_per_image, Nq, BLOCK_M: tl.constexpr, PACKED: tl.constexpr):
    offs = tl.arange(0, BLOCK_M)
    if PACKED:
        b = tl.load(TILES + pid_m * 3).to(tl.int64)
        r0 = tl.load(TILES + pid_m * 3 + 1)
        r1 = tl.load(TILES + pid_m * 3 + 2)
        idx = r0 + offs
        row_mask = idx < r1
        rows = tl.load(PERM + idx, mask=row_mask, other=0).to(tl.int64)
    else:
        b = (pid_m // tiles_per_image).to(tl.int64)
        rows = ((pid_m % tiles_per_image) * BLOCK_M + offs).to(tl.int64)
        row_mask = rows < Nq
    return b, rows, row_mask


@triton.jit
def _rows(PTR, b, h, idx, d, mask, stride_b, stride_h, stride_n):
    """The (len(idx), BLOCK_D) rows ``idx`` of head h of image b; masked lanes read 0."""
    return tl.load(PTR + b * stride_b + h * stride_h + idx[:, None] * stride_n + d[None, :], mask=mask, other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: exact fp32 products for fp32 inputs (no TF32), otherwise ``a``
    cast to ``b``'s dtype (probabilities and score gradients meet bf16/fp16 operands)."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def _scores(q, k, valid, qk_scale, IEEE: tl.constexpr):
    """q k^T in log2 units (scale folded in), -inf where the token may not see the key."""
    return tl.where(valid, _dot(q, tl.trans(k), IEEE) * qk_scale, float("-inf"))



# Sizes vary from call to call (token counts, references): compile once, not per value.
_DYNAMIC = ["Nq", "tiles_per_image", "R", "D"]


@triton.jit(do_not_specialize=_DYNAMIC)
def _region_attention_fwd(
    Q, K, V, O, LSE, MEM, OFFS, TILES, PERM,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_fb,
    Nq, tiles_per_image, R, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b, rows, row_mask = _tile_rows(TILES, PERM, pid_m, tiles_per_image, Nq, BLOCK_M, PACKED)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    io_mask = row_mask[:, None] & d_mask[None, :]
    mem = tl.load(MEM + b * stride_mb + rows * stride_mn, mask=row_mask, other=0)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + d[None, :]
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + rows
    if tl.max(mem, axis=0) == 0:
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty), mask=io_mask)
        tl.store(lse_ptrs, tl.full([BLOCK_M], float("inf"), tl.float32), mask=row_mask)
        return
    q = _rows(Q, b, h, rows, d, io_mask, stride_qb, stride_qh, stride_qn)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    for r in range(R):
        bit = (mem >> r) & 1
        if tl.max(bit, axis=0) > 0:
            start = tl.load(OFFS + b * stride_fb + r)
            end = tl.load(OFFS + b * stride_fb + r + 1)
            for n0 in range(start, end, BLOCK_N):
                cols = (n0 + n_off).to(tl.int64)
                col_mask = cols < end
                kv_mask = col_mask[:, None] & d_mask[None, :]
                k = _rows(K, b, h, cols, d, kv_mask, stride_kb, stride_kh, stride_kn)
                v = _rows(V, b, h, cols, d, kv_mask, stride_vb, stride_vh, stride_vn)
                valid = (bit[:, None] == 1) & col_mask[None, :]
                s = _scores(q, k, valid, qk_scale, IEEE)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + _dot(p, v, IEEE)
                m_i = m_new
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptrs, tl.where(has, m_i + tl.log2(l_safe), float("inf")), mask=row_mask)


@triton.jit(do_not_specialize=_DYNAMIC)
def _region_attention_bwd(
    Q, K, V, O, DO, DQ, DK, DV, LSE, MEM, OFFS, TILES, PERM,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_db, stride_dh, stride_dn,
    stride_gb, stride_gh, stride_gn,
    stride_ab, stride_ah, stride_an,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_fb,
    Nq, tiles_per_image, R, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, IEEE: tl.constexpr, ATOMIC_DKDV: tl.constexpr,
):
    # DQ has q's layout (stride_g*). With ATOMIC_DKDV, DK and DV are fp32 accumulators of k's shape
    # (stride_a*) that every query tile adds into; without it this kernel computes dq only and
    # _region_attention_bwd_dkdv produces dk and dv.
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b, rows, row_mask = _tile_rows(TILES, PERM, pid_m, tiles_per_image, Nq, BLOCK_M, PACKED)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    io_mask = row_mask[:, None] & d_mask[None, :]
    mem = tl.load(MEM + b * stride_mb + rows * stride_mn, mask=row_mask, other=0)
    dq_ptrs = DQ + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + d[None, :]
    if tl.max(mem, axis=0) == 0:
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty), mask=io_mask)
        return
    q = _rows(Q, b, h, rows, d, io_mask, stride_qb, stride_qh, stride_qn)
    do = _rows(DO, b, h, rows, d, io_mask, stride_db, stride_dh, stride_dn)
    o = _rows(O, b, h, rows, d, io_mask, stride_ob, stride_oh, stride_on)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows, mask=row_mask, other=float("inf"))
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    for r in range(R):
        bit = (mem >> r) & 1
        if tl.max(bit, axis=0) > 0:
            start = tl.load(OFFS + b * stride_fb + r)
            end = tl.load(OFFS + b * stride_fb + r + 1)
            for n0 in range(start, end, BLOCK_N):
                cols = (n0 + n_off).to(tl.int64)
                col_mask = cols < end
                kv_mask = col_mask[:, None] & d_mask[None, :]
                k = _rows(K, b, h, cols, d, kv_mask, stride_kb, stride_kh, stride_kn)
                v = _rows(V, b, h, cols, d, kv_mask, stride_vb, stride_vh, stride_vn)
                valid = (bit[:, None] == 1) & col_mask[None, :]
                p = tl.exp2(_scores(q, k, valid, qk_scale, IEEE) - lse[:, None])
                ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None]) * sm_scale
                dq += _dot(ds, k, IEEE)
                if ATOMIC_DKDV:
                    dv = _dot(tl.trans(p), do, IEEE)
                    dk = _dot(tl.trans(ds), q, IEEE)
                    acc_off = b * stride_ab + h * stride_ah + cols[:, None] * stride_an + d[None, :]
                    tl.atomic_add(DK + acc_off, dk, mask=kv_mask)
                    tl.atomic_add(DV + acc_off, dv, mask=kv_mask)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=_DYNAMIC + ["n_tiles", "NB"])
def _region_attention_bwd_dkdv(
    Q, K, V, O, DO, DK, DV, LSE, MEM, OFFS, TILES, PERM,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_db, stride_dh, stride_dn,
    stride_gb, stride_gh, stride_gn,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_fb,
    Nq, tiles_per_image, n_tiles, R, NB, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    """dk, dv of one key block (BLOCK_N keys of reference r of image b) x one head: it walks the
    query tiles of its image, skips tiles with no token in box r, and accumulates in registers.
    Each key belongs to exactly one program, so dk/dv are stored once, without atomics (with
    8-264 keys per reference, atomics from every query tile would all hit the same few lines).
    DK/DV (stride_g*) are zero-initialised: keys no reference owns keep a zero gradient."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (pid // (R * NB)).to(tl.int64)
    r = (pid // NB) % R
    j = pid % NB
    end = tl.load(OFFS + b * stride_fb + r + 1)
    start = tl.load(OFFS + b * stride_fb + r) + j * BLOCK_N
    if start >= end:
        return
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = cols < end
    kv_mask = col_mask[:, None] & d_mask[None, :]
    k = _rows(K, b, h, cols, d, kv_mask, stride_kb, stride_kh, stride_kn)
    v = _rows(V, b, h, cols, d, kv_mask, stride_vb, stride_vh, stride_vn)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if PACKED:
        n_walk = n_tiles
    else:
        n_walk = tiles_per_image
    for t in range(n_walk):
        if PACKED:
            tb, rows, row_mask = _tile_rows(TILES, PERM, t, tiles_per_image, Nq, BLOCK_M, PACKED)
            same = tl.zeros([BLOCK_M], tl.int64) + tb  # broadcast the tile's image over its rows
            row_mask = row_mask & (same == b)
        else:
            tb, rows, row_mask = _tile_rows(TILES, PERM, b * tiles_per_image + t, tiles_per_image, Nq, BLOCK_M, PACKED)
        mem = tl.load(MEM + b * stride_mb + rows * stride_mn, mask=row_mask, other=0)
        bit = (mem >> r) & 1
        if tl.max(bit, axis=0) > 0:
            io_mask = row_mask[:, None] & d_mask[None, :]
            q = _rows(Q, b, h, rows, d, io_mask, stride_qb, stride_qh, stride_qn)
            do = _rows(DO, b, h, rows, d, io_mask, stride_db, stride_dh, stride_dn)
            o = _rows(O, b, h, rows, d, io_mask, stride_ob, stride_oh, stride_on)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows, mask=row_mask, other=float("inf"))
            valid = (bit[:, None] == 1) & col_mask[None, :]
            p = tl.exp2(_scores(q, k, valid, qk_scale, IEEE) - lse[:, None])
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None]) * sm_scale
            dv += _dot(tl.trans(p), do, IEEE)
            dk += _dot(tl.trans(ds), q, IEEE)
    out = b * stride_gb + h * stride_gh + cols[:, None] * stride_gn + d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)
