"""Benchmark rows for one denoising step: FLUX with the identity adapter vs without.

CUDA: full-size FLUX.1-dev transformer (random weights, bf16) with the full adapter, 4 references,
30% of tokens in boxes, at 512^2 and 1024^2 (text 512 tokens). CPU: the tiny preset. The ratio
"adapter / no_adapter" is the adapter's overhead on a sampling step (target <= 1.04 on a GPU).
"""

from __future__ import annotations

from typing import Iterator

import torch

from idflux.bench_perf.bench_region_attention import quadrant_boxes
from idflux.bench_perf.harness import Case, Goal
from idflux.engine.adapter import IdentityAdapter, RegionLayout, flux_dev_adapter, tiny_adapter
from idflux.engine.regions import boxes_to_membership

OP = "sample"
SUMMARY = [("no_adapter", "adapter")]
# Issue #6: the adapter costs <= 4% of a full FLUX sampling step (a GPU goal).
GOALS = [Goal(6, "adapter overhead <= 4% of a sampling step", OP, "adapter", "no_adapter", "fwd", "slowdown", 1.04,
              (("device", "cuda"),))]


def _flux(cuda: bool):
    from diffusers import FluxTransformer2DModel

    from idflux.engine.flux import tiny_flux_transformer

    if not cuda:
        return tiny_flux_transformer(), tiny_adapter(), torch.float32, 64
    with torch.device("cuda"), _default_dtype(torch.bfloat16):  # built in bf16: 24 GB, never 48 GB of fp32 first
        flux = FluxTransformer2DModel(guidance_embeds=True)
    return flux, flux_dev_adapter(), torch.bfloat16, 512


class _default_dtype:
    """Context: torch's default dtype set to ``dtype`` (new parameters are created in it)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def goal_cases(device: torch.device) -> Iterator[Case]:
    """Issue 16's sampling-step goal: one full FLUX step with and without the adapter at 1024^2
    (CUDA; the CPU runs the tiny preset's larger size)."""
    return cases(device, False, sizes=(1024,) if device.type == "cuda" else (128,))


def cases(device: torch.device, quick: bool = False, *, sizes=None) -> Iterator[Case]:
    from idflux.engine.flux import flux_forward, image_ids

    cuda = device.type == "cuda"
    flux, cfg, dtype, text_len = _flux(cuda)
    flux.requires_grad_(False).eval()
    with torch.device(device), _default_dtype(dtype):
        adapter = IdentityAdapter(cfg).to(dtype).requires_grad_(False)
    sizes = sizes or ((512, 1024) if cuda else (64, 128))
    R = 4
    for size in sizes:
        grid = size // 16
        membership = boxes_to_membership([quadrant_boxes(size, R, 0.3)], size, size).to(device)
        layout = RegionLayout.from_membership(membership, R)
        x = torch.randn(1, grid * grid, flux.config.in_channels, device=device, dtype=dtype)
        txt = torch.randn(1, text_len, flux.config.joint_attention_dim, device=device, dtype=dtype)
        pooled = torch.randn(1, flux.config.pooled_projection_dim, device=device, dtype=dtype)
        t = torch.full((1,), 0.5, device=device, dtype=dtype)
        g = torch.full((1,), 4.0, device=device, dtype=dtype)
        ids, tids = image_ids(grid, grid, device=device, dtype=dtype), torch.zeros(text_len, 3, device=device, dtype=dtype)
        arc = torch.randn(1, R, cfg.arc_dim, device=device, dtype=dtype)
        sig = torch.randn(1, R, cfg.siglip_tokens, cfg.siglip_dim, device=device, dtype=dtype)
        with torch.no_grad():
            ctx = adapter.prepare(arc, sig, layout)
        shape = {"image": size, "tokens": grid * grid, "text": text_len, "refs": R,
                 "in_box": round(layout.b_idx.numel() / (grid * grid), 3), "hidden": cfg.hidden}
        dname = "bf16" if cuda else "fp32"

        def step(with_adapter: bool):
            def fn():
                with torch.no_grad():
                    return flux_forward(flux, x, txt, pooled, t, ids, tids, g,
                                        adapter=adapter if with_adapter else None, adapter_ctx=ctx if with_adapter else None)
            return fn

        yield Case(OP, "no_adapter", "fwd", shape, dname, step(False), graph=True)
        yield Case(OP, "adapter", "fwd", shape, dname, step(True), note="K/V cached, packed in-box path", graph=True)
