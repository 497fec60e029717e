"""Benchmark rows for one training step (forward + backward of every loss, optimizer excluded).

Providers:
  ours       the adapter's packed in-box path through region_attention (Triton on CUDA)
  released   the released formulation: every image token through each module's norm/to_q/SDPA with
             a dense boolean mask/to_out, K/V of the ID tokens recomputed in every module
CPU: the tiny preset (batch 2 at 64^2). CUDA: FLUX at full width with reduced depth (2 double +
4 single blocks, random weights, bf16) and the full-width adapter, 512^2, batch 1-4, 2 faces each
(the goal: >= 1.25x the released formulation per step).
"""

from __future__ import annotations

from typing import Iterator

import torch

from idflux.bench_perf.harness import Case

OP = "train_step"
SUMMARY = [("ours", "released")]


class _ReleasedAdapter(torch.nn.Module):
    """The adapter seen through the released formulation: prepare() keeps the raw identity inputs,
    apply() runs the dense-mask modules (K/V recomputed per module and step)."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        self.cfg = adapter.cfg

    def prepare(self, arc, sig, layout, **kw):
        return {"arc": arc, "sig": sig, "membership": layout.membership}

    def apply(self, index, img, ctx):
        return self.adapter.apply_dense(index, img, ctx["arc"], ctx["sig"], ctx["membership"])


def _model(cuda: bool):
    from idflux.train.config import tiny
    from idflux.train.model import TrainModel

    cfg = tiny(out="/tmp/idflux-bench-train")
    if not cuda:
        return TrainModel.build(cfg), cfg, [2], 64
    from diffusers import FluxTransformer2DModel

    from idflux.engine.adapter import AdapterConfig, IdentityAdapter

    model = TrainModel.build(cfg)
    with torch.device("cuda"):
        model.transformer = model.parts.transformer = FluxTransformer2DModel(
            num_layers=2, num_single_layers=4, in_channels=16, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=True).to(torch.bfloat16).requires_grad_(False)
        model.adapter = IdentityAdapter(AdapterConfig(n_blocks=6, arc_dim=model.adapter.cfg.arc_dim,
                                                      siglip_dim=model.adapter.cfg.siglip_dim,
                                                      siglip_tokens=model.adapter.cfg.siglip_tokens)).to(torch.bfloat16)
    cfg.size = 512
    return model.cuda(), cfg, [1, 2, 4], 512


def cases(device: torch.device, quick: bool = False) -> Iterator[Case]:
    from idflux.train.data_pipeline import build_dataset, collate

    cuda = device.type == "cuda"
    model, cfg, batches, size = _model(cuda)
    model.train()
    ds = build_dataset(cfg)
    ours = model.adapter
    released = _ReleasedAdapter(ours)
    for B in batches[:1] if quick else batches:
        batch = collate([ds.sample(i, cfg.phases[1]) for i in range(B)], device)
        shape = {"batch": B, "image": size, "faces": int(batch.landmarks.shape[0]), "hidden": ours.cfg.hidden,
                 "blocks": ours.cfg.n_blocks}
        for name, adapter in (("ours", ours), ("released", released)):
            def step(adapter=adapter):
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
