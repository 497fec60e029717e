"""Generation: prompt + identity inputs + boxes -> image, with the adapter's K/V computed once.

``Pipeline`` holds the frozen FLUX parts and the identity adapter. ``generate`` takes identity
inputs already embedded (ArcFace embeddings and SigLIP tokens per reference), which is what
training and evaluation need; the CLI's image-to-image path (faces detected in reference photos)
feeds the same call.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from idflux.engine.adapter import IdentityAdapter, RegionLayout, tiny_adapter
from idflux.engine.flux import flux_forward, image_ids, pack_latents, unpack_latents
from idflux.engine.graphs import GraphedStep
from idflux.engine.loading import FluxParts, tiny_flux_parts
from idflux.engine.lowvram import enable_group_offload, on_device, store_linears_fp8
from idflux.engine.profiling import nvtx_range
from idflux.engine.regions import TOKEN_PIXELS, boxes_to_membership, parse_boxes
from idflux.engine.sampling import euler_sample, sampling_mu, schedule


@dataclass
class GenerateSettings:
    """Settings of one generation (written next to the image)."""

    prompt: str
    boxes: list | None = None
    """Per reference (x1, y1, x2, y2) in output pixels (or all normalised 0..1); None: every
    reference on the whole image (the released default without boxes)."""
    size: int = 1024
    """Output side in pixels (a multiple of 16) when ``height`` / ``width`` are not given."""
    steps: int = 25
    guidance: float = 4.0
    seed: int = 1234
    id_weight: float = 1.0
    """Scale of the ArcFace branch's residual."""
    siglip_weight: float = 1.0
    """Scale of the SigLIP branch's residual (0 skips the branch)."""
    released_shift: bool = False
    """Use the released inference's time shift ((W/8)(H/8)//256 tokens) for parity with its images."""
    height: int | None = None
    """Output height in pixels (a multiple of 16); default ``size``."""
    width: int | None = None
    """Output width in pixels (a multiple of 16); default ``size``."""

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the output in pixels."""
        return (self.size if self.height is None else self.height, self.size if self.width is None else self.width)

    def validate(self) -> "GenerateSettings":
        """Raise ValueError naming the first bad field (before any work); returns self."""
        height, width = self.hw
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < TOKEN_PIXELS or value % TOKEN_PIXELS:
                raise ValueError(f"{name} must be a positive multiple of {TOKEN_PIXELS} pixels, got {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps (num_inference_steps) must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        for name in ("guidance", "id_weight", "siglip_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        return self


def tiny_components(seed: int = 0) -> tuple[FluxParts, IdentityAdapter]:
    """The tiny preset's FLUX parts and its adapter (random from ``seed``), as ``Pipeline.tiny`` and
    ``IDFluxPipeline.from_pretrained("tiny")`` build them."""
    torch.manual_seed(seed)
    adapter = IdentityAdapter(tiny_adapter())
    return tiny_flux_parts(seed), adapter


class Pipeline:
    """FLUX + identity adapter. Build with :meth:`tiny` (random, CPU, seconds) or from local weights."""

    def __init__(self, parts: FluxParts, adapter: IdentityAdapter, *, device="cpu", dtype=torch.float32, backend="auto",
                 offload: bool = False, fp8: bool = False, cuda_graph: bool = False, group_offload: bool = False):
        """offload: keep the text encoders and the VAE on the CPU, moving each to ``device`` only for its
        stage. fp8: store the frozen FLUX transformer's Linear weights in float8 (upcast per matmul).
        cuda_graph: capture the denoising step (FLUX + adapter) once per generation in a CUDA graph
        and replay it at every step (no Python or launch work between kernels; see
        :class:`idflux.engine.graphs.GraphedStep`); CUDA only. group_offload: the transformer stays on
        the CPU and its blocks move to ``device`` one group at a time (diffusers group offloading, CUDA)."""
        self.parts, self.adapter = parts, adapter
        self.device, self.dtype, self.backend, self.offload = torch.device(device), dtype, backend, offload
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"Pipeline: cuda_graph=True needs a CUDA device, got device={self.device}; "
                             "drop cuda_graph on this device")
        self.cuda_graph = cuda_graph
        if fp8:  # on the CPU, before the move: the full-precision transformer never reaches the device
            store_linears_fp8(parts.transformer)
        streamed = group_offload and self.device.type == "cuda"
        for m in (parts.transformer, parts.vae, parts.clip, parts.t5, adapter):
            if any(p.dtype != dtype for p in m.parameters()):
                m.to(dtype)
            if not (offload and m in (parts.vae, parts.clip, parts.t5)) and not (streamed and m is parts.transformer):
                m.to(self.device)
        if streamed:
            enable_group_offload(parts.transformer, self.device)

    @classmethod
    def from_pretrained(cls, source: str = "tiny", **kw) -> "Pipeline":
        """The engine of :meth:`idflux.engine.IDFluxPipeline.from_pretrained` (same arguments: ``adapter``
        for both presets, FLUX.1-dev sources, low-VRAM options); for training and evaluation code that
        passes embeddings to :meth:`generate`. The face models stay with the IDFluxPipeline."""
        from idflux.engine.diffusers_pipeline import IDFluxPipeline

        return IDFluxPipeline.from_pretrained(source, **kw).engine

    @classmethod
    def tiny(cls, seed: int = 0, **kw) -> "Pipeline":
        """The tiny preset (CPU, seconds): :func:`tiny_components` of ``seed``."""
        return cls(*tiny_components(seed), **kw)

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
        """One image (1, 3, H, W) in [-1, 1] for ``settings`` and R references.

        arc_emb: (R, arc_dim) raw ArcFace embeddings; siglip_tokens: (R, siglip_tokens, siglip_dim) or None.
        """
        return self.generate_batch([settings], [arc_emb], [siglip_tokens], progress=progress)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of the initial noise for an image of ``height`` x ``width`` pixels."""
        return self.parts.vae.config.latent_channels, height // 8, width // 8

    @torch.no_grad()
    def generate_batch(self, settings: list[GenerateSettings], arc_embs: list[torch.Tensor],
                       siglip_tokens: list[torch.Tensor | None], *, progress: bool = True,
                       noise: torch.Tensor | None = None,
                       callback: Callable[[int, float, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        """B images (B, 3, H, W) in one denoising loop: a prompt, references, boxes and seed each.

        Size, steps, guidance, shift and the two branch weights must agree across the batch (one
        schedule, one adapter context); the number of references may differ (padded references own
        keys no token attends to). Image b equals ``generate(settings[b], ...)`` up to batching's
        floating-point differences.

        noise: (B, C, H/8, W/8) initial latents instead of those drawn from each settings' seed.
        callback(i, t, tokens): after every step i with the packed latents (B, N, 4C); a tensor it
        returns replaces them (see :func:`idflux.engine.sampling.euler_sample`).
        """
        if not (len(settings) == len(arc_embs) == len(siglip_tokens)) or not settings:
            raise ValueError(f"generate_batch: settings, arc_embs and siglip_tokens must be non-empty lists of one length, "
                             f"got {len(settings)}, {len(arc_embs)}, {len(siglip_tokens)}")
        for x in settings:
            x.validate()
        first = settings[0]
        for field_name in ("hw", "steps", "guidance", "released_shift", "id_weight", "siglip_weight"):
            values = {getattr(x, field_name) for x in settings}
            if len(values) > 1:
                raise ValueError(f"generate_batch: settings.{field_name} differs across the batch ({sorted(values)}); "
                                 "run those images in separate batches")
        if len({t is None for t in siglip_tokens}) > 1:
            raise ValueError("generate_batch: siglip_tokens must be given for every image or for none")
        height, width = first.hw
        B, R = len(settings), max(a.shape[0] for a in arc_embs)
        boxes = [parse_boxes(x.boxes, a.shape[0], height, width) for x, a in zip(settings, arc_embs)]
        lat_ch, h, w = self.latent_shape(height, width)
        if noise is not None and tuple(noise.shape) != (B, lat_ch, h, w):
            raise ValueError(f"generate_batch: noise has shape {tuple(noise.shape)}, expected {(B, lat_ch, h, w)}")
        layout = RegionLayout.from_membership(boxes_to_membership(boxes, height, width), R).to(self.device)  # built on the host
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
        if noise is None:
            noise = torch.cat([torch.randn(1, lat_ch, h, w, generator=torch.Generator(device="cpu").manual_seed(x.seed))
                               for x in settings])
        noise = noise.to(self.device, self.dtype)
        img_ids = image_ids(h // 2, w // 2, device=self.device, dtype=self.dtype)
        txt_ids = torch.zeros(txt.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = torch.full((B,), first.guidance, device=self.device, dtype=self.dtype)
        times = schedule(first.steps, sampling_mu(height, width, released_parity=first.released_shift))

        def velocity(x, t):
            return flux_forward(self.parts.transformer, x, txt, pooled, t, img_ids, txt_ids, guidance,
                                adapter=self.adapter, adapter_ctx=ctx)

        step = GraphedStep(velocity) if self.cuda_graph else velocity  # captured on the first step
        tokens = euler_sample(step, pack_latents(noise), times, progress=progress, callback=callback)
        latents = unpack_latents(tokens, h, w)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        with nvtx_range("vae.decode"), on_device(vae, self.device, self.offload):
            image = vae.decode(latents).sample
        return image.clamp(-1, 1)


def to_pil(image: torch.Tensor, index: int = 0):
    """Image ``index`` of (B, 3, H, W) in [-1, 1] -> PIL image."""
    from PIL import Image

    arr = ((image[index].float().permute(1, 2, 0).cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def sidecar_path(out: str | Path) -> Path:
    """The settings JSON written beside image ``out``: the full image name + ``.json``
    (``o.png`` -> ``o.png.json``), so ``o.png`` and ``o.jpg`` never share one."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def boxes_path(out: str | Path) -> Path:
    """The preview with the boxes and prompt drawn, beside image ``out``: ``o.png`` -> ``o.boxes.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.boxes.png")


def draw_boxes(image, boxes, prompt: str = ""):
    """A copy of PIL ``image`` with each reference's box outlined and numbered (in output pixels;
    None: every reference on the whole image) and the prompt written along the bottom."""
    from PIL import ImageDraw, ImageFont

    colours = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0)]
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    W, H = out.size
    if boxes is None:
        draw.rectangle((0, 0, W - 1, H - 1), outline=colours[0], width=2)
        draw.text((4, 2), "all references: whole image", fill=colours[0], font=font)
    for i, (x1, y1, x2, y2) in enumerate(boxes or []):
        colour = colours[i % len(colours)]
        draw.rectangle((x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)), outline=colour, width=2)
        draw.text((x1 + 3, y1 + 2), f"ref {i}", fill=colour, font=font)
    if prompt:
        text = prompt if len(prompt) <= max(W // 6, 8) else prompt[: max(W // 6, 8) - 3] + "..."
        draw.rectangle((0, H - 14, W, H), fill=(0, 0, 0))
        draw.text((3, H - 13), text, fill=(255, 255, 255), font=font)
    return out


def save_generation(image: torch.Tensor, settings: GenerateSettings, out: str | Path, extra: dict | None = None, *,
                    index: int = 0, preview: bool = False) -> Path:
    """Write image ``index`` of ``image`` to ``out`` (format from its extension), the settings used to
    :func:`sidecar_path` (``<out>.json``, e.g. ``o.png.json``) and, with ``preview``, the boxes and
    prompt drawn to :func:`boxes_path` (``o.boxes.png``). Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pil = to_pil(image, index)
    pil.save(out)
    meta = {**asdict(settings), "height": settings.hw[0], "width": settings.hw[1], **(extra or {})}
    sidecar_path(out).write_text(json.dumps(meta, indent=1, default=str))
    if preview:
        height, width = settings.hw
        pixel_boxes = None if settings.boxes is None else parse_boxes(settings.boxes, len(settings.boxes), height, width)
        draw_boxes(pil, pixel_boxes, settings.prompt).save(boxes_path(out))
    return out
