"""Triton kernels of region attention: block-sparse forward and backward, the mask never built.

Both public forms (dense (B, H, Nq, D) and packed (T, H, D)) run on one *tile plan* computed on the
device from the layout (see ``region_attention.build_plan``): the tokens that lie in at least one
box, grouped by image and, inside an image, sorted by membership pattern, cut into *work tiles* of
BLOCK_M rows that never cross images. A tile is (image, first, end) into ``ROWS`` (the row of each
token in q's layout). Sorting by pattern makes most tiles hold one pattern, so a tile visits only
the key blocks of its few references and nearly every row of it does useful work. Tokens in no box
form "zero tiles" after the work tiles: an eager launch (which knows the number of work tiles)
runs the work tiles only and takes those rows' zeros from the output's allocation; a launch under
torch.compile runs every tile, and the zero tiles store 0 (output, dq) and +inf (LSE).

Key blocking: a reference's span is BLOCK_N-key blocks loaded without a key mask, then its tail in
TAIL_N-key blocks (264 keys = 4 x 64 + one block of 16, where a fifth 64-key block wasted 17% of the
products).

Forward: one program = one tile x one head; flash-attention online softmax over the key blocks of
the references that at least one of its tokens belongs to (references own disjoint key spans, so a
token's union of references is visited once, in one softmax).

LSE convention (log2 units, scale folded in): a row with no key gets LSE = +inf, so every
recomputed probability exp2(s - LSE) of that row is exactly 0 in the backward (s is -inf or finite,
never +inf), without NaN. Masked keys contribute nothing, NaN included: a row outside box r has
p = 0 for r's keys, but 0 * NaN = NaN, so the products p @ v and ds @ k of such rows are selected
away (``tl.where``), not added, and ds is zeroed outside the valid pairs.

Backward: dq from the same tiling (one program per tile and head; it also stores
delta = rowsum(dO * O)); dk/dv either from one program per key block of a reference and head, which
walks only the tiles that hold a token of that reference (a per-(image, reference) tile list from
the plan), accumulates in registers and stores once, without atomics ("key_parallel"), or in the
same kernel as dq, every tile adding its dk/dv into fp32 buffers ("atomic": QK^T and dO V^T
computed once, one launch; what ``BWD_DKDV="auto"`` takes when the key blocks are too few to fill
the GPU, the ArcFace branch's 8-key references).

HEAD_D is a compile-time constant: with HEAD_D == BLOCK_D (64, 128) the feature mask folds away and
rows load as 16-byte vectors; a runtime head dim would make every load scalar.

Written in the Triton subset that 3.6 compiles and 3.9 interprets: pointer arithmetic with masks,
no block pointers, fixed configs (``python -m idflux.bench_perf.ptx --regs`` reports registers and
spills per kernel under ptxas).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile_rows(TILES, ROWS, t, BLOCK_M: tl.constexpr):
    """Image, rows (in q's layout) and row mask of plan tile t."""
    b = tl.load(TILES + t * 3).to(tl.int64)
    r0 = tl.load(TILES + t * 3 + 1)
    r1 = tl.load(TILES + t * 3 + 2)
    idx = r0 + tl.arange(0, BLOCK_M)
    row_mask = idx < r1
    rows = tl.load(ROWS + idx, mask=row_mask, other=0).to(tl.int64)
    return b, rows, row_mask


@triton.jit
def _rows(PTR, b, h, idx, d, mask, stride_b, stride_h, stride_n):
    """The (len(idx), BLOCK_D) rows ``idx`` of head h of image b; masked lanes read 0."""
    return tl.load(PTR + b * stride_b + h * stride_h + idx[:, None] * stride_n + d[None, :], mask=mask, other=0.0)


@triton.jit
def _key_block(K, V, b, h, n0, end, d, d_mask, bit, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_COLS: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) of head h of image b: (cols, col_mask, k, v, valid), valid = which
    (row, key) pairs a row of membership bit ``bit`` may see. MASK_COLS: the block may run past
    ``end`` (a span's tail); otherwise it lies inside the span and loads without a key mask."""
    cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = cols < end
    if MASK_COLS:
        kv_mask = col_mask[:, None] & d_mask[None, :]
        valid = (bit[:, None] == 1) & col_mask[None, :]
    else:
        kv_mask = tl.broadcast_to(d_mask[None, :], (BLOCK_N, BLOCK_D))
        valid = tl.broadcast_to(bit[:, None] == 1, (BLOCK_M, BLOCK_N))
    k = _rows(K, b, h, cols, d, kv_mask, stride_kb, stride_kh, stride_kn)
    v = _rows(V, b, h, cols, d, kv_mask, stride_vb, stride_vh, stride_vn)
    return cols, col_mask, k, v, valid


@triton.jit
def _full_end(start, end, BLOCK_N: tl.constexpr):
    """End of the whole BLOCK_N-key blocks of span [start, end); the rest goes in TAIL_N-key blocks."""
    return start + (end - start) // BLOCK_N * BLOCK_N


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


@triton.jit
def _fwd_step(q, m_i, l_i, acc, bit, K, V, b, h, n0, end, d, d_mask, stride_kb, stride_kh, stride_kn, stride_vb,
              stride_vh, stride_vn, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_COLS: tl.constexpr,
              IEEE: tl.constexpr):
    """One key block of the forward's online softmax: the updated (m_i, l_i, acc)."""
    cols, col_mask, k, v, valid = _key_block(K, V, b, h, n0, end, d, d_mask, bit, stride_kb, stride_kh, stride_kn,
                                             stride_vb, stride_vh, stride_vn, BLOCK_M, BLOCK_N, q.shape[1], MASK_COLS)
    s = _scores(q, k, valid, qk_scale, IEEE)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # Rows outside box r have p = 0, but 0 * NaN = NaN: a non-finite value of r must not reach
    # them, so their product is dropped, not added.
    acc = acc * alpha[:, None] + tl.where(bit[:, None] == 1, _dot(p, v, IEEE), 0.0)
    return m_new, l_i, acc


@triton.jit
def _dq_step(q, do, lse, delta, dq, bit, K, V, DK, DV, b, h, n0, end, d, d_mask, stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn, stride_ab, stride_ah, stride_an, qk_scale, sm_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_COLS: tl.constexpr, IEEE: tl.constexpr,
             ATOMIC_DKDV: tl.constexpr):
    """One key block of the tile-parallel backward: the updated dq (and, ATOMIC_DKDV, this block's
    dk/dv added into the fp32 accumulators)."""
    cols, col_mask, k, v, valid = _key_block(K, V, b, h, n0, end, d, d_mask, bit, stride_kb, stride_kh, stride_kn,
                                             stride_vb, stride_vh, stride_vn, BLOCK_M, BLOCK_N, q.shape[1], MASK_COLS)
    p = tl.exp2(_scores(q, k, valid, qk_scale, IEEE) - lse[:, None])
    # where(valid): a row with a NaN output (it sees a non-finite value elsewhere) has a NaN delta,
    # and 0 * NaN must not reach the keys it does not see; the row select keeps a non-finite key
    # out of the rows that do not see it (as in the forward)
    ds = tl.where(valid, p * (_dot(do, tl.trans(v), IEEE) - delta[:, None]) * sm_scale, 0.0)
    dq += tl.where(bit[:, None] == 1, _dot(ds, k, IEEE), 0.0)
    if ATOMIC_DKDV:
        dv = _dot(tl.trans(p), do, IEEE)
        dk = _dot(tl.trans(ds), q, IEEE)
        acc_off = b * stride_ab + h * stride_ah + cols[:, None] * stride_an + d[None, :]
        kv_mask = col_mask[:, None] & d_mask[None, :]
        tl.atomic_add(DK + acc_off, dk, mask=kv_mask, sem="relaxed")
        tl.atomic_add(DV + acc_off, dv, mask=kv_mask, sem="relaxed")
    return dq


# Reference counts vary from call to call: compile once, not per value.
_DYNAMIC = ["R"]


@triton.jit(do_not_specialize=_DYNAMIC)
def _region_attention_fwd(
    Q, K, V, O, LSE, MEM, OFFS, TILES, ROWS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_fb,
    R, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b, rows, row_mask = _tile_rows(TILES, ROWS, pid_m, BLOCK_M)
    mem = tl.load(MEM + b * stride_mb + rows * stride_mn, mask=row_mask, other=0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_D
    io_mask = row_mask[:, None] & d_mask[None, :]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + d[None, :]
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + rows
    if tl.max(mem, axis=0) == 0:  # a zero tile (tokens in no box) or an unused one (no rows)
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=O.dtype.element_ty), mask=io_mask)
        tl.store(lse_ptrs, tl.full([BLOCK_M], float("inf"), tl.float32), mask=row_mask)
        return
    q = _rows(Q, b, h, rows, d, io_mask, stride_qb, stride_qh, stride_qn)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(R):
        bit = (mem >> r) & 1
        if tl.max(bit, axis=0) > 0:
            start = tl.load(OFFS + b * stride_fb + r)
            end = tl.load(OFFS + b * stride_fb + r + 1)
            full = _full_end(start, end, BLOCK_N)
            for n0 in range(start, full, BLOCK_N):
                m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, bit, K, V, b, h, n0, end, d, d_mask,
                                          stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, qk_scale,
                                          BLOCK_M, BLOCK_N, False, IEEE)
            for n0 in range(full, end, TAIL_N):
                m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, bit, K, V, b, h, n0, end, d, d_mask,
                                          stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, qk_scale,
                                          BLOCK_M, TAIL_N, True, IEEE)
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=io_mask)
    tl.store(lse_ptrs, tl.where(has, m_i + tl.log2(l_safe), float("inf")), mask=row_mask)


@triton.jit(do_not_specialize=_DYNAMIC)
def _region_attention_bwd(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, MEM, OFFS, TILES, ROWS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_db, stride_dh, stride_dn,
    stride_gb, stride_gh, stride_gn,
    stride_ab, stride_ah, stride_an,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_fb,
    R, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
    IEEE: tl.constexpr, ATOMIC_DKDV: tl.constexpr,
):
    # dq of one tile x head (DQ has q's layout, stride_g*), and delta = rowsum(dO * O) stored in
    # DELTA (LSE's layout) for the dk/dv kernel. With ATOMIC_DKDV, DK and DV are fp32 accumulators
    # of k's shape (stride_a*) that every tile adds into; otherwise _region_attention_bwd_dkdv
    # produces dk and dv.
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b, rows, row_mask = _tile_rows(TILES, ROWS, pid_m, BLOCK_M)
    mem = tl.load(MEM + b * stride_mb + rows * stride_mn, mask=row_mask, other=0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_D
    io_mask = row_mask[:, None] & d_mask[None, :]
    dq_ptrs = DQ + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn + d[None, :]
    if tl.max(mem, axis=0) == 0:  # a zero tile or an unused one
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty), mask=io_mask)
        return
    q = _rows(Q, b, h, rows, d, io_mask, stride_qb, stride_qh, stride_qn)
    do = _rows(DO, b, h, rows, d, io_mask, stride_db, stride_dh, stride_dn)
    o = _rows(O, b, h, rows, d, io_mask, stride_ob, stride_oh, stride_on)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    l_off = b * stride_lb + h * stride_lh + rows
    tl.store(DELTA + l_off, delta, mask=row_mask)
    lse = tl.load(LSE + l_off, mask=row_mask, other=float("inf"))
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(R):
        bit = (mem >> r) & 1
        if tl.max(bit, axis=0) > 0:
            start = tl.load(OFFS + b * stride_fb + r)
            end = tl.load(OFFS + b * stride_fb + r + 1)
            full = _full_end(start, end, BLOCK_N)
            for n0 in range(start, full, BLOCK_N):
                dq = _dq_step(q, do, lse, delta, dq, bit, K, V, DK, DV, b, h, n0, end, d, d_mask,
                              stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                              stride_ab, stride_ah, stride_an, qk_scale, sm_scale,
                              BLOCK_M, BLOCK_N, False, IEEE, ATOMIC_DKDV)
            for n0 in range(full, end, TAIL_N):
                dq = _dq_step(q, do, lse, delta, dq, bit, K, V, DK, DV, b, h, n0, end, d, d_mask,
                              stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                              stride_ab, stride_ah, stride_an, qk_scale, sm_scale,
                              BLOCK_M, TAIL_N, True, IEEE, ATOMIC_DKDV)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=_DYNAMIC + ["NB", "SPLIT", "stride_rt"])
def _region_attention_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, MEM, OFFS, TILES, ROWS, REF_TILES, REF_COUNTS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_gb, stride_gh, stride_gn,
    stride_lb, stride_lh, stride_mb, stride_mn, stride_fb, stride_rt,
    R, NB, SPLIT, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr,
    IEEE: tl.constexpr, ADD_OUT: tl.constexpr,
):
    """dk, dv of one key block (BLOCK_N keys of reference r of image b) x one head. It walks the
    plan tiles listed for (b, r) (those holding a token in box r: REF_TILES[b * R + r, :count]),
    accumulates in registers and stores once: no atomics. With SPLIT > 1 programs s = 0..SPLIT-1
    share a key block, each walking every SPLIT-th tile of the list, and add their partial sums into
    fp32 DK/DV (ADD_OUT): SPLIT adds per element, to keep the device full when the lists are long
    and the key blocks few. A span's last, partial block (264 = 4 x 64 + 8) takes TAIL_N-key
    blocks instead of a whole BLOCK_N one. DK/DV (stride_g*) are zero-initialised where a key
    belongs to no reference (such keys keep a zero gradient)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    s = pid % SPLIT
    pid = pid // SPLIT
    b = (pid // (R * NB)).to(tl.int64)
    r = (pid // NB) % R
    j = pid % NB
    end = tl.load(OFFS + b * stride_fb + r + 1)
    start = tl.load(OFFS + b * stride_fb + r) + j * BLOCK_N
    if start >= end:
        return
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_D
    lst = REF_TILES + (b * R + r) * stride_rt
    count = tl.load(REF_COUNTS + b * R + r)
    if start + BLOCK_N <= end:  # a whole block
        _dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, MEM, TILES, ROWS, lst, count, s, SPLIT, b, h, r, start, end, d, d_mask,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                    stride_db, stride_dh, stride_dn, stride_gb, stride_gh, stride_gn,
                    stride_lb, stride_lh, stride_mb, stride_mn, qk_scale, sm_scale,
                    BLOCK_M, BLOCK_N, BLOCK_D, False, IEEE, ADD_OUT)
    else:  # the span's tail (fewer than BLOCK_N keys): TAIL_N-key blocks, no whole wasted block
        for n0 in range(start, end, TAIL_N):
            _dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, MEM, TILES, ROWS, lst, count, s, SPLIT, b, h, r, n0, end, d,
                        d_mask, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                        stride_vn, stride_db, stride_dh, stride_dn, stride_gb, stride_gh, stride_gn,
                        stride_lb, stride_lh, stride_mb, stride_mn, qk_scale, sm_scale,
                        BLOCK_M, TAIL_N, BLOCK_D, True, IEEE, ADD_OUT)


@triton.jit
def _dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, MEM, TILES, ROWS, lst, count, s, SPLIT, b, h, r, n0, end, d, d_mask,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_db, stride_dh, stride_dn, stride_gb, stride_gh, stride_gn,
                stride_lb, stride_lh, stride_mb, stride_mn, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_COLS: tl.constexpr,
                IEEE: tl.constexpr, ADD_OUT: tl.constexpr):
    """dk, dv of keys [n0, n0 + BLOCK_N) (masked at ``end`` with MASK_COLS): walks every SPLIT-th
    tile of the list ``lst`` from s on, accumulates in registers, stores (or adds) once."""
    cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = cols < end
    if MASK_COLS:
        kv_mask = col_mask[:, None] & d_mask[None, :]
    else:
        kv_mask = tl.broadcast_to(d_mask[None, :], (BLOCK_N, BLOCK_D))
    k = _rows(K, b, h, cols, d, kv_mask, stride_kb, stride_kh, stride_kn)
    v = _rows(V, b, h, cols, d, kv_mask, stride_vb, stride_vh, stride_vn)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i in range(s, count, SPLIT):
        t = tl.load(lst + i)
        _, rows, row_mask = _tile_rows(TILES, ROWS, t, BLOCK_M)
        mem = tl.load(MEM + b * stride_mb + rows * stride_mn, mask=row_mask, other=0)
        bit = (mem >> r) & 1
        io_mask = row_mask[:, None] & d_mask[None, :]
        q = _rows(Q, b, h, rows, d, io_mask, stride_qb, stride_qh, stride_qn)
        do = _rows(DO, b, h, rows, d, io_mask, stride_db, stride_dh, stride_dn)
        l_off = b * stride_lb + h * stride_lh + rows
        lse = tl.load(LSE + l_off, mask=row_mask, other=float("inf"))
        delta = tl.load(DELTA + l_off, mask=row_mask, other=0.0)
        if MASK_COLS:
            valid = (bit[:, None] == 1) & col_mask[None, :]
        else:
            valid = tl.broadcast_to(bit[:, None] == 1, (BLOCK_M, BLOCK_N))
        p = tl.exp2(_scores(q, k, valid, qk_scale, IEEE) - lse[:, None])
        # (see _dq_step: a NaN delta of a row outside box r must not reach r's keys)
        ds = tl.where(valid, p * (_dot(do, tl.trans(v), IEEE) - delta[:, None]) * sm_scale, 0.0)
        dv += _dot(tl.trans(p), do, IEEE)
        dk += _dot(tl.trans(ds), q, IEEE)
    out = b * stride_gb + h * stride_gh + cols[:, None] * stride_gn + d[None, :]
    if ADD_OUT:
        tl.atomic_add(DK + out, dk, mask=kv_mask, sem="relaxed")
        tl.atomic_add(DV + out, dv, mask=kv_mask, sem="relaxed")
    else:
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)
