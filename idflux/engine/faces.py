"""Faces for the identity branches: detection + ArcFace embedding, the square face crop, SigLIP tokens.

- :class:`FaceDetector`: insightface ``FaceAnalysis`` with the antelopev2 pack (SCRFD-10G detector,
  glintr100 recogniser) from a local folder; never downloads. Gives boxes, 5-point landmarks and
  the raw (not normalised) 512-d embedding WithAnyone's ArcFace branch takes.
- :func:`square_face_crop`: the released reference crop (box grown to a square, clipped, resized
  to 512) that the SigLIP branch sees.
- :class:`SiglipFaceEncoder`: the ``google/siglip-base-patch16-256-i18n`` vision tower from a local
  folder -> ``last_hidden_state`` (n, 256, 768) of those crops.
- :class:`CenterFaceDetector` and :func:`tiny_face_models`: weight-free stand-ins for tests and the
  tiny engine preset (not face detectors: for tests and demos only).
- :func:`encode_references`: reference photos -> (ArcFace embeddings, SigLIP tokens), what
  ``Pipeline.generate`` takes.

Images are (H, W, 3) uint8 RGB numpy arrays (PIL images are converted); insightface's BGR order is
handled inside :class:`FaceDetector`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from idflux.kernels.face_warp import face_warp
from idflux.kernels.face_warp_ref import arcface_template

#: antelopev2 files FaceDetector needs: file -> role.
ANTELOPEV2_FILES = {
    "scrfd_10g_bnkps.onnx": "detection: SCRFD-10G, boxes + 5 landmarks",
    "glintr100.onnx": "recognition: ArcFace IResNet-100 (Glint360K), 512-d embedding",
}
#: The rest of the pack (present in antelopev2.zip, not loaded).
ANTELOPEV2_UNUSED = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx")
ANTELOPEV2_SOURCE = ("insightface's model zoo: antelopev2.zip from https://github.com/deepinsight/insightface/releases "
                     "(unzip so that <folder>/scrfd_10g_bnkps.onnx exists, e.g. <root>/models/antelopev2/)")
SIGLIP_ID = "google/siglip-base-patch16-256-i18n"
_SIGLIP_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixels of the image it was found in."""

    box: tuple[float, float, float, float]
    """(x1, y1, x2, y2)."""
    landmarks: np.ndarray
    """(5, 2) float32 (x, y): left eye, right eye, nose, left and right mouth corners (ArcFace order)."""
    embedding: np.ndarray
    """(D,) float32 raw recogniser embedding (insightface's ``face.embedding``, not L2-normalised)."""
    score: float
    """Detector confidence."""


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB array from an array of that form or a PIL image; ValueError otherwise."""
    if not isinstance(image, np.ndarray) and hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be an (H, W, 3) uint8 RGB array or a PIL image, got {desc}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


class BaseFaceDetector(abc.ABC):
    """Finds faces with landmarks and embeddings in RGB images."""

    @abc.abstractmethod
    def detect(self, image) -> list[Face]:
        """Faces of ``image`` ((H, W, 3) uint8 RGB), sorted left to right (box x1, then y1); [] if none."""

    def reference_face(self, image) -> Face:
        """The face of a reference photo: the most confident detection (ties: the larger box).

        The released inference takes insightface's first face, which is its most confident one.
        Raises ValueError when no face is found.
        """
        faces = self.detect(image)
        if not faces:
            raise ValueError("no face found in the reference image; use a photo where the face is visible, "
                             "frontal enough and larger than about 64 pixels")
        return max(faces, key=lambda f: (f.score, (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))


def _sorted(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


def resolve_antelopev2(path) -> Path:
    """The folder holding antelopev2's ``scrfd_10g_bnkps.onnx`` and ``glintr100.onnx``.

    ``path`` may be that folder, an insightface root holding ``models/antelopev2/``, or a folder
    holding ``antelopev2/`` (also one level deeper, as antelopev2.zip unpacks). Raises
    FileNotFoundError listing the expected files and where they come from.
    """
    root = Path(path).expanduser()
    candidates = [root, root / "antelopev2", root / "antelopev2" / "antelopev2", root / "models" / "antelopev2",
                  root / "models" / "antelopev2" / "antelopev2"]
    for folder in candidates:
        if all((folder / f).is_file() for f in ANTELOPEV2_FILES):
            return folder
    expected = "; ".join(f"{f} ({role})" for f, role in ANTELOPEV2_FILES.items())
    if not root.exists():
        state = f"{root} does not exist"
    else:
        present = [f for f in ANTELOPEV2_FILES if any((c / f).is_file() for c in candidates)]
        state = (f"{root} (or antelopev2/, models/antelopev2/ under it) lacks "
                 f"{[f for f in ANTELOPEV2_FILES if f not in present]}")
    raise FileNotFoundError(f"face models: {state}; expected the antelopev2 files {expected} (the pack also holds "
                            f"{', '.join(ANTELOPEV2_UNUSED)}, not needed); they come from {ANTELOPEV2_SOURCE}. "
                            "Nothing is downloaded")


class FaceDetector(BaseFaceDetector):
    """insightface ``FaceAnalysis`` with antelopev2 (detection + recognition), from local files only.

    Args:
        path: the antelopev2 folder or a root above it (see :func:`resolve_antelopev2`).
        providers: onnxruntime providers; default CUDA (when onnxruntime has it) then CPU.
        det_size: detector input side (640, insightface's classic default, stated explicitly because
            insightface >= 1 otherwise picks several sizes itself).
        det_thresh: detection threshold (0.4, the released inference's).

    ``detect`` returns faces sorted left to right by box x1 (reading order), each with the raw
    glintr100 embedding; the module the embedding comes from is :class:`idflux.engine.iresnet.IResNet`
    once loaded from the same glintr100.onnx.

    Example:
        >>> det = FaceDetector("~/.insightface/models/antelopev2")  # doctest: +SKIP
        >>> det.detect(rgb)[0].embedding.shape  # doctest: +SKIP
        (512,)
    """

    def __init__(self, path, *, providers: Sequence[str] | None = None, det_size: int = 640, det_thresh: float = 0.4):
        self.folder = resolve_antelopev2(path)
        try:
            import onnxruntime
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise ImportError("FaceDetector needs insightface and onnxruntime: pip install onnxruntime; "
                              "pip install --no-deps insightface (the Makefile does)") from exc
        if providers is None:
            cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.providers = list(providers)
        try:
            # An absolute, existing folder as ``name`` makes every insightface version use it as is
            # (os.path.join keeps the absolute part; insightface >= 1 checks is_dir), so it never downloads.
            self.app = FaceAnalysis(name=str(self.folder.resolve()), root=str(self.folder.parent),
                                    allowed_modules=["detection", "recognition"], providers=self.providers)
        except Exception as exc:  # onnxruntime raises plain Exceptions for truncated or corrupt files
            raise ValueError(f"face models: insightface cannot load the .onnx files in {self.folder} ({exc}); "
                             f"download them again from {ANTELOPEV2_SOURCE}") from exc
        for task, file in (("detection", "scrfd_10g_bnkps.onnx"), ("recognition", "glintr100.onnx")):
            model = self.app.models.get(task)
            if model is None or Path(getattr(model, "model_file", file)).name != file:
                got = None if model is None else Path(model.model_file).name
                raise ValueError(f"face models: insightface took {got} as the {task} model of {self.folder}, "
                                 f"expected {file}; keep only the antelopev2 files in that folder")
        ctx_id = 0 if any("CUDA" in str(p) for p in self.providers) else -1
        self.app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))

    def detect(self, image) -> list[Face]:
        bgr = np.ascontiguousarray(as_rgb_uint8(image)[:, :, ::-1])  # insightface works in BGR
        faces = []
        for f in self.app.get(bgr):
            if f.embedding is None or f.kps is None:
                continue
            faces.append(Face(box=tuple(float(v) for v in f.bbox[:4]),
                              landmarks=np.asarray(f.kps, dtype=np.float32).reshape(5, 2),
                              embedding=np.asarray(f.embedding, dtype=np.float32).reshape(-1),
                              score=float(f.det_score)))
        return _sorted(faces)


class CenterFaceDetector(BaseFaceDetector):
    """Stand-in detector for tests and demos only: every image is one centred face.

    The box is the image's central square (side = the shorter image side), the landmarks are the
    ArcFace template scaled into it, and the embedding is ``recognizer`` (e.g. a tiny random
    :class:`~idflux.engine.iresnet.IResNet`) on the :func:`~idflux.kernels.face_warp` crop. It finds
    nothing: it lets ``idflux generate --preset tiny`` and the tests run with no model files.

    Args:
        recognizer: module mapping (N, 3, S, S) RGB in [-1, 1] to (N, D) embeddings; S is its
            ``config.input_size`` when it has one, else 112.

    Example:
        >>> from idflux.engine.iresnet import IResNet, iresnet_tiny
        >>> det = CenterFaceDetector(IResNet(iresnet_tiny(embedding_dim=32)).eval())
        >>> face, = det.detect(np.zeros((60, 80, 3), np.uint8))
        >>> face.box, face.embedding.shape
        ((10.0, 0.0, 70.0, 60.0), (32,))
    """

    def __init__(self, recognizer: nn.Module):
        self.recognizer = recognizer
        self.input_size = int(getattr(getattr(recognizer, "config", None), "input_size", 112))

    @torch.no_grad()
    def detect(self, image) -> list[Face]:
        image = as_rgb_uint8(image)
        h, w = image.shape[:2]
        side = min(h, w)
        x0, y0 = (w - side) / 2, (h - side) / 2
        landmarks = arcface_template(112, dtype=torch.float32) * (side / 112) + torch.tensor([x0, y0])
        param = next(self.recognizer.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
        crop = face_warp(pixels, landmarks[None].to(device), torch.zeros(1, dtype=torch.long, device=device),
                         size=self.input_size, value_range=(0.0, 255.0))
        embedding = self.recognizer(crop.to(dtype))[0].float().cpu().numpy()
        return [Face(box=(x0, y0, x0 + side, y0 + side), landmarks=landmarks.numpy(), embedding=embedding, score=1.0)]


def square_face_crop(image, box, out_size: int = 512, *, expand: float = 1.0, border: str = "clip") -> np.ndarray:
    """The released reference crop: ``box`` grown to a square, cut out, resized to ``out_size``.

    As the released ``extract_moref``: the box is truncated to integers, its shorter side grown to
    the longer one (half the difference before, the rest after), then ``border="clip"`` (default,
    released) clips it to the image (a box at the border becomes a rectangle, stretched by the
    resize) while ``"pad"`` keeps it square and fills outside the image with black. ``expand``
    (default 1.0, released) scales the square's side about its centre first. Resized with PIL's
    Lanczos filter, as released.

    Args:
        image: (H, W, 3) uint8 RGB array or PIL image. box: (x1, y1, x2, y2) pixels.
        out_size: output side (512; the SigLIP processor resizes to 256 itself).

    Returns:
        (out_size, out_size, 3) uint8 RGB array.

    Example:
        >>> crop = square_face_crop(np.zeros((100, 200, 3), np.uint8), (20, 10, 60, 90), out_size=64)
        >>> crop.shape
        (64, 64, 3)
    """
    from PIL import Image

    image = as_rgb_uint8(image)
    try:
        x1, y1, x2, y2 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"square_face_crop: box={box!r} must be four numbers (x1, y1, x2, y2)") from None
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"square_face_crop: box={box!r} is empty (need x2 > x1 and y2 > y1)")
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f"square_face_crop: out_size={out_size!r} must be an integer >= 1 (512 as released)")
    if not expand > 0:
        raise ValueError(f"square_face_crop: expand={expand!r} must be > 0 (1.0 as released)")
    if border not in ("clip", "pad"):
        raise ValueError(f"square_face_crop: border={border!r} must be 'clip' (released) or 'pad'")
    w, h = x2 - x1, y2 - y1
    if w > h:
        y1, y2 = y1 - (w - h) // 2, y2 + (w - h) - (w - h) // 2
    elif h > w:
        x1, x2 = x1 - (h - w) // 2, x2 + (h - w) - (h - w) // 2
    if expand != 1.0:
        side = x2 - x1
        grow = max(round(side * expand), 1) - side
        x1, x2, y1, y2 = x1 - grow // 2, x2 + grow - grow // 2, y1 - grow // 2, y2 + grow - grow // 2
    H, W = image.shape[:2]
    cx1, cy1, cx2, cy2 = max(0, x1), max(0, y1), min(W, x2), min(H, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"square_face_crop: box={box!r} lies outside the {W}x{H} image")
    if border == "clip":
        region = image[cy1:cy2, cx1:cx2]
    else:
        region = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
        region[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1] = image[cy1:cy2, cx1:cx2]
    return np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((out_size, out_size), Image.LANCZOS))


def _siglip_processor_class():
    import transformers

    # The PIL-based processor: what the released AutoProcessor gave (transformers 4.x default) and
    # the same result whether or not torchvision is installed.
    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor


def check_siglip_folder(path) -> Path:
    """The local SigLIP folder, checked: config.json, weights and preprocessor_config.json present.

    transformers would otherwise look the name up on the hub or fall back silently; this raises
    FileNotFoundError naming the missing file and where the folder comes from.
    """
    folder = Path(path).expanduser()
    fetch = (f"it comes from the Hugging Face model {SIGLIP_ID} (e.g. `huggingface-cli download {SIGLIP_ID} "
             f"--local-dir {folder}`)")
    if not folder.is_dir():
        raise FileNotFoundError(f"SigLIP: folder {folder} does not exist; {fetch}")
    for need in ("config.json", "preprocessor_config.json"):
        if not (folder / need).is_file():
            raise FileNotFoundError(f"SigLIP: {folder / need} is missing; {fetch}")
    if not any((folder / f).is_file() for f in _SIGLIP_WEIGHTS):
        raise FileNotFoundError(f"SigLIP: {folder} holds no weights (one of {', '.join(_SIGLIP_WEIGHTS)}); {fetch}")
    return folder


class SiglipFaceEncoder(nn.Module):
    """SigLIP vision tower on square face crops -> ``last_hidden_state`` (n, T, D).

    For ``google/siglip-base-patch16-256-i18n``: T = 256 tokens (16 x 16 patches), D = 768. The
    processor resizes to the model's size (bicubic), rescales to [0, 1] and normalises with mean =
    std = 0.5, as the released code's ``AutoProcessor``; the vision tower is SigLIP's full
    ``vision_model`` (the released ``SiglipModel(...).vision_model``). Frozen; runs without grad.

    Build with :meth:`from_pretrained` (local folder, offline) or :meth:`tiny` (random, for tests
    and the tiny preset); move with ``.to(device, dtype)`` (bf16 on CUDA as released).

    Example:
        >>> enc = SiglipFaceEncoder.tiny(hidden_size=24, num_tokens=16)
        >>> enc([np.zeros((512, 512, 3), np.uint8)] * 2).shape
        torch.Size([2, 16, 24])
    """

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        size = processor.size
        side = size.get("height") if isinstance(size, dict) else getattr(size, "height", size)
        if side != model.config.image_size:
            raise ValueError(f"SigLIP: the processor resizes to {size} but the model takes "
                             f"{model.config.image_size}x{model.config.image_size} images")

    @property
    def num_tokens(self) -> int:
        return (self.model.config.image_size // self.model.config.patch_size) ** 2

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.float32) -> "SiglipFaceEncoder":
        """Load the vision tower and its processor from a local folder (a full SiglipModel or a
        SiglipVisionModel checkpoint), offline. Raises FileNotFoundError for a missing folder or
        file, ValueError when vision weights are missing from the checkpoint."""
        folder = check_siglip_folder(path)
        from transformers import SiglipVisionModel

        from transformers.utils import logging as hf_logging

        # A full SiglipModel checkpoint also holds the text tower: transformers would log every one of
        # those keys as unexpected. The checks below replace that report.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = SiglipVisionModel.from_pretrained(str(folder), local_files_only=True,
                                                            output_loading_info=True)
            processor = _siglip_processor_class().from_pretrained(str(folder), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        bad = list(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
        if bad:
            raise ValueError(f"SigLIP: {folder} lacks or mis-shapes {len(bad)} vision weights (e.g. {bad[:3]}); it is "
                             f"not a SigLIP checkpoint like {SIGLIP_ID}")
        return cls(model.to(dtype), processor)

    @classmethod
    def tiny(cls, hidden_size: int = 24, num_tokens: int = 16, *, patch_size: int = 16) -> "SiglipFaceEncoder":
        """A random one-layer SigLIP tower (weights from torch's global RNG) with ``num_tokens``
        (a square number) tokens of ``hidden_size``; for tests and the tiny preset."""
        from transformers import SiglipVisionConfig, SiglipVisionModel

        grid = int(round(num_tokens ** 0.5))
        if grid * grid != num_tokens or hidden_size % 2:
            raise ValueError(f"SiglipFaceEncoder.tiny: num_tokens={num_tokens} must be a square number and "
                             f"hidden_size={hidden_size} even")
        config = SiglipVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=grid * patch_size, patch_size=patch_size)
        side = grid * patch_size
        return cls(SiglipVisionModel(config), _siglip_processor_class()(size={"height": side, "width": side}))

    @torch.no_grad()
    def forward(self, crops: Sequence) -> torch.Tensor:
        """crops: n (H, W, 3) uint8 RGB arrays or PIL images (square face crops, 512 as released) ->
        (n, num_tokens, hidden_size) in the model's dtype and device."""
        images = [as_rgb_uint8(c, f"crops[{i}]") for i, c in enumerate(crops)]
        if not images:
            raise ValueError("SiglipFaceEncoder: crops is empty; pass one square face crop per reference")
        param = next(self.model.parameters())
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state

    def encode_faces(self, image, boxes: Sequence) -> torch.Tensor:
        """Tokens (len(boxes), T, D) of the faces at ``boxes`` in ``image`` (:func:`square_face_crop` each)."""
        return self([square_face_crop(image, b) for b in boxes])


def encode_references(images: Sequence, detector: BaseFaceDetector,
                      siglip: SiglipFaceEncoder | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference photos (one person each) -> the adapter's identity inputs.

    Each photo's face is ``detector.reference_face`` (most confident detection). Returns
    ``arc_emb`` (R, D) float32 raw embeddings (CPU) and ``siglip_tokens`` (R, T, D_sig) from
    ``siglip`` on the square crops of those faces (None without ``siglip``), in the order of
    ``images``, which is the order of the boxes given to the generation.

    Example:
        >>> det, enc = tiny_face_models()
        >>> arc, sig = encode_references([np.zeros((64, 64, 3), np.uint8)] * 2, det, enc)
        >>> tuple(arc.shape), tuple(sig.shape)
        ((2, 32), (2, 16, 24))
    """
    if not images:
        raise ValueError("encode_references: images is empty; pass one reference photo per person")
    arcs, crops = [], []
    for i, image in enumerate(images):
        image = as_rgb_uint8(image, f"images[{i}]")
        try:
            face = detector.reference_face(image)
        except ValueError as exc:
            raise ValueError(f"reference image {i}: {exc}") from None
        arcs.append(torch.from_numpy(face.embedding))
        if siglip is not None:
            crops.append(square_face_crop(image, face.box))
    return torch.stack(arcs).float(), (siglip(crops) if siglip is not None else None)


def tiny_face_models(arc_dim: int = 32, siglip_dim: int = 24, siglip_tokens: int = 16,
                     seed: int = 0) -> tuple[CenterFaceDetector, SiglipFaceEncoder]:
    """Random stand-ins sized for ``tiny_adapter()``: a :class:`CenterFaceDetector` over a tiny
    IResNet (``arc_dim``-d embeddings) and a tiny SigLIP tower; built from ``seed`` without
    touching the global RNG. For tests and demos only."""
    from idflux.engine.iresnet import IResNet, iresnet_tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        recognizer = IResNet(iresnet_tiny(embedding_dim=arc_dim)).eval().requires_grad_(False)
        siglip = SiglipFaceEncoder.tiny(hidden_size=siglip_dim, num_tokens=siglip_tokens)
    return CenterFaceDetector(recognizer), siglip


def tiny_world_face_models(root=None) -> tuple[CenterFaceDetector, SiglipFaceEncoder]:
    """The trained tiny world's face models: a :class:`CenterFaceDetector` over its pixel recogniser
    (a reference photo is a square face crop, as the world's references are) and its SigLIP-branch
    stand-in, loaded from ``root`` (default: the shipped ``idflux/assets/tiny``)."""
    from idflux.engine.loading import load_tiny_world

    world = load_tiny_world(root)
    return CenterFaceDetector(world.recognizer), world.siglip
