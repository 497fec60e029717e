"""``IDFluxPipeline``: the engine behind diffusers' pipeline conventions.

A ``diffusers.DiffusionPipeline`` subclass: ``IDFluxPipeline.from_pretrained(source)`` builds
FLUX, the identity adapter and the face models; ``.to(device)``; ``pipe(prompt, ref_images=...)``
detects the face of each reference photo, embeds it (ArcFace + SigLIP) and denoises with the
identity kept inside each reference's box, returning ``.images`` as PIL images, a tensor or an
array (``output_type``), with the settings of each image for the JSON sidecar. Every argument is
checked before any denoising starts. The training/eval entry point stays
:meth:`idflux.engine.pipeline.Pipeline.generate` (embeddings in, a [-1, 1] tensor out), which this
class runs.

Example (the tiny preset: random weights, CPU, seconds):
    >>> import numpy as np
    >>> pipe = IDFluxPipeline.from_pretrained("tiny")
    >>> face = np.full((64, 64, 3), 128, np.uint8)
    >>> out = pipe("a person", ref_images=[face], height=64, width=96, num_inference_steps=2)
    >>> out.images[0].size, out.settings[0]["boxes"]
    ((96, 64), None)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from idflux.engine.adapter import AdapterConfig, IdentityAdapter, flux_dev_adapter, tiny_adapter
from idflux.engine.faces import BaseFaceDetector, SiglipFaceEncoder, as_rgb_uint8, encode_references
from idflux.engine.loading import FluxParts
from idflux.engine.lowvram import FP8
from idflux.engine.pipeline import GenerateSettings, Pipeline, tiny_components
from idflux.engine.regions import MAX_REFERENCES, TOKEN_PIXELS, parse_boxes

#: What ``output_type`` takes.
OUTPUT_TYPES = ("pil", "pt", "np")


@dataclass
class IDFluxPipelineOutput(BaseOutput):
    """images: list of PIL images (``"pil"``), a (B, 3, H, W) float tensor in [0, 1] (``"pt"``) or a
    (B, H, W, 3) float32 array in [0, 1] (``"np"``); settings: per image, the settings used (the
    fields of :class:`~idflux.engine.pipeline.GenerateSettings` plus height, width, seconds), what
    ``idflux generate`` writes to the JSON sidecar."""

    images: Any
    settings: list


def read_reference_image(image, name: str = "ref_images[0]") -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image, such an array, or a path to an image file.

    A missing, unreadable, truncated or non-image file raises ValueError naming ``name``.
    """
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{name}: image file {path} not found")
        try:
            with Image.open(path) as img:
                img.load()  # decodes everything: a truncated file fails here, not later
                return np.array(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{name}: {path} is not a readable image ({exc})") from None
    try:
        return as_rgb_uint8(image, name)
    except ValueError:
        raise
    except Exception as exc:  # a PIL image that fails to decode on convert()
        raise ValueError(f"{name}: cannot read the image ({exc})") from None


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


class IDFluxPipeline(DiffusionPipeline):
    r"""Identity-consistent multi-person FLUX (WithAnyone) with diffusers' conventions.

    Components: ``transformer``, ``vae``, ``text_encoder`` + ``tokenizer`` (CLIP),
    ``text_encoder_2`` + ``tokenizer_2`` (T5), ``adapter`` (:class:`IdentityAdapter`), and the
    optional ``face_detector`` (:class:`BaseFaceDetector`) and ``siglip`` (:class:`SiglipFaceEncoder`)
    that turn reference photos into identity inputs.

    Build with :meth:`from_pretrained` (``"tiny"`` or a FLUX.1-dev source) or from components.
    ``max_text_tokens``: T5 sequence length (512 for FLUX.1-dev); ``offload``: text encoders and VAE
    on the CPU between their stages; ``fp8``: the transformer's Linear weights stored in float8;
    ``backend``: the kernels' backend (``"auto"``, ``"triton"``, ``"torch"``).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["face_detector", "siglip"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, adapter: IdentityAdapter,
                 face_detector: BaseFaceDetector | None = None, siglip: SiglipFaceEncoder | None = None, *,
                 max_text_tokens: int = 512, device="cpu", dtype: torch.dtype = torch.float32, backend: str = "auto",
                 offload: bool = False, fp8: bool = False, cuda_graph: bool = False, group_offload: bool = False,
                 default_size: int = 1024):
        super().__init__()
        parts = FluxParts(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, max_text_tokens)
        _check_compatible(parts, adapter, siglip)
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, adapter=adapter,
                              face_detector=face_detector, siglip=siglip)
        self.engine = Pipeline(parts, adapter, device=device, dtype=dtype, backend=backend, offload=offload, fp8=fp8,
                               cuda_graph=cuda_graph, group_offload=group_offload)
        if siglip is not None:
            siglip.to(self.engine.device, dtype)
        self.default_size = default_size
        self.source = None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = "tiny", *, adapter: str | os.PathLike | None = None,
                        face_models: str | os.PathLike | None = None, siglip: str | os.PathLike | None = None,
                        torch_dtype: torch.dtype | None = None, fp8: bool = False, offload: bool = False,
                        group_offload: bool = False, lora=None, lora_scale: float = 1.0, device=None,
                        backend: str = "auto", cuda_graph: bool = False, transformer: str | os.PathLike | None = None,
                        ae: str | os.PathLike | None = None, clip: str | os.PathLike | None = None,
                        t5: str | os.PathLike | None = None, flux_transformer: str | os.PathLike | None = None,
                        tiny_world: str | os.PathLike | None = None, seed: int = 0) -> "IDFluxPipeline":
        """Build the pipeline; nothing is downloaded.

        source: ``"tiny"`` (the tiny preset, CPU, seconds: the shipped trained tiny world when it is
            built (``tiny_world``: another world folder), else random tiny models), ``"tiny-random"``
            (always the random tiny models), or FLUX.1-dev: a diffusers folder, a folder of BFL files,
            a Hub id in the local cache or a single transformer file (see
            :func:`idflux.engine.loading.load_flux`; ``transformer``/``ae``/``clip``/``t5`` override a part,
            ``flux_transformer`` is the older name of ``transformer``).
        adapter: an idflux adapter file (``idflux export`` / ``save_adapter``), for both presets, or
            the released ``withanyone.safetensors`` (FLUX.1-dev); None: the tiny preset's own adapter
            (required for FLUX.1-dev).
        face_models: insightface antelopev2 folder (required for FLUX.1-dev; tiny: its stand-in).
        siglip: ``google/siglip-base-patch16-256-i18n`` folder (required for FLUX.1-dev).
        torch_dtype: default bf16 on CUDA, fp32 on the CPU. device: default CPU (or move with ``.to``).
        fp8 / offload / group_offload: low-VRAM options (fp8 weights converted on the CPU while loading;
            text encoders and VAE on the CPU between stages; transformer blocks streamed to the device).
        lora: a LoRA file, or a list of files or (file, scale) pairs, loaded with
            :meth:`load_lora_weights` (``lora_scale`` for plain files).
        Missing FLUX.1-dev inputs are named all at once in one error before any weight is read.
        """
        device = torch.device(device or "cpu")
        dtype = torch_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        flux_kwargs = {k: v for k, v in (("transformer", transformer or flux_transformer), ("ae", ae), ("clip", clip),
                                         ("t5", t5)) if v is not None}
        if str(source) in ("tiny", "tiny-random"):
            if flux_kwargs:
                raise ValueError(f"from_pretrained: {sorted(flux_kwargs)} apply to FLUX.1-dev sources, not {str(source)!r}")
            parts, adapter_module, detector, encoder = _tiny(str(source) == "tiny-random", tiny_world, adapter, seed)
            if face_models is not None:
                detector = _face_detector(face_models)
            if siglip is not None:
                encoder = SiglipFaceEncoder.from_pretrained(siglip)
            default_size = 64
        else:
            missing = [flag for flag, value in (("adapter", adapter), ("face_models", face_models), ("siglip", siglip))
                       if value is None]
            if missing:
                raise ValueError(f"from_pretrained({str(source)!r}): FLUX.1-dev also needs {', '.join(missing)} (local paths; "
                                 "nothing is downloaded); for a quick CPU try without weights use source='tiny'")
            from idflux.engine.loading import load_flux

            parts = load_flux(source, dtype=dtype, fp8=fp8, fp8_t5=fp8, **flux_kwargs)
            adapter_module = _adapter_from(adapter, flux_dev_adapter())
            detector, encoder = _face_detector(face_models), SiglipFaceEncoder.from_pretrained(siglip)
            default_size = 1024
        pipe = cls(parts.transformer, parts.vae, parts.clip, parts.clip_tokenizer, parts.t5, parts.t5_tokenizer,
                   adapter_module, detector, encoder, max_text_tokens=parts.max_text_tokens, device=device, dtype=dtype,
                   backend=backend, offload=offload, fp8=fp8, cuda_graph=cuda_graph, group_offload=group_offload,
                   default_size=default_size)
        pipe.source = {"source": str(source), "adapter": None if adapter is None else str(adapter),
                       "face_models": None if face_models is None else str(face_models),
                       "siglip": None if siglip is None else str(siglip), "fp8": fp8, "offload": offload,
                       "group_offload": group_offload}
        loras = [] if lora is None else [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)
        for i, item in enumerate(loras):
            path, scale = item if isinstance(item, (tuple, list)) else (item, lora_scale)
            pipe.load_lora_weights(path, adapter_name=f"lora{i}", scale=scale)
        pipe.source["lora"] = [str(x[0] if isinstance(x, (tuple, list)) else x) for x in loras]
        return pipe

    def load_lora_weights(self, path: str | os.PathLike, adapter_name: str | None = None, scale: float = 1.0):
        """Load a LoRA for the FLUX backbone (diffusers/kohya/BFL layouts) at ``scale``; see
        :mod:`idflux.engine.lora`. Works with fp8 storage. Returns the adapter name used."""
        from idflux.engine import lora as lora_mod

        if not _is_number(scale):
            raise ValueError(f"load_lora_weights: scale must be a finite number, got {scale!r}")
        name = lora_mod.load_lora(self.engine.parts.transformer, path, adapter_name=adapter_name, scale=scale)
        return name

    # -- device and dtype --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def _execution_device(self) -> torch.device:
        return self.engine.device

    def to(self, *args, **kwargs) -> "IDFluxPipeline":
        """Move to a device and/or cast to a dtype (``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``,
        ``pipe.to(device=..., dtype=...)``). With ``offload`` the text encoders and the VAE stay on the
        CPU until their stage; fp8-stored weights stay fp8."""
        kwargs.pop("silence_dtype_warnings", None)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        engine = self.engine
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("IDFluxPipeline.to: CUDA is not available on this machine; use 'cpu'")
            if engine.cuda_graph and device.type != "cuda":
                raise ValueError(f"IDFluxPipeline.to: cuda_graph=True needs a CUDA device, got {device}")
        parts = engine.parts
        modules = [parts.transformer, parts.vae, parts.clip, parts.t5, engine.adapter]
        if self.siglip is not None:
            modules.append(self.siglip)
        for m in modules:
            stays_on_cpu = engine.offload and m in (parts.vae, parts.clip, parts.t5)
            target = None if (device is None or stays_on_cpu) else device

            def move(t, target=target):
                cast = dtype if (dtype is not None and t.is_floating_point() and t.dtype != FP8) else None
                return t.to(device=target, dtype=cast) if (target is not None or cast is not None) else t

            m._apply(move)
        if device is not None:
            engine.device = device
        if dtype is not None:
            engine.dtype = dtype
        return self

    # -- generation --------------------------------------------------------------------------------

    def check_inputs(self, prompt, ref_images, boxes, height, width, num_inference_steps, guidance_scale, id_weight,
                     siglip_weight, output_type, generator, callback_on_step_end, callback_on_step_end_tensor_inputs):
        """Raise ValueError naming the first bad argument; returns (prompts, reference arrays)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if ref_images is None:
            raise ValueError("ref_images: pass one reference photo per person (PIL images, uint8 HxWx3 arrays or paths)")
        if isinstance(ref_images, (str, os.PathLike, np.ndarray)) or hasattr(ref_images, "convert"):
            ref_images = [ref_images]
        ref_images = list(ref_images)
        if not 1 <= len(ref_images) <= MAX_REFERENCES:
            raise ValueError(f"ref_images: {len(ref_images)} given; pass 1 to {MAX_REFERENCES} reference photos")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < TOKEN_PIXELS or value % TOKEN_PIXELS:
                raise ValueError(f"{name} must be a positive multiple of {TOKEN_PIXELS} pixels, got {value!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        for name, value in (("guidance_scale", guidance_scale), ("id_weight", id_weight), ("siglip_weight", siglip_weight)):
            if not _is_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if boxes is not None:
            if len(boxes) > len(ref_images):
                raise ValueError(f"boxes: {len(boxes)} boxes for {len(ref_images)} ref_images; give one box per "
                                 "reference (or boxes=None: every reference on the whole image)")
            try:
                parse_boxes(boxes, len(ref_images), height, width)
            except ValueError as exc:
                raise ValueError(f"boxes: {exc}") from None
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"generator: a list of {len(generator)} generators for {len(prompts)} prompts; "
                             "give one per image or a single generator")
        if generator is not None and not all(isinstance(g, torch.Generator) for g in
                                             (generator if isinstance(generator, list) else [generator])):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError("callback_on_step_end must be callable(pipe, step_index, timestep, callback_kwargs)")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {bad} not in {self._callback_tensor_inputs}")
        refs = [read_reference_image(img, f"ref_images[{i}]") for i, img in enumerate(ref_images)]
        return list(prompts), refs

    def encode_references(self, refs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference photos -> (ArcFace embeddings (R, D), SigLIP tokens (R, T, D') or None);
        ValueError naming the reference where no face is found."""
        if self.face_detector is None:
            raise ValueError("IDFluxPipeline: no face_detector; build with from_pretrained(..., face_models=DIR)")
        try:
            arc, sig = encode_references(refs, self.face_detector, self.siglip)
        except ValueError as exc:
            raise ValueError(f"ref_images: {exc}") from None
        return arc, sig

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], ref_images=None, boxes=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 id_weight: float = 1.0, siglip_weight: float = 1.0, released_shift: bool = False,
                 latents: torch.Tensor | None = None, return_dict: bool = True,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",)):
        """Generate one image per prompt with the identities of ``ref_images``.

        Args:
            prompt: a string, or a list of strings (one image each, same references and boxes).
            ref_images: 1-4 reference photos, one person each: PIL images, (H, W, 3) uint8 RGB
                arrays, or image paths. Each photo's most confident face is used.
            boxes: None (every reference on the whole image, the released default), or one
                (x1, y1, x2, y2) per reference in output pixels (or all in 0..1), in reference order.
            height, width: output size in pixels, multiples of 16 (default: 1024, tiny preset 64).
            num_inference_steps, guidance_scale: Euler steps of the flow sampler and FLUX's guidance
                embedding. generator: torch.Generator (or one per prompt) for the initial noise; None
                draws a seed from torch's global RNG (recorded in ``settings``).
            output_type: ``"pil"`` (list of PIL), ``"pt"`` ((B, 3, H, W) float in [0, 1]) or ``"np"``
                ((B, H, W, 3) float32 in [0, 1]).
            id_weight, siglip_weight: scales of the ArcFace and SigLIP branches (0 turns one off).
            released_shift: the released inference's time shift (for parity with its images).
            latents: (B, C, H/8, W/8) initial noise instead of drawing it.
            callback_on_step_end: ``fn(pipe, step_index, timestep, callback_kwargs) -> dict`` after each
                step (diffusers' convention; ``timestep`` is t x 1000 as in diffusers' FLUX pipeline;
                ``callback_kwargs["latents"]`` the packed latents, replaced if the dict returns them).

        Returns:
            :class:`IDFluxPipelineOutput` (``.images``, ``.settings``), or ``(images,)`` when
            ``return_dict=False``. Bad input raises ValueError naming the argument before any work.
        """
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prompts, refs = self.check_inputs(prompt, ref_images, boxes, height, width, num_inference_steps, guidance_scale,
                                          id_weight, siglip_weight, output_type, generator, callback_on_step_end,
                                          list(callback_on_step_end_tensor_inputs))
        B = len(prompts)
        lat_shape = self.engine.latent_shape(height, width)
        if latents is not None and tuple(latents.shape) != (B, *lat_shape):
            raise ValueError(f"latents must have shape {(B, *lat_shape)}, got {tuple(latents.shape)}")
        started = time.perf_counter()
        arc, sig = self.encode_references(refs)
        seeds, noise = self._noise(B, lat_shape, generator, latents)
        box_list = None if boxes is None else [list(map(float, b)) for b in boxes]
        settings = [GenerateSettings(prompt=p, boxes=box_list, size=height, steps=num_inference_steps,
                                     guidance=float(guidance_scale), seed=s, id_weight=float(id_weight),
                                     siglip_weight=float(siglip_weight), released_shift=bool(released_shift),
                                     height=height, width=width) for p, s in zip(prompts, seeds)]
        bar = self.progress_bar(total=num_inference_steps)

        def on_step(i, t, x):
            bar.update(1)
            if callback_on_step_end is None:
                return None
            kwargs = {k: x for k in callback_on_step_end_tensor_inputs}
            out = callback_on_step_end(self, i, torch.tensor(t * 1000.0), kwargs) or {}
            return out.pop("latents", None)

        try:
            image = self.engine.generate_batch(settings, [arc] * B, [sig] * B, progress=False, noise=noise, callback=on_step)
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        from idflux.engine.lowvram import peak_memory

        peak = peak_memory(self.engine.device)  # the process's high-water mark (CUDA: max allocated)
        records = [{**asdict(s), "seconds": round(seconds, 3), "n_refs": len(refs), "peak_memory": peak} for s in settings]
        images = self.postprocess(image, output_type)
        if not return_dict:
            return (images,)
        return IDFluxPipelineOutput(images=images, settings=records)

    def _noise(self, B: int, shape: tuple, generator, latents) -> tuple[list, torch.Tensor | None]:
        if latents is not None:
            return [None] * B, latents
        if generator is None:
            seeds = [int(s) for s in torch.randint(0, 2 ** 31 - 1, (B,))]
            gens = [torch.Generator().manual_seed(s) for s in seeds]
        elif isinstance(generator, list):
            gens = generator
            seeds = [g.initial_seed() for g in gens]
        else:
            noise = torch.randn((B, *shape), generator=generator, device=generator.device)
            return [generator.initial_seed()] * B, noise
        noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device).cpu() for g in gens])
        return seeds, noise

    @staticmethod
    def postprocess(image: torch.Tensor, output_type: str):
        """(B, 3, H, W) in [-1, 1] -> ``output_type`` in [0, 1] (PIL: rounded to uint8)."""
        x = ((image.float() + 1) / 2).clamp(0, 1).cpu()
        if output_type == "pt":
            return x
        arr = x.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arr
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def _adapter_from(path, cfg: AdapterConfig) -> IdentityAdapter:
    from idflux.engine.weights import load_any_adapter

    if isinstance(path, IdentityAdapter):
        if path.cfg != cfg:
            raise ValueError(f"adapter: made for {path.cfg}, this backbone takes {cfg}")
        return path
    return load_any_adapter(path, cfg)


def _face_detector(path) -> BaseFaceDetector:
    if isinstance(path, BaseFaceDetector):
        return path
    from idflux.engine.faces import FaceDetector

    return FaceDetector(path)


def _tiny(random_only: bool, world_root, adapter, seed: int):
    """(parts, adapter, detector, siglip) of the tiny preset: the trained tiny world when built (or
    ``world_root``), else the random tiny models."""
    from idflux.engine.loading import load_tiny_world, tiny_world_available

    if not random_only and (world_root is not None or tiny_world_available()):
        from idflux.engine.faces import CenterFaceDetector

        world = load_tiny_world(world_root)
        if adapter is not None:
            module = _adapter_from(adapter, world.adapter_config)
        elif world.adapter_path is not None:
            module = _adapter_from(world.adapter_path, world.adapter_config)
        else:
            torch.manual_seed(seed)
            module = IdentityAdapter(world.adapter_config)
        return world.parts, module, CenterFaceDetector(world.recognizer), world.siglip
    from idflux.engine.faces import tiny_face_models

    parts, own = tiny_components(seed)
    module = _adapter_from(adapter, tiny_adapter()) if adapter is not None else own
    detector, encoder = tiny_face_models(arc_dim=module.cfg.arc_dim, siglip_dim=module.cfg.siglip_dim,
                                         siglip_tokens=module.cfg.siglip_tokens)
    return parts, module, detector, encoder


def _check_compatible(parts: FluxParts, adapter: IdentityAdapter, siglip: SiglipFaceEncoder | None) -> None:
    """The adapter must fit the backbone (width, block count) and the SigLIP encoder (width, tokens)."""
    cfg, tc = adapter.cfg, parts.transformer.config
    width = tc.num_attention_heads * tc.attention_head_dim
    blocks = tc.num_layers + tc.num_single_layers
    if cfg.hidden != width or cfg.n_blocks != blocks:
        raise ValueError(f"adapter: made for a FLUX of width {cfg.hidden} with {cfg.n_blocks} blocks, but the transformer "
                         f"has width {width} and {blocks} blocks; use the adapter trained for this backbone")
    if siglip is not None and (siglip.hidden_size != cfg.siglip_dim or siglip.num_tokens != cfg.siglip_tokens):
        raise ValueError(f"siglip: the encoder gives {siglip.num_tokens} tokens of {siglip.hidden_size}, the adapter "
                         f"takes {cfg.siglip_tokens} of {cfg.siglip_dim}")
