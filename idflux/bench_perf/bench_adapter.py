"""Benchmark rows for the identity adapter: all 57 x 2 cross-attention modules of one FLUX step.

Providers:
  ours            packed in-box path through region_attention_packed, K/V of every module
                  projected once per generation (not timed: it is outside the denoising loop)
  ours+prepare    the same including the K/V projection (the first step)
  released        the released formulation: ID tokens once per forward, one dense boolean mask per
                  branch and forward (built on the device, vectorised: kinder than the release),
                  every image token through norm/to_q, SDPA with the mask, to_out, and K/V
                  projected again in every module at every step
  released+loops  the same with the masks built as the released code builds them, once per
                  forward: Python loops over images, references, heads and tokens into a CPU bool
                  tensor (B, heads, L, refs * tokens), then copied to the device
Shapes: 4 references, 30% of tokens in boxes; CPU at reduced width (hidden 256, 4 heads x 64, the
full 57 blocks); CUDA at full width (hidden 3072, 24 x 64), bf16, 512^2 and 1024^2.
"""

from __future__ import annotations

from typing import Iterator

import torch

from idflux.bench_perf.bench_region_attention import quadrant_boxes, released_mask_from_membership
from idflux.bench_perf.harness import Case, Goal, mode_fns
from idflux.engine.adapter import AdapterConfig, IdentityAdapter, RegionLayout
from idflux.engine.regions import boxes_to_membership
from idflux.kernels.region_attention_ref import dense_mask_from_membership

OP = "adapter"
SUMMARY = [("ours", "released"), ("ours+prepare", "released"), ("ours", "released+loops")]
# Issue #6: the adapter (57 x 2 modules) >= 3x the released formulation, fwd and fwd+bwd.
GOALS = [Goal(6, ">= 3x the released dense-mask formulation", OP, "ours", "released", m, "speedup", 3.0) for m in ("fwd", "fwd+bwd")]


def _released_step(adapter: IdentityAdapter, img, arc, sig, membership, R, *, loops: bool = False):
    arc_tok, sig_tok = adapter.id_tokens(arc, sig)  # once per forward, as released
    B = img.shape[0]
    cfg = adapter.cfg
    if loops:
        mask_arc = released_mask_from_membership(membership, cfg.heads, cfg.arc_tokens, R, img.device)
        mask_sig = released_mask_from_membership(membership, cfg.heads, cfg.sig_tokens_per_ref, R, img.device)
    else:
        offs = lambda n: (torch.arange(R + 1, device=img.device) * n).expand(B, -1)  # noqa: E731
        mask_arc = dense_mask_from_membership(membership, offs(cfg.arc_tokens), arc_tok.shape[1])[:, None]
        mask_sig = dense_mask_from_membership(membership, offs(cfg.sig_tokens_per_ref), sig_tok.shape[1])[:, None]
    x = img
    for i in range(cfg.n_blocks):
        x = x + adapter.arc_blocks[i].forward_dense(x, arc_tok, mask_arc) + adapter.sig_blocks[i].forward_dense(x, sig_tok, mask_sig)
    return x


def _ours_step(adapter: IdentityAdapter, img, ctx):
    x = img
    for i in range(adapter.cfg.n_blocks):
        x = adapter.apply(i, x, ctx)
    return x


def goal_cases(device: torch.device) -> Iterator[Case]:
    """Issue 16's adapter goal: ours vs the released formulation at 1024^2 (full width on CUDA)."""
    return cases(device, False, sizes=(1024,) if device.type == "cuda" else None, providers={"ours", "released"})


def cases(device: torch.device, quick: bool = False, *, sizes=None, providers=None) -> Iterator[Case]:
    cuda = device.type == "cuda"
    only = sizes
    if cuda:
        cfg, dtype, dname, sizes = AdapterConfig(), torch.bfloat16, "bf16", (512, 1024)
    else:
        cfg = AdapterConfig(hidden=256, heads=4, head_dim=64, n_blocks=8 if quick else 57, siglip_dim=768)
        dtype, dname, sizes = torch.float32, "fp32", (512,)
    sizes = only or sizes
    backend = "auto"
    R = 4
    with torch.device(device):
        adapter = IdentityAdapter(cfg).to(dtype)
    for size in sizes:
        membership = boxes_to_membership([quadrant_boxes(size, R, 0.3)], size, size).to(device)
        N = membership.shape[1]
        layout = RegionLayout.from_membership(membership, R)
        img = torch.randn(1, N, cfg.hidden, device=device, dtype=dtype, requires_grad=True)
        arc = torch.randn(1, R, cfg.arc_dim, device=device, dtype=dtype)
        sig = torch.randn(1, R, cfg.siglip_tokens, cfg.siglip_dim, device=device, dtype=dtype)
        params = [img, *adapter.parameters()]
        shape = {"image": size, "tokens": N, "in_box": round(layout.b_idx.numel() / N, 3), "refs": R,
                 "hidden": cfg.hidden, "heads": cfg.heads, "blocks": cfg.n_blocks}
        with torch.no_grad():
            ctx_fixed = adapter.prepare(arc, sig, layout, backend=backend)
        fwds = {
            "ours": lambda: _ours_step(adapter, img, ctx_fixed),
            "ours+prepare": lambda: _ours_step(adapter, img, adapter.prepare(arc, sig, layout, backend=backend)),
            "released": lambda: _released_step(adapter, img, arc, sig, membership, R),
            "released+loops": lambda: _released_step(adapter, img, arc, sig, membership, R, loops=True),
        }
        for name, fwd in fwds.items():
            if providers is not None and name not in providers:
                continue
            fns = mode_fns(fwd, params)
            for mode in ("fwd", "fwd+bwd"):
                yield Case(OP, name, mode, shape, dname, fns[mode],
                           note="K/V cached across steps" if name == "ours" else "", graph=name != "released+loops")
