"""Benchmark rows for ``region_attention``: our kernel and reference against the released path.

Shapes: the SigLIP branch (4 references x 264 tokens) and the ArcFace branch (4 x 8), 24 heads x 64,
at 512^2 (1024 image tokens) and 1024^2 (4096), with 4 side-by-side boxes covering ~30% of the
tokens. Providers:
  ref             the PyTorch reference (groups tokens by membership pattern, unmasked SDPA per group)
  triton          our Triton kernel, dense form (CUDA): zeros for out-of-box rows; the layout's tile
                  plan is built on the first call and reused (as for every module and step)
  triton+plan     the same with the layout validated and planned on every call (a new layout)
  triton_packed   the same kernel on the in-box tokens only, (T, H, D), as the engine calls it
  triton_atomic_bwd  the dense form with the other backward strategy (dk/dv by fp32 atomics)
  sdpa_mask       SDPA with the dense boolean mask, mask prebuilt (the released attention call)
  sdpa_mask+build the same with the mask built per call the way the released code builds it
                  (Python loops over boxes, heads and tokens into a CPU bool tensor, then copied)
  flex            FlexAttention with a BlockMask from a region mask_mod (CUDA)
  gather_sdpa     per-reference gather of in-box tokens + unmasked SDPA + scatter
  copy            ``copy_`` of the bytes the op must move (bandwidth anchor, fwd only)
  xformers        ``xformers.ops.memory_efficient_attention`` with the dense mask as an additive
                  bias (-inf outside the boxes; rows with no allowed key come out NaN, not 0) (CUDA)
  xformers_blockdiag  the same on the in-box tokens grouped by reference with xformers'
                  ``BlockDiagonalMask`` (where each in-box token belongs to one reference) (CUDA)
                  Without xformers (or one that does not load against this torch), these rows
                  say why in their error instead of vanishing.

Providers without a host sync are also timed from a CUDA-graph replay (``ms_device``): device time
without Python and launch overhead (see idflux.bench_perf.harness).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from idflux.bench_perf.harness import Case, Goal, mode_fns, with_setting
from idflux.engine.regions import TOKEN_PIXELS, box_token_range, boxes_to_membership
from idflux.kernels import region_attention, region_attention_packed
from idflux.kernels._backend import HAS_TRITON

OP = "region_attention"
SUMMARY = [
    ("ref", "sdpa_mask"), ("ref", "sdpa_mask+build"),
    ("triton", "sdpa_mask"), ("triton", "sdpa_mask+build"), ("triton", "flex"), ("triton", "gather_sdpa"),
    ("triton_packed", "sdpa_mask"), ("triton_packed", "flex"), ("triton", "copy"), ("triton_packed", "copy"),
    ("triton", "triton_atomic_bwd"), ("triton+plan", "sdpa_mask+build"), ("triton+plan", "sdpa_mask"),
]
_SIGLIP = (("tokens_per_ref", 264), ("dtype", "bf16"))
# Issue #3's goals, on the SigLIP shape fwd+bwd (both forms: the engine calls the packed one).
GOALS = [g for form in ("triton_packed", "triton") for g in (
    Goal(3, ">= 10x the released path (SDPA + dense mask)", OP, form, "sdpa_mask", "fwd+bwd", "speedup", 10.0, _SIGLIP),
    Goal(3, ">= 10x the released path with its mask built per call", OP, form, "sdpa_mask+build", "fwd+bwd", "speedup", 10.0,
         _SIGLIP),
    Goal(3, ">= 2x FlexAttention", OP, form, "flex", "fwd+bwd", "speedup", 2.0, _SIGLIP),
    Goal(3, ">= 70% of copy bandwidth on the bytes it must move", OP, form, "copy", "fwd+bwd", "bandwidth", 0.7, _SIGLIP,
         baseline_mode="fwd"),
)]
# Issue #16: >= 3x SDPA + dense mask on the ArcFace shape (4 x 8 keys), fwd+bwd.
GOALS += [Goal(16, ">= 3x the released path on the ArcFace shape", OP, form, "sdpa_mask", "fwd+bwd", "speedup", 3.0,
               (("tokens_per_ref", 8), ("dtype", "bf16"))) for form in ("triton_packed", "triton")]
# The goal cases, in the order of the goals (a GPU run measures them first): SigLIP then
# ArcFace at 1024^2, the providers the goals compare (+ xformers, which users name) and their modes.
GOAL_SWEEP = [(1024, 264), (1024, 8)]
GOAL_PROVIDERS = {"triton_packed", "triton", "sdpa_mask", "sdpa_mask+build", "flex", "copy", "xformers", "xformers_blockdiag"}
GOAL_MODES = {"fwd+bwd", "fwd"}
# Providers that never sync with the host: also timed from a CUDA-graph replay.
CAPTURABLE = {"triton", "triton_packed", "triton_atomic_bwd", "sdpa_mask", "flex", "gather_sdpa", "copy", "xformers",
              "xformers_blockdiag"}
HEADS, HEAD_DIM = 24, 64


def quadrant_boxes(size: int, n_refs: int, fraction: float) -> list[list[float]]:
    """``n_refs`` disjoint square boxes (pixels) covering about ``fraction`` of the image together."""
    side = size * math.sqrt(fraction / n_refs)
    cols = math.ceil(math.sqrt(n_refs))
    cell = size / cols
    boxes = []
    for r in range(n_refs):
        cx, cy = (r % cols + 0.5) * cell, (r // cols + 0.5) * cell
        boxes.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
    return boxes


def released_mask(boxes, heads: int, size: int, id_len: int, max_refs: int, device) -> torch.Tensor:
    """Dense (B, heads, L, max_refs * id_len) boolean mask built as the released code does: Python loops
    over images, boxes, heads and token indices into a CPU tensor, then one copy to the device."""
    grid = size // TOKEN_PIXELS
    mask = torch.zeros(len(boxes), heads, grid * grid, max_refs * id_len, dtype=torch.bool)
    for b, image_boxes in enumerate(boxes):
        for r, box in enumerate(image_boxes[:max_refs]):
            c0, r0, c1, r1 = box_token_range(box, size, size)
            tokens = [y * grid + x for y in range(r0, r1) for x in range(c0, c1)]
            for h in range(heads):
                for t in tokens:
                    mask[b, h, t, r * id_len : (r + 1) * id_len] = True
    return mask.to(device)


def released_mask_from_membership(membership: torch.Tensor, heads: int, id_len: int, max_refs: int, device) -> torch.Tensor:
    """The same construction as :func:`released_mask` (Python loops over images, references, heads
    and token indices into a CPU bool tensor, then one copy) from a membership bitmask (B, L)."""
    mem = membership.cpu()
    B, L = mem.shape
    mask = torch.zeros(B, heads, L, max_refs * id_len, dtype=torch.bool)
    for b in range(B):
        for r in range(max_refs):
            tokens = ((mem[b] >> r) & 1).nonzero().squeeze(1).tolist()
            for h in range(heads):
                for t in tokens:
                    mask[b, h, t, r * id_len : (r + 1) * id_len] = True
    return mask.to(device)


def _flex_provider(q, k, v, membership, owner):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return ((membership[b, q_idx] >> owner[b, kv_idx]) & 1) == 1

    B, H, Nq, _ = q.shape
    block_mask = create_block_mask(mask_mod, B, None, Nq, k.shape[2], device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def _gather_sdpa(q, k, v, rows_per_ref, offsets):
    out = torch.zeros_like(q)
    outs = []
    for r, rows in enumerate(rows_per_ref):
        s, e = offsets[r], offsets[r + 1]
        outs.append((rows, F.scaled_dot_product_attention(q[:, :, rows], k[:, :, s:e], v[:, :, s:e])))
    for rows, o in outs:
        out = out.index_copy(2, rows, o)
    return out


def xformers_ops():
    """``(xformers.ops, None)``, or ``(None, reason)`` when xformers is missing or does not load
    against this torch (its wheel is built for one torch version)."""
    try:
        import xformers.ops as xops

        xops.memory_efficient_attention  # noqa: B018 - the attribute a broken build lacks
        return xops, None
    except Exception as exc:  # noqa: BLE001 - ImportError, or a build error raised at import
        return None, f"xformers unavailable ({type(exc).__name__}: {exc}); install xformers built for torch {torch.__version__}"


def _xformers_dense(xops, q, k, v, mask):
    """memory_efficient_attention on (B, N, H, D) views with the dense mask as an additive bias.
    The bias is allocated with its last dim padded to a multiple of 8 (xformers' alignment rule)."""
    B, H, Nq, _ = q.shape
    Nkv = k.shape[2]
    pad = -(-Nkv // 8) * 8
    bias = torch.zeros(B, H, Nq, pad, device=q.device, dtype=q.dtype)[..., :Nkv]
    bias.masked_fill_(~mask.expand(B, H, Nq, Nkv), float("-inf"))
    return lambda: xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_bias=bias).transpose(1, 2)


def _xformers_blockdiag(xops, q, k, v, membership, n_refs, per_ref):
    """In-box tokens grouped by reference (one reference per token) against each reference's keys,
    through xformers' BlockDiagonalMask; None where a token belongs to several references."""
    mem = membership[0]
    if bool(((mem & (mem - 1)) != 0).any()):
        return None
    rows = [((mem >> r) & 1).nonzero().squeeze(1) for r in range(n_refs)]
    order = torch.cat(rows)
    bias = xops.fmha.BlockDiagonalMask.from_seqlens([int(r.numel()) for r in rows], [per_ref] * n_refs)
    qp = q.detach()[:, :, order].transpose(1, 2).contiguous().requires_grad_()  # (1, T, H, D)

    def run():
        return xops.memory_efficient_attention(qp, k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return run, qp


def xformers_fwds(q, k, v, mask, membership, n_refs: int, per_ref: int) -> dict:
    """``{provider: (forward, inputs, rows it leaves out)}`` for the xformers providers. Without a
    loadable xformers both are forwards that raise the reason, so their rows say why."""
    xops, reason = xformers_ops()
    if xops is None:
        fail = _raiser(RuntimeError(reason))
        return {"xformers": (fail, (q, k, v), 0), "xformers_blockdiag": (fail, (q, k, v), 0)}
    out = {"xformers": (_xformers_dense(xops, q, k, v, mask), (q, k, v), 0)}
    made = _xformers_blockdiag(xops, q, k, v, membership, n_refs, per_ref)
    if made is not None:
        fwd, qx = made
        out["xformers_blockdiag"] = (fwd, (qx, k, v), q.shape[2] - qx.shape[1])
    return out


def cases(device: torch.device, quick: bool = False, *, sweep=None, providers=None, modes=None) -> Iterator[Case]:
    """The sweep's cases; ``sweep`` ((image size, keys per reference), ...), ``providers`` and
    ``modes`` (sets) restrict it (the goal cases: :func:`goal_cases`)."""
    want = (lambda name: True) if providers is None else (lambda name: name in providers)
    want_mode = (lambda mode: True) if modes is None else (lambda mode: mode in modes)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dname = "bf16" if cuda else "fp32"
    if sweep is not None:
        pass
    elif cuda:
        sweep = [(1024, 264), (512, 264), (1024, 8), (512, 8)]  # the goal shape first
    elif quick:
        sweep = [(512, 8)]
    else:
        sweep = [(1024, 264), (512, 8)]
    n_refs, fraction = 4, 0.3
    for size, per_ref in sweep:
        boxes = [quadrant_boxes(size, n_refs, fraction)]
        membership = boxes_to_membership(boxes, size, size).to(device)
        Nq, Nkv = membership.shape[1], n_refs * per_ref
        offsets = (torch.arange(n_refs + 1, device=device) * per_ref).view(1, -1)
        q = torch.randn(1, HEADS, Nq, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, HEADS, Nkv, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, HEADS, Nkv, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        in_box = int((membership != 0).sum())
        counts = [int(((membership[0] >> r) & 1).sum()) for r in range(n_refs)]
        fwd_flops = 4.0 * HEADS * HEAD_DIM * per_ref * sum(counts)
        flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
        elt = q.element_size()
        qo_bytes = 2 * HEADS * Nq * HEAD_DIM * elt  # dense API: every row of O is written
        kv_bytes = 2 * HEADS * Nkv * HEAD_DIM * elt
        nbytes = {"fwd": qo_bytes + kv_bytes, "bwd": 2 * qo_bytes + 2 * kv_bytes + HEADS * Nq * HEAD_DIM * elt,
                  "fwd+bwd": 3 * qo_bytes + 3 * kv_bytes}
        shape = {"B": 1, "H": HEADS, "Nq": Nq, "refs": n_refs, "tokens_per_ref": per_ref, "D": HEAD_DIM,
                 "in_box": round(in_box / Nq, 3), "image": size}
        inputs = (q, k, v)

        mask = released_mask(boxes, HEADS, size, per_ref, n_refs, device)
        fwds = {
            "ref": lambda: region_attention(q, k, v, membership, offsets, backend="torch"),
            "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "sdpa_mask+build": lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=released_mask(boxes, HEADS, size, per_ref, n_refs, device)),
        }
        rows_per_ref = [((membership[0] >> r) & 1).nonzero().squeeze(1) for r in range(n_refs)]
        offs_list = offsets[0].tolist()
        fwds["gather_sdpa"] = lambda: _gather_sdpa(q, k, v, rows_per_ref, offs_list)
        if cuda and HAS_TRITON:
            fwds["triton"] = lambda: region_attention(q, k, v, membership, offsets, backend="triton")
            fwds["triton+plan"] = _replanned(lambda: region_attention(q, k, v, membership, offsets, backend="triton"))
        providers = {name: fn for name, fn in fwds.items() if want(name)}
        if cuda and HAS_TRITON and want("triton_packed"):
            b_idx, t_idx = (membership != 0).nonzero(as_tuple=True)
            qp = q.detach()[b_idx, :, t_idx].clone().requires_grad_()
            packed_args = (membership[b_idx, t_idx], b_idx, offsets)
            packed_fwd = lambda: region_attention_packed(qp, k, v, *packed_args, backend="triton")  # noqa: E731
            packed_bytes = packed_bytes_of(nbytes, Nq - qp.shape[0], elt)
            for mode, fn in _safe_modes(packed_fwd, (qp, k, v)).items():
                if want_mode(mode):
                    yield Case(OP, "triton_packed", mode, shape, dname, fn, flops=flops[mode], bytes=packed_bytes[mode], graph=True)
        if cuda:
            for name, (fwd, ins, out_of_box) in xformers_fwds(q, k, v, mask, membership, n_refs, per_ref).items():
                if not want(name):
                    continue
                for mode, fn in _safe_modes(fwd, ins).items():
                    if want_mode(mode):
                        yield Case(OP, name, mode, shape, dname, fn, flops=flops[mode],
                                   bytes=packed_bytes_of(nbytes, out_of_box, elt)[mode], graph=True,
                                   note="in-box tokens grouped by reference, BlockDiagonalMask" if name.endswith("blockdiag")
                                   else "dense mask as an additive bias")
        if cuda and HAS_TRITON and want("flex"):
            if per_ref > 16:  # each shape costs a FlexAttention compile: the SigLIP branch, where it matters
                owner = (torch.arange(Nkv, device=device) // per_ref).view(1, -1)
                try:
                    providers["flex"] = _flex_provider(q, k, v, membership, owner)
                except Exception as exc:  # noqa: BLE001 - recorded as a failed row below
                    providers["flex"] = _raiser(exc)
        for name, fwd in providers.items():
            for mode, fn in _safe_modes(fwd, inputs).items():
                if (name in ("sdpa_mask+build", "triton+plan") and mode == "bwd") or not want_mode(mode):
                    continue  # the backward rebuilds nothing: same as sdpa_mask / triton
                yield Case(OP, name, mode, shape, dname, fn, flops=flops[mode], bytes=nbytes[mode], graph=name in CAPTURABLE)
            if name == "triton" and want("triton_atomic_bwd"):  # the other backward strategy, in the same run
                for mode, fn in _safe_modes(fwd, inputs).items():
                    if mode != "fwd":
                        atomic = with_setting("idflux.kernels.region_attention", "BWD_DKDV", "atomic", fn)
                        yield Case(OP, "triton_atomic_bwd", mode, shape, dname, atomic,
                                   flops=flops[mode], bytes=nbytes[mode], note="dk/dv by fp32 atomics from every query tile",
                                   graph=True)
        if want("mask_build"):
            yield Case(OP, "mask_build", "fwd", shape, dname,
                       lambda: released_mask(boxes, HEADS, size, per_ref, n_refs, device),
                       note="released dense-mask construction alone")
        if want("copy"):
            src = torch.empty(nbytes["fwd"] // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            yield Case(OP, "copy", "fwd", shape, dname, lambda: dst.copy_(src), bytes=nbytes["fwd"],
                       note="copy_ of the forward's bytes", graph=True)
        del mask, providers


def packed_bytes_of(nbytes: dict, out_of_box: int, elt: int) -> dict:
    """The dense form's bytes less the rows outside the boxes (the packed form never touches them)."""
    return {m: nb - (2 if m != "bwd" else 3) * HEADS * out_of_box * HEAD_DIM * elt for m, nb in nbytes.items()}


def goal_cases(device: torch.device) -> Iterator[Case]:
    """The cases issue 16's goals are judged on, in its goal order (SigLIP, then ArcFace)."""
    return cases(device, False, sweep=GOAL_SWEEP, providers=GOAL_PROVIDERS, modes=GOAL_MODES)


def _replanned(fn):
    """fn with region_attention's layout cache emptied first: validation and tile plan every call."""
    import importlib

    ra = importlib.import_module("idflux.kernels.region_attention")

    def run():
        ra._SEEN.clear()
        return fn()
    return run


def _raiser(exc: Exception):
    def fn():
        raise exc
    return fn


def _safe_modes(forward, inputs):
    """mode_fns, but a provider whose first call fails yields failing callables instead of stopping the sweep."""
    try:
        return mode_fns(forward, inputs)
    except Exception as exc:  # noqa: BLE001
        return {m: _raiser(exc) for m in ("fwd", "bwd", "fwd+bwd")}
