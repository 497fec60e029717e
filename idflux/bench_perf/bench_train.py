"""Benchmark rows for one training step (forward + backward of every loss, optimizer excluded).

Providers:
  ours       the adapter's packed in-box path through region_attention (Triton on CUDA)
  released   the released formulation: ID tokens and one dense boolean mask per branch once per
             forward (the mask built on the device, vectorised: kinder than the release), every
             image token through each module's norm/to_q/SDPA with the mask/to_out, K/V of the ID
             tokens recomputed in every module
  released+loops  the same with the masks built as the released code builds them once per forward:
             Python loops over images, references, heads and tokens into a CPU bool tensor
             (B, heads, L, refs * tokens), then copied to the device
CPU: the tiny preset (batch 2 at 64^2) and the overhead shape at FLUX.1-dev width (hidden 3072,
1 double + 1 single block, 64^2, batch 1: per-block host work and weight traffic with few tokens).
CUDA: the whole flux-dev step (19 + 38 blocks, hidden 3072, random weights, bf16, the adapter on all
57 blocks) at 512^2, batch 1 (the goal: >= 1.25x the released formulation per step), then full
width with reduced depth (2 double + 4 single blocks), 512^2, batch 1-4, 2 faces each.
"""

from __future__ import annotations

from typing import Iterator

import torch

from idflux.bench_perf.harness import Case, Goal

OP = "train_step"
SUMMARY = [("ours", "released"), ("ours", "released+loops")]
# Issue #7: >= 1.25x the released formulation per training step (a GPU goal).
GOALS = [Goal(7, ">= 1.25x the released formulation per step", OP, "ours", "released", "fwd+bwd", "speedup", 1.25,
              (("device", "cuda"),))]


class _ReleasedAdapter(torch.nn.Module):
    """The adapter seen through the released formulation: prepare() makes the ID tokens and the dense
    masks once per forward, apply() runs the dense-mask modules (K/V recomputed per module)."""

    def __init__(self, adapter, loops: bool = False):
        super().__init__()
        self.adapter = adapter
        self.cfg = adapter.cfg
        self.loops = loops

    def prepare(self, arc, sig, layout, **kw):
        from idflux.bench_perf.bench_region_attention import released_mask_from_membership
        from idflux.kernels.region_attention_ref import dense_mask_from_membership

        arc_tok, sig_tok = self.adapter.id_tokens(arc, sig)
        mem, R, cfg = layout.membership, layout.n_refs, self.cfg
        masks = []
        for tokens, per_ref in ((arc_tok, cfg.arc_tokens), (sig_tok, cfg.sig_tokens_per_ref)):
            if tokens is None:
                masks.append(None)
            elif self.loops:
                masks.append(released_mask_from_membership(mem, cfg.heads, per_ref, R, mem.device))
            else:
                offs = (torch.arange(R + 1, device=mem.device) * per_ref).expand(mem.shape[0], -1)
                masks.append(dense_mask_from_membership(mem, offs, tokens.shape[1])[:, None])
        return {"arc": arc_tok, "sig": sig_tok, "masks": masks}

    def apply(self, index, img, ctx):
        out = img + self.adapter.arc_blocks[index].forward_dense(img, ctx["arc"], ctx["masks"][0])
        if ctx["sig"] is not None:
            out = out + self.adapter.sig_blocks[index].forward_dense(img, ctx["sig"], ctx["masks"][1])
        return out


FLUX_DEV_DEPTH = (19, 38)  # double, single blocks of FLUX.1-dev
GPU_DEPTH = (2, 4)  # the reduced-depth sweep at full width


def _model(device: torch.device, depth: tuple[int, int] | None = None, heads: int = 24):
    """(model, cfg) on ``device``: the tiny preset (random models, fp32) with, when ``depth`` is given,
    its FLUX transformer replaced by one at FLUX.1-dev width (``heads`` x 128; 24 is flux-dev's
    3072) with ``depth`` = (double, single) blocks, random weights, frozen, and an adapter of as
    many blocks at that width (bf16 on CUDA, fp32 on a CPU)."""
    from idflux.train.config import tiny
    from idflux.train.model import TrainModel

    cfg = tiny(out="/tmp/idflux-bench-train", flux="random")
    model = TrainModel.build(cfg)
    if depth is None:
        return model.to(device), cfg
    from diffusers import FluxTransformer2DModel

    from idflux.bench_perf.bench_sample import _default_dtype
    from idflux.engine.adapter import AdapterConfig, IdentityAdapter

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    acfg = model.adapter.cfg
    with torch.device(device), _default_dtype(dtype):  # built in its dtype: never 48 GB of fp32 first
        model.transformer = model.parts.transformer = FluxTransformer2DModel(
            num_layers=depth[0], num_single_layers=depth[1], in_channels=16, num_attention_heads=heads,
            joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True).requires_grad_(False)
        model.adapter = IdentityAdapter(AdapterConfig(hidden=heads * 128, heads=heads, n_blocks=sum(depth), arc_dim=acfg.arc_dim,
                                                      siglip_dim=acfg.siglip_dim, siglip_tokens=acfg.siglip_tokens))
    return model.to(device), cfg


def _step_cases(model, cfg, device: torch.device, batches, size: int, extra_shape: dict, providers=None) -> Iterator[Case]:
    from idflux.train.data_pipeline import build_dataset, collate

    cuda = device.type == "cuda"
    cfg.size = size
    model.train()
    ds = build_dataset(cfg)
    ours = model.adapter
    adapters = {"ours": ours, "released": _ReleasedAdapter(ours), "released+loops": _ReleasedAdapter(ours, loops=True)}
    for B in batches:
        batch = collate([ds.sample(i, cfg.phases[1]) for i in range(B)], device)
        shape = {"batch": B, "image": size, "faces": int(batch.landmarks.shape[0]), "hidden": ours.cfg.hidden,
                 "blocks": ours.cfg.n_blocks, **extra_shape}
        for name, adapter in adapters.items():
            if providers is not None and name not in providers:
                continue

            def step(adapter=adapter, batch=batch, B=B):
                model.adapter = adapter
                try:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                        out = model.losses(batch, list(range(B)), 0)
                    out["loss"].backward()
                finally:
                    model.adapter = ours
                for p in ours.parameters():
                    p.grad = None
            yield Case(OP, name, "fwd+bwd", shape, "bf16" if cuda else "fp32", step,
                       note="one step: flow matching + identity + contrastive, forward and backward")


def flux_width_cases(device: torch.device, depth: tuple[int, int] = (1, 1), size: int = 64, batches=(1,), heads: int = 24,
                     providers=None) -> Iterator[Case]:
    """Training steps with the FLUX transformer and the adapter at FLUX.1-dev width (``heads`` x 128)
    on ``depth`` = (double, single) blocks: on a CPU at 64^2 the overhead shape (per-block host work
    and weight traffic, few tokens); on CUDA at full depth the whole flux-dev step."""
    model, cfg = _model(device, depth, heads)
    width = "flux-dev" if heads == 24 else f"{heads * 128}"
    yield from _step_cases(model, cfg, device, batches, size, {"width": width, "depth": f"{depth[0]}+{depth[1]}"}, providers)


def goal_cases(device: torch.device) -> Iterator[Case]:
    """Issue 17's training-step goal: the whole flux-dev step (19 + 38 blocks at full width, the
    adapter on all 57), batch 1 at 512^2, ours vs the released formulation (CUDA; on a CPU the
    flux-dev width overhead shape stands in)."""
    if device.type == "cuda":
        return flux_width_cases(device, FLUX_DEV_DEPTH, 512, (1,), providers={"ours", "released"})
    return flux_width_cases(device, (1, 1), 64, (1,), providers={"ours", "released"})


def cases(device: torch.device, quick: bool = False) -> Iterator[Case]:
    """CPU: the tiny preset (batch 2 at 64^2), then (not ``quick``) the flux-dev width overhead shape
    (1 double + 1 single block, 64^2, batch 1). CUDA: the whole flux-dev step at 512^2, then full
    width at reduced depth (2 + 4 blocks), 512^2, batch 1-4."""
    if device.type == "cuda":
        yield from flux_width_cases(device, FLUX_DEV_DEPTH, 512, (1,))
        yield from flux_width_cases(device, GPU_DEPTH, 512, (1,) if quick else (1, 2, 4))
        return
    model, cfg = _model(device)
    yield from _step_cases(model, cfg, device, (2,), 64, {})
    del model
    if not quick:
        yield from flux_width_cases(device, (1, 1), 64, (1,))
