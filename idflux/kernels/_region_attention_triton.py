"""Triton kernels of region attention: block-sparse forward and backward, the mask never built.

One program = one query tile (BLOCK_M tokens of one image) x one head. The tile tests each
reference's bit over its tokens and visits only the key blocks of references that at least one of
its tokens belongs to; a tile with no member token writes zeros and stops. References own disjoint
key spans, so the union of a token's references is visited once, in one online softmax.

LSE convention (log2 units, scale folded in): a row with no key gets LSE = +inf, so every
recomputed probability exp2(s - LSE) of that row is exactly 0 in the backward (s is -inf or finite,
never +inf), without NaN.

Backward: the same tiling over queries (with 8-264 keys per reference, splitting by key blocks
would leave most SMs idle); dq is written per tile, dk/dv are accumulated with fp32 atomics.

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
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d[None, :], mask=io_mask, other=0.0)
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
                k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                valid = (bit[:, None] == 1) & col_mask[None, :]
                s = tl.where(valid, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
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
    PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    # DQ has q's layout (stride_g*); DK and DV are fp32 accumulators of k's shape (stride_a*).
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
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dn + d[None, :], mask=io_mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + d[None, :], mask=io_mask, other=0.0)
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
                k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)
                valid = (bit[:, None] == 1) & col_mask[None, :]
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(valid, s * qk_scale, float("-inf"))
                p = tl.exp2(s - lse[:, None])
                if IEEE:
                    dv = tl.dot(tl.trans(p), do, input_precision="ieee")
                    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                else:
                    dv = tl.dot(tl.trans(p.to(do.dtype)), do)
                    dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None]) * sm_scale
                if IEEE:
                    dq += tl.dot(ds, k, input_precision="ieee")
                    dk = tl.dot(tl.trans(ds), q, input_precision="ieee")
                else:
                    dq += tl.dot(ds.to(k.dtype), k)
                    dk = tl.dot(tl.trans(ds.to(q.dtype)), q)
                acc_off = b * stride_ab + h * stride_ah + cols[:, None] * stride_an + d[None, :]
                tl.atomic_add(DK + acc_off, dk, mask=kv_mask)
                tl.atomic_add(DV + acc_off, dv, mask=kv_mask)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)
