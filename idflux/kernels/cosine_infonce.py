"""Fused cosine InfoNCE over a negative bank (the WithAnyone contrastive loss).

    loss_n = -log( exp(s_pos) / (exp(s_pos) + sum_j exp(s_neg_j)) ) = logsumexp([s_pos, s_negs]) - s_pos
    s = cos(., .) / tau,   cos(a, b) = <a / max(||a||, 1e-6), b / max(||b||, 1e-6)>

Layers: ``_cosine_infonce_fwd_kernel`` (one pass over the candidates of one row, split across
programs; ``_cosine_infonce_shared_fwd_kernel`` for a bank shared by 16+ rows) ->
``_cosine_infonce_merge_kernel`` (flash-decoding merge of the partial max / sum-exp / weighted
sums, loss and the gradient to g) -> launcher ``_cosine_infonce_triton`` ->
``CosineInfoNCEFunction`` (backward: ``_cosine_infonce_bwd_kernel``) -> ``cosine_infonce``. The PyTorch reference is
:func:`idflux.kernels.cosine_infonce_ref.cosine_infonce_ref`.

Like Liger's fused cross-entropy, the gradient is produced in the forward: the pass that computes
a row's log-sum-exp also accumulates sum_j p_j * n_j (the softmax-weighted normalised candidates),
which is all d loss_n / d g_n needs, so the backward never reads the bank again: one launch scales
dg by the upstream gradient and forms d/d pos (with the in-batch negatives' share, an (N, N) by
(N, D) product) through pos's normalisation.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import triton
import triton.language as tl

from idflux.kernels import _backend
from idflux.kernels._backend import resolve_backend
from idflux.kernels.cosine_infonce_ref import EPS, cosine_infonce_ref

REDUCTIONS = ("mean", "sum", "none")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@triton.jit
def _cosine_infonce_fwd_kernel(
    g_ptr, pos_ptr, bank_ptr, idx_ptr, ids_ptr, nid_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, s_ib_ptr,
    stride_gn, stride_gd, stride_pn, stride_pd, stride_bk, stride_bd,
    stride_in, stride_im, stride_ids, stride_nid,
    N, M, K, D, C, TILES_PER_SPLIT, SPLITS, inv_tau, eps,
    HAS_INDEX: tl.constexpr, IN_BATCH: tl.constexpr, HAS_IDS: tl.constexpr, HAS_NEG_IDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row, split): candidates [split * TILES_PER_SPLIT * BLOCK_M, ...) of row ``row``.

    Candidate j < M is a bank entry (negatives[j], or negatives[neg_index[row, j]]); M <= j < C is
    the in-batch positive pos[j - M]. An index outside [0, K) is an excluded candidate, never read
    (cosine_infonce(check=False) does not range-check neg_index on the host). Writes the partial
    max, sum of exp and the exp-weighted sum of normalised candidates; with IN_BATCH also the
    in-batch logits (-inf where excluded).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    gx = tl.load(g_ptr + row * stride_gn + d * stride_gd, mask=dmask, other=0.0).to(tl.float32)
    u = gx / tl.maximum(tl.sqrt(tl.sum(gx * gx, 0)), eps)
    if HAS_IDS:
        my_id = tl.load(ids_ptr + row * stride_ids).to(tl.int64)

    m_i = -1.0e30  # finite "no candidate yet" max: exp(-1e30 - m) is exactly 0, never NaN
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Software-pipelined gather: while tile t is reduced, the rows of tile t + 1 and the indices of
    # tile t + 2 are already in flight (a gather is two dependent loads: index, then row).
    start = split * TILES_PER_SPLIT * BLOCK_M
    end = start + TILES_PER_SPLIT * BLOCK_M
    lanes = tl.arange(0, BLOCK_M)
    j_nx = start + lanes
    if HAS_INDEX:
        b_nx = tl.load(idx_ptr + row * stride_in + j_nx.to(tl.int64) * stride_im, mask=j_nx < M, other=0).to(tl.int64)
        ok_nx = (j_nx < M) & (b_nx >= 0) & (b_nx < K)  # an index outside [0, K) is excluded, never read
        j_nn = j_nx + BLOCK_M
        b_nn = tl.load(idx_ptr + row * stride_in + j_nn.to(tl.int64) * stride_im, mask=(j_nn < M) & (j_nn < end), other=0)
    else:
        b_nx = j_nx.to(tl.int64)
        ok_nx = j_nx < M
    x_nx = tl.load(bank_ptr + b_nx[:, None] * stride_bk + d[None, :] * stride_bd,
                   mask=ok_nx[:, None] & dmask[None, :], other=0.0)
    for t in range(0, TILES_PER_SPLIT):
        j = start + t * BLOCK_M + lanes
        brow, in_bank, x = b_nx, ok_nx, x_nx.to(tl.float32)
        jn = j + BLOCK_M
        if HAS_INDEX:
            b_nx = b_nn.to(tl.int64)
            ok_nx = (jn < M) & (jn < end) & (b_nx >= 0) & (b_nx < K)
            j_nn = jn + BLOCK_M
            b_nn = tl.load(idx_ptr + row * stride_in + j_nn.to(tl.int64) * stride_im, mask=(j_nn < M) & (j_nn < end), other=0)
        else:
            b_nx = jn.to(tl.int64)
            ok_nx = (jn < M) & (jn < end)
        x_nx = tl.load(bank_ptr + b_nx[:, None] * stride_bk + d[None, :] * stride_bd,
                       mask=ok_nx[:, None] & dmask[None, :], other=0.0)
        keep = (j < C) & ((j >= M) | in_bank)
        if HAS_NEG_IDS:
            nid = tl.load(nid_ptr + brow * stride_nid, mask=in_bank, other=0).to(tl.int64)
            keep = keep & ((j >= M) | (nid != my_id))
        if IN_BATCH:
            in_ib = keep & (j >= M)
            prow = (j - M).to(tl.int64)  # negative on bank lanes, which are masked
            x += tl.load(pos_ptr + prow[:, None] * stride_pn + d[None, :] * stride_pd,
                         mask=in_ib[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            ib_keep = prow != row
            if HAS_IDS:
                pid = tl.load(ids_ptr + prow * stride_ids, mask=in_ib, other=0).to(tl.int64)
                ib_keep = ib_keep & (pid != my_id)
            keep = keep & ((j < M) | ib_keep)
        inv_n = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), eps)
        s = tl.sum(x * u[None, :], 1) * inv_n * inv_tau
        s = tl.where(keep, s, float("-inf"))
        if IN_BATCH:
            tl.store(s_ib_ptr + row * N + prow, s, mask=in_ib)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(keep, tl.exp(s - m_new), 0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum((p * inv_n)[:, None] * x, 0)
        m_i = m_new

    out = row * SPLITS + split
    tl.store(part_m_ptr + out, m_i)
    tl.store(part_l_ptr + out, l_i)
    tl.store(part_acc_ptr + out * D + d, acc, mask=dmask)


@triton.jit
def _cosine_infonce_shared_fwd_kernel(
    g_ptr, pos_ptr, bank_ptr, ids_ptr, nid_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, s_ib_ptr,
    stride_gn, stride_gd, stride_pn, stride_pd, stride_bk, stride_bd, stride_ids, stride_nid,
    N, M, D, C, TILES_PER_SPLIT, SPLITS, inv_tau, eps,
    IN_BATCH: tl.constexpr, HAS_IDS: tl.constexpr, HAS_NEG_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (row tile, split) for a bank shared by all rows: the same partials as
    ``_cosine_infonce_fwd_kernel`` for BLOCK_R rows at once, so each bank tile is read once per row
    tile (not once per row) and both products (similarities, softmax-weighted sum) are tensor-core
    dots, flash-attention style with one query per row."""
    rt = tl.program_id(0)
    split = tl.program_id(1)
    rows = (rt * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < N
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    gx = tl.load(g_ptr + rows[:, None] * stride_gn + d[None, :] * stride_gd,
                 mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    u = gx / tl.maximum(tl.sqrt(tl.sum(gx * gx, 1)), eps)[:, None]
    op_dtype = bank_ptr.dtype.element_ty
    u_op = u if IEEE else u.to(op_dtype)
    if HAS_IDS:
        my_id = tl.load(ids_ptr + rows * stride_ids, mask=rmask, other=0).to(tl.int64)
    m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    start = split * TILES_PER_SPLIT * BLOCK_M
    for t in range(0, TILES_PER_SPLIT):
        j = start + t * BLOCK_M + tl.arange(0, BLOCK_M)
        in_bank = j < M
        x = tl.load(bank_ptr + j.to(tl.int64)[:, None] * stride_bk + d[None, :] * stride_bd,
                    mask=in_bank[:, None] & dmask[None, :], other=0.0)
        keep = (j < C)[None, :] & rmask[:, None]
        if HAS_NEG_IDS:
            nid = tl.load(nid_ptr + j.to(tl.int64) * stride_nid, mask=in_bank, other=0).to(tl.int64)
            keep = keep & ((j >= M)[None, :] | (nid[None, :] != my_id[:, None]))
        if IN_BATCH:
            in_ib = (j >= M) & (j < C)
            prow = (j - M).to(tl.int64)  # negative on bank lanes, which are masked
            x += tl.load(pos_ptr + prow[:, None] * stride_pn + d[None, :] * stride_pd,
                         mask=in_ib[:, None] & dmask[None, :], other=0.0).to(x.dtype)
            ib_keep = prow[None, :] != rows[:, None]
            if HAS_IDS:
                pid = tl.load(ids_ptr + prow * stride_ids, mask=in_ib, other=0).to(tl.int64)
                ib_keep = ib_keep & (pid[None, :] != my_id[:, None])
            keep = keep & ((j < M)[None, :] | ib_keep)
        xf = x.to(tl.float32)
        inv_n = 1.0 / tl.maximum(tl.sqrt(tl.sum(xf * xf, 1)), eps)
        if IEEE:
            dots = tl.dot(u_op, tl.trans(xf), input_precision="ieee")
        else:
            dots = tl.dot(u_op, tl.trans(x))
        s = tl.where(keep, dots * inv_n[None, :] * inv_tau, float("-inf"))
        if IN_BATCH:
            tl.store(s_ib_ptr + rows[:, None] * N + prow[None, :], s, mask=rmask[:, None] & in_ib[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(keep, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        pw = p * inv_n[None, :]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pw, xf, input_precision="ieee")
        else:
            if op_dtype == tl.float16:
                # For a zero or tiny candidate 1 / ||x|| reaches 1e6, past fp16's 65504 (inf * 0 = NaN
                # in the dot); the cap is exact for a zero row and for every norm above 1.7e-5.
                pw = tl.minimum(pw, 6.0e4)
            acc = acc * alpha[:, None] + tl.dot(pw.to(op_dtype), x)
        m_i = m_new
    out = rows * SPLITS + split
    tl.store(part_m_ptr + out, m_i, mask=rmask)
    tl.store(part_l_ptr + out, l_i, mask=rmask)
    tl.store(part_acc_ptr + out[:, None] * D + d[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _cosine_infonce_merge_kernel(
    g_ptr, pos_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    loss_ptr, lse_ptr, ppos_ptr, u_ptr, dg_ptr,
    stride_gn, stride_gd, stride_pn, stride_pd,
    D, SPLITS, inv_tau, eps,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program row: merge the row's partials with the positive; loss, LSE, p_pos and d loss / d g."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    gx = tl.load(g_ptr + row * stride_gn + d * stride_gd, mask=dmask, other=0.0).to(tl.float32)
    g_norm = tl.sqrt(tl.sum(gx * gx, 0))
    u = gx / tl.maximum(g_norm, eps)
    px = tl.load(pos_ptr + row * stride_pn + d * stride_pd, mask=dmask, other=0.0).to(tl.float32)
    v = px / tl.maximum(tl.sqrt(tl.sum(px * px, 0)), eps)
    s_pos = tl.sum(u * v, 0) * inv_tau

    sp = tl.arange(0, BLOCK_S)
    pm = tl.load(part_m_ptr + row * SPLITS + sp, mask=sp < SPLITS, other=-1.0e30)
    pl = tl.load(part_l_ptr + row * SPLITS + sp, mask=sp < SPLITS, other=0.0)
    m_all = tl.maximum(tl.max(pm, 0), s_pos)
    e_pos = tl.exp(s_pos - m_all)
    l_tot = tl.sum(pl * tl.exp(pm - m_all), 0) + e_pos
    acc = e_pos * v
    for k in range(0, SPLITS):
        mk = tl.load(part_m_ptr + row * SPLITS + k)
        acc += tl.exp(mk - m_all) * tl.load(part_acc_ptr + (row * SPLITS + k) * D + d, mask=dmask, other=0.0)
    lse = m_all + tl.log(l_tot)
    # d loss_n / d u_n = (sum_k p_k c_k - v) / tau over all candidates c_k, the positive included;
    # then through u = g / max(||g||, eps) (below eps the clamp passes no gradient to the norm).
    du = (acc / l_tot - v) * inv_tau
    # A row whose norm is below eps (a zero row) gets zero gradient: x / eps carries no direction,
    # and its derivative I / eps would overflow fp16/bf16. (A NaN norm is not "below": it stays NaN.)
    dg = tl.where(g_norm < eps, 0.0, (du - u * tl.sum(u * du, 0)) / g_norm)
    # A row with no candidate left is exactly loss 0, gradient 0 (p_pos = 1). Say so explicitly:
    # on a GPU the approximate exp/div leave ~1e-9 residues where the algebra gives 0.
    has_neg = tl.max(pm, 0) > -1.0e29
    # A NaN never vanishes: a NaN/inf in g[row], pos[row] or a kept candidate makes the row's loss,
    # LSE, p_pos and gradient NaN, as in the reference (the masks above would otherwise read a NaN
    # partial as "no candidate", and GPU max/maximum drop NaN operands).
    bad = (s_pos != s_pos) | (tl.sum(tl.where((sp < SPLITS) & ((pl != pl) | (pm != pm)), 1, 0), 0) > 0)
    nan = float("nan")
    # An excluded candidate's NaN/inf still reaches the gradient (0 * NaN in the weighted sum), as
    # in the reference's matmul backward, even when the row keeps no candidate at all.
    bad_dg = bad | (tl.sum(tl.where(dmask & (acc != acc), 1, 0), 0) > 0)
    dg = tl.where(g_norm < eps, 0.0, tl.where(bad_dg, nan, tl.where(has_neg, dg, 0.0)))  # zero rows: always 0

    tl.store(loss_ptr + row, tl.where(bad, nan, tl.where(has_neg, lse - s_pos, 0.0)))
    tl.store(lse_ptr + row, tl.where(bad, nan, tl.where(has_neg, lse, s_pos)))
    tl.store(ppos_ptr + row, tl.where(bad, nan, tl.where(has_neg, tl.exp(s_pos - lse), 1.0)))
    tl.store(u_ptr + row * D + d, u, mask=dmask)
    tl.store(dg_ptr + row * D + d, dg, mask=dmask)


@triton.jit
def _cosine_infonce_bwd_kernel(
    w_ptr, pos_ptr, lse_ptr, ppos_ptr, u_ptr, dg_ptr, s_ib_ptr, grad_g_ptr, grad_pos_ptr,
    stride_w, stride_pn, stride_pd,
    N, D, inv_tau, eps,
    NEED_G: tl.constexpr, NEED_POS: tl.constexpr, IN_BATCH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program row: the whole backward of one row, in one launch for all rows.

    grad_g[n] = w[n] * dg[n] (dg was produced in the forward). grad_pos[n] goes through
    v = pos / max(||pos||, eps) from d loss / d v[n] = (w[n] (p_pos[n] - 1) u[n]
    + sum_m w[m] exp(s_ib[m, n] - lse[m]) u[m]) / tau, the sum (in-batch negatives) over the rows m
    that used pos[n] as a negative (excluded pairs hold s = -inf, so they add exactly 0).
    """
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    w = tl.load(w_ptr + row * stride_w).to(tl.float32)
    if NEED_G:
        dg = tl.load(dg_ptr + row * D + d, mask=dmask, other=0.0)
        tl.store(grad_g_ptr + row * D + d, (w * dg).to(grad_g_ptr.dtype.element_ty), mask=dmask)
    if NEED_POS:
        u = tl.load(u_ptr + row * D + d, mask=dmask, other=0.0)
        dv = (w * (tl.load(ppos_ptr + row) - 1.0)) * u
        if IN_BATCH:
            for m0 in range(0, N, BLOCK_N):
                m = (m0 + tl.arange(0, BLOCK_N)).to(tl.int64)
                mm = m < N
                s = tl.load(s_ib_ptr + m * N + row, mask=mm, other=float("-inf"))
                lse_m = tl.load(lse_ptr + m, mask=mm, other=0.0)
                w_m = tl.load(w_ptr + m * stride_w, mask=mm, other=0.0).to(tl.float32)
                # An excluded pair (s = -inf) adds exactly 0, even when row m's LSE is NaN.
                coef = tl.where(mm & (s != float("-inf")), tl.exp(s - lse_m) * w_m, 0.0)
                u_m = tl.load(u_ptr + m[:, None] * D + d[None, :], mask=mm[:, None] & dmask[None, :], other=0.0)
                dv += tl.sum(coef[:, None] * u_m, 0)
        dv = dv * inv_tau
        px = tl.load(pos_ptr + row * stride_pn + d * stride_pd, mask=dmask, other=0.0).to(tl.float32)
        p_norm = tl.sqrt(tl.sum(px * px, 0))
        v = px / tl.maximum(p_norm, eps)
        # Below eps (a zero row) no gradient, as for g (the reference's ``normalize``).
        gp = tl.where(p_norm < eps, 0.0, (dv - v * tl.sum(v * dv, 0)) / p_norm)
        tl.store(grad_pos_ptr + row * D + d, gp.to(grad_pos_ptr.dtype.element_ty), mask=dmask)


#: A bank shared by all rows (no neg_index) goes through the row-tiled kernel from this many rows
#: on (it reads each bank tile once per 16 rows instead of once per row, with tensor-core dots).
SHARED_TILE_MIN_ROWS = 16
_SHARED_ROWS = 16


def _shared_tile(block_d: int, ieee: bool) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of the row-tiled shared-bank kernel: the largest bank tile ptxas fits
    without spills on sm_90 (triton 3.6, all flags on; ``python -m idflux.bench_perf.ptx --regs``).
    fp32 inputs take IEEE dots on FMA units, whose operands live in registers: smaller tiles."""
    if ieee:
        return (32, 8) if block_d <= 64 else (16, 8) if block_d <= 128 else (32, 8) if block_d <= 256 else (16, 8)
    # (bf16/fp16 at D >= 1024 spill a little whatever the tile: 16 x 8 warps spills least)
    return (64, 4) if block_d <= 128 else (64, 8) if block_d <= 256 else (32, 8) if block_d <= 512 else (16, 8)


#: Registers per thread ptxas gives the forward kernels on sm_90 (triton 3.6, bf16, D = 512; ``python -m
#: idflux.bench_perf.ptx --op cosine_infonce --regs``): 226 for the gathered kernel at 4 warps (rounded
#: up to the allocation unit of 8), 255 for the row-tiled one. Unmeasured configurations assume 255.
_FWD_REGS = {("gather", 4): 232, ("tiled", 8): 256}
_SM_REGISTERS = 65536  # per SM on sm_80 / sm_90
_SM_THREADS = 2048


def _resident_per_sm(kernel: str, num_warps: int) -> int:
    """Programs of ``kernel`` one SM holds at once, from its registers per thread (never below 1)."""
    regs = _FWD_REGS.get((kernel, num_warps), 256)
    threads = 32 * num_warps
    return max(1, min(_SM_REGISTERS // (regs * threads), _SM_THREADS // threads))


def _launch_config(N: int, C: int, D: int, n_sms: int | None, tiled: bool = False,
                   ieee: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_D, tiles_per_split, splits, num_warps) for N rows of C candidates of dim D
    (``tiled``: the row-tiled shared-bank kernel, _SHARED_ROWS rows per program; ``ieee``: fp32
    inputs) on a GPU of ``n_sms`` SMs; ``n_sms=None``: Triton's interpreter.

    GPU: the candidates of a row are split so the grid is one full wave: as many programs as the
    SMs hold at once (registers decide: two gathered programs per SM), each streaming its share with
    the next tile's rows in flight. A second, partial wave would leave most SMs idle at its end,
    and fewer programs would leave memory latency uncovered."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if n_sms is None:
        # The interpreter pays per program and per op, not per element: big tiles, few programs
        # (still several splits per row for small N, so the merge is exercised).
        BLOCK_M, target_programs, num_warps = 64, 16, 4
    else:
        if tiled:
            BLOCK_M, num_warps = _shared_tile(BLOCK_D, ieee)
        else:
            BLOCK_M, num_warps = max(8, min(128, 8192 // BLOCK_D)), 8 if BLOCK_D >= 1024 else 4
        target_programs = _resident_per_sm("tiled" if tiled else "gather", num_warps) * n_sms
    n_tiles = triton.cdiv(C, BLOCK_M)
    row_programs = triton.cdiv(N, _SHARED_ROWS) if tiled else N
    splits = max(1, min(target_programs // row_programs, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = max(1, triton.cdiv(n_tiles, tiles_per_split)) if n_tiles else 1
    return BLOCK_M, BLOCK_D, tiles_per_split, splits, num_warps


_ELEMENT = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def launch_plan(N: int, M: int, D: int, dtype: torch.dtype = torch.bfloat16, n_sms: int = 132, *,
                gathered: bool = True, in_batch: bool = False) -> dict:
    """The GPU launches of one ``cosine_infonce`` call (forward + backward) on a part with ``n_sms`` SMs.

    N rows, M negatives per row (``gathered``: per-row ``neg_index`` into a gallery, the training
    recipe; else a bank shared by all rows), D the embedding dim, ``dtype`` the inputs'.
    Pure arithmetic (no device needed): the same sizing the launcher uses with the device's SM count.

    Returns a dict: ``kernel`` (the forward kernel), ``grid`` (its launch grid), ``programs``,
    ``resident_per_sm`` (programs an SM holds at once, from ptxas' register count), ``programs_per_sm``
    (programs / n_sms), ``waves`` (programs / (resident_per_sm * n_sms)), ``block_m``, ``block_d``,
    ``num_warps``, ``splits`` (programs per row or row tile), ``candidates_per_program``,
    ``bytes_per_tile`` (candidate rows one program has in flight), ``load_bytes`` (16: the gathered
    rows load as 16-byte vectors when D is a multiple of 16 / element size), ``merge_grid`` and
    ``bwd_grid``, and ``bytes`` (what the forward must read: the candidate rows, indices, g and pos).

    Example (issue 17's goal shape on a 132-SM H100/H200):
        >>> plan = launch_plan(64, 4096, 512, torch.bfloat16, 132)
        >>> plan["grid"], plan["waves"] <= 1.0
        ((64, 4), True)
    """
    for name, v in (("N", N), ("M", M), ("D", D), ("n_sms", n_sms)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "M" else 1):
            raise ValueError(f"launch_plan: {name} must be an int >= {0 if name == 'M' else 1}, got {v!r}")
    if dtype not in _ELEMENT:
        raise ValueError(f"launch_plan: dtype must be one of {tuple(_ELEMENT)}, got {dtype!r}")
    C = M + (N if in_batch else 0)
    tiled = not gathered and N >= SHARED_TILE_MIN_ROWS
    ieee = dtype == torch.float32
    block_m, block_d, tiles_per_split, splits, num_warps = _launch_config(N, C, D, n_sms, tiled=tiled, ieee=ieee)
    rows = triton.cdiv(N, _SHARED_ROWS) if tiled else N
    kernel = "tiled" if tiled else "gather"
    resident = _resident_per_sm(kernel, num_warps)
    programs = rows * splits
    elem = _ELEMENT[dtype]
    bank_rows = N * M if gathered else M
    return {
        "kernel": "_cosine_infonce_shared_fwd_kernel" if tiled else "_cosine_infonce_fwd_kernel",
        "grid": (rows, splits), "programs": programs, "resident_per_sm": resident,
        "programs_per_sm": programs / n_sms, "waves": programs / (resident * n_sms),
        "block_m": block_m, "block_d": block_d, "num_warps": num_warps, "splits": splits,
        "candidates_per_program": tiles_per_split * block_m, "bytes_per_tile": block_m * D * elem,
        "load_bytes": 16 if (D * elem) % 16 == 0 else math.gcd(D * elem, 16),
        "merge_grid": (N,), "bwd_grid": (N,),
        "bytes": bank_rows * D * elem + (N * M * 8 if gathered else 0) + 2 * N * D * elem,
    }


def _workspace(device: torch.device, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Flat fp32 views of the given sizes into one allocation, each starting 16-byte aligned (the
    alignment a Triton launch specialises pointers on)."""
    chunks = []
    for n in sizes:
        chunks += [n, -n % 4]
    pieces = torch.empty(sum(chunks), device=device, dtype=torch.float32).split(chunks)
    return list(pieces[0::2])


def _cosine_infonce_triton(g, pos, negatives, neg_index, ids, neg_ids, tau, in_batch):
    """Launch both kernels. Returns (loss (N,), lse (N,), p_pos (N,), u, dg, s_ib | None), fp32; u and dg
    are (N, D) and s_ib (N, N), row-major, as flat views."""
    N, D = g.shape
    M = neg_index.shape[1] if neg_index is not None else negatives.shape[0]
    C = M + (N if in_batch else 0)
    dev = g.device
    tiled = neg_index is None and N >= SHARED_TILE_MIN_ROWS
    n_sms = None if _backend.INTERPRET and dev.type == "cpu" else _backend.sm_count(dev)
    BLOCK_M, BLOCK_D, tiles_per_split, splits, num_warps = _launch_config(N, C, D, n_sms, tiled=tiled,
                                                                          ieee=g.dtype == torch.float32)
    # The call's buffers are pieces of two allocations (two host-side ops instead of nine): the
    # partials, freed after the forward, and what the backward keeps. The kernels index them as
    # contiguous rows.
    part_m, part_l, part_acc = _workspace(dev, (N * splits, N * splits, N * splits * D))
    loss, lse, p_pos, u, dg, s_ib = _workspace(dev, (N, N, N, N * D, N * D, N * N if in_batch else 0))
    if not in_batch:
        s_ib = part_m  # an unused pointer
    idx = neg_index if neg_index is not None else g  # unused pointer when the flag is off
    ids_t = ids if ids is not None else g
    nid_t = neg_ids if neg_ids is not None else g
    inv_tau = 1.0 / tau
    if tiled:
        _cosine_infonce_shared_fwd_kernel[(triton.cdiv(N, _SHARED_ROWS), splits)](
            g, pos, negatives, ids_t, nid_t,
            part_m, part_l, part_acc, s_ib,
            g.stride(0), g.stride(1), pos.stride(0), pos.stride(1), negatives.stride(0), negatives.stride(1),
            ids_t.stride(0), nid_t.stride(0),
            N, M, D, C, tiles_per_split, splits, inv_tau, EPS,
            IN_BATCH=in_batch, HAS_IDS=ids is not None, HAS_NEG_IDS=neg_ids is not None,
            BLOCK_R=_SHARED_ROWS, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, IEEE=g.dtype == torch.float32, num_warps=num_warps,
        )
    else:
        _cosine_infonce_fwd_kernel[(N, splits)](
            g, pos, negatives, idx, ids_t, nid_t,
            part_m, part_l, part_acc, s_ib,
            g.stride(0), g.stride(1), pos.stride(0), pos.stride(1), negatives.stride(0), negatives.stride(1),
            idx.stride(0), idx.stride(1) if idx.dim() > 1 else 0, ids_t.stride(0), nid_t.stride(0),
            N, M, negatives.shape[0], D, C, tiles_per_split, splits, inv_tau, EPS,
            HAS_INDEX=neg_index is not None, IN_BATCH=in_batch, HAS_IDS=ids is not None,
            HAS_NEG_IDS=neg_ids is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=num_warps,
        )
    _cosine_infonce_merge_kernel[(N,)](
        g, pos, part_m, part_l, part_acc,
        loss, lse, p_pos, u, dg,
        g.stride(0), g.stride(1), pos.stride(0), pos.stride(1),
        D, splits, inv_tau, EPS,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return loss, lse, p_pos, u, dg, (s_ib if in_batch else None)


class CosineInfoNCEFunction(torch.autograd.Function):
    """Per-row loss (N,) fp32 from the Triton kernels; gradients to g and pos (negatives: none)."""

    @staticmethod
    def forward(ctx, g, pos, negatives, neg_index, ids, neg_ids, tau, in_batch):
        # Triton launches on the current CUDA device: make it the inputs' one.
        with torch.cuda.device(g.device) if g.device.type == "cuda" else contextlib.nullcontext():
            loss, lse, p_pos, u, dg, s_ib = _cosine_infonce_triton(g, pos, negatives, neg_index, ids, neg_ids, tau, in_batch)
        ctx.save_for_backward(pos, lse, p_pos, u, dg, s_ib)
        ctx.tau = tau
        ctx.g_dtype = g.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        pos, lse, p_pos, u, dg, s_ib = ctx.saved_tensors
        need_g, need_pos = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # autograd asks for one at least
        N, D = pos.shape
        grad_g = torch.empty(N, D, device=u.device, dtype=ctx.g_dtype) if need_g else None
        grad_pos = torch.empty(N, D, device=u.device, dtype=pos.dtype) if need_pos else None
        with torch.cuda.device(u.device) if u.device.type == "cuda" else contextlib.nullcontext():
            _cosine_infonce_bwd_kernel[(N,)](
                grad_loss, pos, lse, p_pos, u, dg, s_ib if s_ib is not None else lse,
                grad_g if need_g else u, grad_pos if need_pos else u,
                grad_loss.stride(0), pos.stride(0), pos.stride(1),
                N, D, 1.0 / ctx.tau, EPS,
                NEED_G=need_g, NEED_POS=need_pos, IN_BATCH=s_ib is not None,
                BLOCK_N=_bwd_block_n(D), BLOCK_D=max(16, triton.next_power_of_2(D)),
                num_warps=8 if D >= 1024 else 4,
            )
        return grad_g, grad_pos, None, None, None, None, None, None


def _bwd_block_n(D: int) -> int:
    """Rows of u per step of the in-batch sum: a (BLOCK_N, BLOCK_D) fp32 tile of at most 8192 values."""
    return max(1, min(64, 8192 // max(16, triton.next_power_of_2(D))))


def _check_tensor(name: str, x, *, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"cosine_infonce: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"cosine_infonce: {name} must have {dims} dims, got shape {tuple(x.shape)}")


def _validate(g, pos, negatives, neg_index, tau, in_batch, ids, neg_ids, reduction, check) -> None:
    for name, x in (("g", g), ("pos", pos), ("negatives", negatives)):
        _check_tensor(name, x, dims=2)
        if x.dtype not in _FLOAT:
            raise ValueError(f"cosine_infonce: {name} must be float16/bfloat16/float32/float64, got {x.dtype}; cast it with .float()")
    N, D = g.shape
    if N < 1 or D < 1:
        raise ValueError(f"cosine_infonce: g must be (N, D) with N >= 1 and D >= 1, got shape {tuple(g.shape)}")
    if pos.shape != g.shape:
        raise ValueError(f"cosine_infonce: pos must have g's shape {tuple(g.shape)}, got {tuple(pos.shape)}")
    if negatives.shape[1] != D:
        raise ValueError(f"cosine_infonce: negatives must be (M, D) with D = {D} as in g, got shape {tuple(negatives.shape)}")
    K = negatives.shape[0]
    if neg_index is not None:
        _check_tensor("neg_index", neg_index, dims=2)
        if neg_index.dtype not in _INT:
            raise ValueError(f"cosine_infonce: neg_index must be an integer tensor, got {neg_index.dtype}; use .long()")
        if neg_index.shape[0] != N:
            raise ValueError(f"cosine_infonce: neg_index must be (N, M) with N = {N} rows as in g, got shape {tuple(neg_index.shape)}")
    if ids is not None:
        _check_tensor("ids", ids, dims=1)
        if ids.dtype not in _INT or ids.shape[0] != N:
            raise ValueError(f"cosine_infonce: ids must be an integer tensor of shape ({N},), got {ids.dtype} {tuple(ids.shape)}")
    if neg_ids is not None:
        if ids is None:
            raise ValueError("cosine_infonce: neg_ids needs ids (the identity of each row) to exclude same-identity negatives; pass ids too")
        _check_tensor("neg_ids", neg_ids, dims=1)
        if neg_ids.dtype not in _INT or neg_ids.shape[0] != K:
            raise ValueError(f"cosine_infonce: neg_ids must be an integer tensor of shape ({K},) (one id per negatives row), "
                             f"got {neg_ids.dtype} {tuple(neg_ids.shape)}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"cosine_infonce: tau must be a finite number > 0, got {tau!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cosine_infonce: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(in_batch, bool):
        raise ValueError(f"cosine_infonce: in_batch must be True or False, got {in_batch!r}")
    if not isinstance(check, bool):
        raise ValueError(f"cosine_infonce: check must be True or False, got {check!r}")
    for name, x in (("pos", pos), ("negatives", negatives), ("neg_index", neg_index), ("ids", ids), ("neg_ids", neg_ids)):
        if x is not None and x.device != g.device:
            raise ValueError(f"cosine_infonce: {name} is on {x.device} but g is on {g.device}; move all inputs to one device")
    if check and neg_index is not None and neg_index.numel():
        # The one host sync of a call. Without it (check=False) both backends exclude an
        # out-of-range index instead of reading it, so the kernel stays memory-safe.
        lo, hi = torch.stack(torch.aminmax(neg_index)).tolist()
        if lo < 0 or hi >= K:
            raise ValueError(f"cosine_infonce: neg_index values must lie in [0, {K}) (rows of negatives), got [{lo}, {hi}]")


def cosine_infonce(
    g: torch.Tensor,
    pos: torch.Tensor,
    negatives: torch.Tensor,
    *,
    neg_index: torch.Tensor | None = None,
    tau: float = 0.1,
    in_batch: bool = False,
    ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check: bool = True,
) -> torch.Tensor:
    """Cosine InfoNCE of queries ``g`` against positives ``pos`` and a bank of negatives.

    loss_n = logsumexp([s_pos, s_neg_1, ...]) - s_pos with s = cos / tau; the positive is in the
    denominator. Cosine uses x / max(||x||, 1e-6): zero vectors have cosine 0, never NaN.

    g: (N, D) queries, N >= 1. pos: (N, D) positives. Any of float16/bfloat16/float32/float64.
    negatives: (M, D) bank shared by all rows, or with ``neg_index`` a (K, D) gallery.
    neg_index: (N, M) integer, values in [0, K): row n's negatives are negatives[neg_index[n]]
        (gathered inside the kernel, never materialised as (N, M, D)); see ``check``. Default None.
    tau: temperature, finite > 0. Default 0.1.
    in_batch: also use pos[m], m != n, as negatives of row n. Default False.
    ids: (N,) integer identity per row: with in_batch, pos[m] is excluded for row n when
        ids[m] == ids[n]. neg_ids: (K,) integer identity per negatives row (needs ids): entry j is
        excluded for row n when neg_ids[j] == ids[n].
    reduction: "mean" (default) | "sum" | "none" (per-row (N,)).
    backend: "auto" (Triton on CUDA, reference otherwise) | "triton" | "torch".
    check: True (default) checks that neg_index lies in [0, K), which reads it back to the host
        (one sync per call). False skips that check, so the call never syncs (CUDA-graph
        capturable; use it when the indices are in range by construction, e.g. drawn by
        ``NegativeBank.sample``); every shape/dtype/device check still runs. An index outside
        [0, K) is then an excluded candidate, like a neg_ids match, on both backends.

    Returns a float32 loss (float64 when an input is float64 and the torch backend runs); fp32
    accumulation whatever the input dtype. A row whose candidates are all excluded (or M = 0
    without in_batch) has loss exactly 0 and zero gradient. Differentiable in g and pos; no
    gradient flows to negatives. A row of g or pos whose norm is below 1e-6 (a zero row) gets
    zero gradient (its derivative 1 / 1e-6 would overflow fp16). NaN is never dropped, on either
    backend: a NaN/inf in g[n], pos[n] or a candidate row n keeps makes row n's loss and gradient
    NaN (with in_batch, pos[n] also reaches the rows that keep it as a negative); an excluded
    candidate adds no loss, but its values still reach the gradient (0 * NaN). On Triton's
    interpreter (CPU tensors, backend="triton") bf16 raises ValueError: use fp32/fp16 or "torch".

    Example:
        >>> g, pos, bank = torch.randn(4, 64), torch.randn(4, 64), torch.randn(100, 64)
        >>> cosine_infonce(g, pos, bank, tau=0.1, in_batch=True).shape
        torch.Size([])
    """
    _validate(g, pos, negatives, neg_index, tau, in_batch, ids, neg_ids, reduction, check)
    impl = resolve_backend("cosine_infonce", backend, g.device)
    tau = float(tau)
    negatives = negatives.detach()
    if impl == "torch":
        return cosine_infonce_ref(g, pos, negatives, neg_index=neg_index, tau=tau, in_batch=in_batch,
                                  ids=ids, neg_ids=neg_ids, reduction=reduction)
    for x in (g, pos, negatives):  # before any launch: the interpreter computes bf16 wrongly
        _backend.check_interpreter_dtype("cosine_infonce", x.dtype, g.device)
    loss = CosineInfoNCEFunction.apply(g, pos, negatives, neg_index, ids, neg_ids, tau, in_batch)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
