"""Generation: prompt + identity inputs + boxes -> image, with the adapter's K/V computed once.

``Pipeline`` holds the frozen FLUX parts and the identity adapter. ``generate`` takes identity
inputs already embedded (ArcFace embeddings and SigLIP tokens per reference), which is what
training and evaluation need; the CLI's image-to-image path (faces detected in reference photos)
feeds the same call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from idflux.engine.adapter import IdentityAdapter, RegionLayout, tiny_adapter
from idflux.engine.flux import flux_forward, image_ids, pack_latents, unpack_latents
from idflux.engine.graphs import GraphedStep
from idflux.engine.loading import FluxParts, tiny_flux_parts
from idflux.engine.lowvram import on_device, store_linears_fp8
from idflux.engine.profiling import nvtx_range
from idflux.engine.regions import TOKEN_PIXELS, boxes_to_membership, parse_boxes
from idflux.engine.sampling import euler_sample, sampling_mu, schedule


@dataclass
class GenerateSettings:
    """Settings of one generation (written next to the image)."""

    prompt: str
    boxes: list = field(default_factory=list)
    """Per reference (x1, y1, x2, y2) in output pixels (or all normalised 0..1)."""
    size: int = 1024
    """Output side in pixels (a multiple of 16)."""
    steps: int = 25
    guidance: float = 4.0
    seed: int = 1234
    id_weight: float = 1.0
    """Scale of the ArcFace branch's residual."""
    siglip_weight: float = 1.0
    """Scale of the SigLIP branch's residual (0 skips the branch)."""
    released_shift: bool = False
    """Use the released inference's time shift ((W/8)(H/8)/256 tokens) for parity with its images."""


class Pipeline:
    """FLUX + identity adapter. Build with :meth:`tiny` (random, CPU, seconds) or from local weights."""

    def __init__(self, parts: FluxParts, adapter: IdentityAdapter, *, device="cpu", dtype=torch.float32, backend="auto",
                 offload: bool = False, fp8: bool = False, cuda_graph: bool = False):
        """offload: keep the text encoders and the VAE on the CPU, moving each to ``device`` only for its
        stage. fp8: store the frozen FLUX transformer's Linear weights in float8 (upcast per matmul).
        cuda_graph: capture the denoising step (FLUX + adapter) once per generation in a CUDA graph
        and replay it at every step (no Python or launch work between kernels; see
        :class:`idflux.engine.graphs.GraphedStep`); CUDA only."""
        self.parts, self.adapter = parts, adapter
        self.device, self.dtype, self.backend, self.offload = torch.device(device), dtype, backend, offload
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"Pipeline: cuda_graph=True needs a CUDA device, got device={self.device}; "
                             "drop cuda_graph on this device")
        self.cuda_graph = cuda_graph
        for m in (parts.transformer, parts.vae, parts.clip, parts.t5, adapter):
            if any(p.dtype != dtype for p in m.parameters()):
                m.to(dtype)
            if not (offload and m in (parts.vae, parts.clip, parts.t5)):
                m.to(self.device)
        if fp8:
            store_linears_fp8(parts.transformer)
            parts.transformer.to(self.device)

    @classmethod
    def tiny(cls, seed: int = 0, **kw) -> "Pipeline":
        torch.manual_seed(seed)
        adapter = IdentityAdapter(tiny_adapter())
        return cls(tiny_flux_parts(seed), adapter, **kw)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states (B, L, joint_dim), CLIP pooled (B, pooled_dim))."""
        p = self.parts
        clip_ids = p.clip_tokenizer(prompts, padding="max_length", max_length=p.clip_tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(self.device)
        with on_device(p.clip, self.device, self.offload):
            pooled = p.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = p.t5_tokenizer(prompts, padding="max_length", max_length=p.max_text_tokens, truncation=True,
                                return_tensors="pt").input_ids.to(self.device)
        with on_device(p.t5, self.device, self.offload):
            states = p.t5(t5_ids, output_hidden_states=False).last_hidden_state
        return states.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def generate(self, settings: GenerateSettings, arc_emb: torch.Tensor, siglip_tokens: torch.Tensor | None,
                 *, progress: bool = True) -> torch.Tensor:
        """One image (1, 3, size, size) in [-1, 1] for ``settings`` and R references.

        arc_emb: (R, arc_dim) raw ArcFace embeddings; siglip_tokens: (R, siglip_tokens, siglip_dim) or None.
        """
        return self.generate_batch([settings], [arc_emb], [siglip_tokens], progress=progress)

    @torch.no_grad()
    def generate_batch(self, settings: list[GenerateSettings], arc_embs: list[torch.Tensor],
                       siglip_tokens: list[torch.Tensor | None], *, progress: bool = True) -> torch.Tensor:
        """B images (B, 3, size, size) in one denoising loop: a prompt, references, boxes and seed each.

        Size, steps, guidance, shift and the two branch weights must agree across the batch (one
        schedule, one adapter context); the number of references may differ (padded references own
        keys no token attends to). Image b equals ``generate(settings[b], ...)`` up to batching's
        floating-point differences.
        """
        if not (len(settings) == len(arc_embs) == len(siglip_tokens)) or not settings:
            raise ValueError(f"generate_batch: settings, arc_embs and siglip_tokens must be non-empty lists of one length, "
                             f"got {len(settings)}, {len(arc_embs)}, {len(siglip_tokens)}")
        first = settings[0]
        for field_name in ("size", "steps", "guidance", "released_shift", "id_weight", "siglip_weight"):
            values = {getattr(x, field_name) for x in settings}
            if len(values) > 1:
                raise ValueError(f"generate_batch: settings.{field_name} differs across the batch ({sorted(values)}); "
                                 "run those images in separate batches")
        if len({t is None for t in siglip_tokens}) > 1:
            raise ValueError("generate_batch: siglip_tokens must be given for every image or for none")
        size = first.size
        if size % TOKEN_PIXELS:
            raise ValueError(f"size must be a multiple of {TOKEN_PIXELS}, got {size}")
        B, R = len(settings), max(a.shape[0] for a in arc_embs)
        boxes = [parse_boxes(x.boxes, a.shape[0], size, size) for x, a in zip(settings, arc_embs)]
        layout = RegionLayout.from_membership(boxes_to_membership(boxes, size, size), R).to(self.device)  # built on the host
        arc = torch.zeros(B, R, arc_embs[0].shape[-1], device=self.device, dtype=self.dtype)
        for b, a in enumerate(arc_embs):
            arc[b, : a.shape[0]] = a.to(self.device, self.dtype)
        sig = None
        if siglip_tokens[0] is not None:
            sig = torch.zeros(B, R, *siglip_tokens[0].shape[1:], device=self.device, dtype=self.dtype)
            for b, t in enumerate(siglip_tokens):
                sig[b, : t.shape[0]] = t.to(self.device, self.dtype)
        with nvtx_range("adapter.prepare"):
            ctx = self.adapter.prepare(arc, sig, layout, id_weight=first.id_weight,
                                       siglip_weight=first.siglip_weight, backend=self.backend)
        txt, pooled = self.encode_prompt([x.prompt for x in settings])
        vae = self.parts.vae
        lat_ch = vae.config.latent_channels
        h = w = size // 8
        noise = torch.cat([torch.randn(1, lat_ch, h, w, generator=torch.Generator(device="cpu").manual_seed(x.seed))
                           for x in settings]).to(self.device, self.dtype)
        img_ids = image_ids(h // 2, w // 2, device=self.device, dtype=self.dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = torch.full((B,), first.guidance, device=self.device, dtype=self.dtype)
        times = schedule(first.steps, sampling_mu(size, size, released_parity=first.released_shift))

        def velocity(x, t):
            return flux_forward(self.parts.transformer, x, txt, pooled, t, img_ids, txt_ids, guidance,
                                adapter=self.adapter, adapter_ctx=ctx)

        step = GraphedStep(velocity) if self.cuda_graph else velocity  # captured on the first step
        tokens = euler_sample(step, pack_latents(noise), times, progress=progress)
        latents = unpack_latents(tokens, h, w)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        with nvtx_range("vae.decode"), on_device(vae, self.device, self.offload):
            image = vae.decode(latents).sample
        return image.clamp(-1, 1)


def to_pil(image: torch.Tensor):
    """(1, 3, H, W) in [-1, 1] -> PIL image."""
    from PIL import Image

    arr = ((image[0].float().permute(1, 2, 0).cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def save_generation(image: torch.Tensor, settings: GenerateSettings, out: str | Path, extra: dict | None = None) -> Path:
    """Write the PNG and ``<out>.json`` with the settings used."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(out)
    meta = {**asdict(settings), **(extra or {})}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    return out
