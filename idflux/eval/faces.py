"""Face models for evaluation: an interface (image -> detected faces with embeddings) and insightface.

Any recogniser works if it subclasses :class:`FaceModel` (``detect`` an RGB uint8 image into
:class:`DetectedFace` records). :class:`InsightFaceModel` runs an insightface model pack (``buffalo_l``,
the released evaluation's ArcFace, or ``antelopev2``, WithAnyone's conditioning model) from local files
on the CPU provider. :func:`load_face_model` turns a command-line spec into a model.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Where insightface packs come from (unzip to <root>/models/<pack>/).
INSIGHTFACE_RELEASES = "https://github.com/deepinsight/insightface/releases/tag/v0.7 (buffalo_l.zip, antelopev2.zip)"
#: Pack preference when a root holds several: the released evaluation's model first.
PACK_PREFERENCE = ("buffalo_l", "antelopev2")


@dataclass(frozen=True)
class DetectedFace:
    """One face: ``box`` (x1, y1, x2, y2) in pixels, detector ``score``, raw ``embedding`` (D,) float32."""

    box: tuple[float, float, float, float]
    score: float
    embedding: np.ndarray


class FaceModel(abc.ABC):
    """Detects the faces of an image and embeds each one (a recogniser for the identity metrics)."""

    #: Name used in reports; unique per model in one evaluation.
    name: str = "face-model"

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces of ``image``, an (H, W, 3) uint8 RGB array, in any order; [] when none is found."""


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {desc}; load files with "
                         f"idflux.eval.bench.load_rgb")
    return image


def face_embeddings(model: FaceModel, image: np.ndarray) -> np.ndarray:
    """(n_faces, D) float32 embeddings of every face ``model`` finds in ``image``; shape (0, 0) when none."""
    faces = model.detect(_check_image(image))
    if not faces:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.asarray(f.embedding, dtype=np.float32).reshape(-1) for f in faces])


def pad_square(image: np.ndarray, ratio: float = 1.5) -> np.ndarray:
    """Centre ``image`` on a black square ``ratio`` times its longer side (how the released code feeds
    tight reference crops to the detector)."""
    h, w = image.shape[:2]
    side = int(max(h, w) * ratio)
    out = np.zeros((side, side, 3), dtype=image.dtype)
    y, x = (side - h) // 2, (side - w) // 2
    out[y:y + h, x:x + w] = image
    return out


def reference_embedding(model: FaceModel, image: np.ndarray, pad: bool = True) -> np.ndarray | None:
    """(D,) embedding of a reference image's face: the most confident detection (ties: the largest box),
    as the released code takes the detector's first face; None when no face is found."""
    image = _check_image(image)
    faces = model.detect(pad_square(image) if pad else image)
    if not faces:
        return None
    best = max(faces, key=lambda f: (f.score, (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
    return np.asarray(best.embedding, dtype=np.float32).reshape(-1)


def _has_onnx(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.onnx"))


def _pack_in(base: Path, pack: str) -> Path | None:
    for cand in (base / pack, base / pack / pack):  # antelopev2.zip unpacks one level too deep
        if _has_onnx(cand):
            return cand
    return None


def resolve_insightface_pack(path, pack: str | None = None) -> Path:
    """The folder holding a pack's .onnx files, from a pack folder or an insightface root.

    ``path`` may be the pack folder itself (``.../models/buffalo_l``), or a root holding ``models/<pack>/``
    (or ``<pack>/``). Without ``pack`` a root must hold one pack, or one of :data:`PACK_PREFERENCE`
    (taken in that order). Raises FileNotFoundError naming the path and where the files come from.
    """
    root = Path(path).expanduser()
    where = (f"insightface packs come from {INSIGHTFACE_RELEASES}; unzip one to <root>/models/<pack>/ and pass "
             f"that folder")
    if not root.exists():
        raise FileNotFoundError(f"face_models: {root} does not exist; {where}")
    if _has_onnx(root):
        return root
    bases = [root / "models", root]
    if pack:
        for base in bases:
            found = _pack_in(base, pack)
            if found is not None:
                return found
        raise FileNotFoundError(f"face_models: no .onnx files for pack {pack!r} under {root} (looked in "
                                f"{root / 'models' / pack} and {root / pack}); {where}")
    packs = {}
    for base in bases:
        if base.is_dir():
            for sub in sorted(p for p in base.iterdir() if p.is_dir()):
                found = _pack_in(base, sub.name)
                if found is not None:
                    packs.setdefault(sub.name, found)
    if len(packs) == 1:
        return next(iter(packs.values()))
    for name in PACK_PREFERENCE:
        if name in packs:
            return packs[name]
    if packs:
        raise ValueError(f"face_models: {root} holds several packs {sorted(packs)}; choose one with --face-pack")
    raise FileNotFoundError(f"face_models: no .onnx files in {root} nor in a models/<pack>/ folder under it; {where}")


class InsightFaceModel(FaceModel):
    """insightface ``FaceAnalysis`` (detection + recognition only) from a local pack, CPU provider.

    Args:
        path: pack folder or insightface root (see :func:`resolve_insightface_pack`).
        pack: pack name under a root, e.g. "buffalo_l" or "antelopev2".
        det_size: detector input side (default 640, as released).
        det_thresh: detection threshold (default 0.45, the released evaluation's).
        providers: onnxruntime providers (default CPU only).

    Embeddings are the raw (not normalised) ``face.embedding``.
    """

    def __init__(self, path, pack: str | None = None, *, det_size: int = 640, det_thresh: float = 0.45,
                 providers=("CPUExecutionProvider",)):
        self.pack_dir = resolve_insightface_pack(path, pack)
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise ImportError("face_models: insightface is not installed; pip install --no-deps insightface "
                              "onnxruntime (the Makefile does), or pass another FaceModel") from exc
        try:
            # An absolute name makes every insightface version use the folder as is (os.path.join keeps
            # the last absolute part), so nothing is downloaded.
            self.app = FaceAnalysis(name=str(self.pack_dir.resolve()), root=str(self.pack_dir.parent),
                                    allowed_modules=["detection", "recognition"], providers=list(providers))
        except AssertionError as exc:
            raise FileNotFoundError(f"face_models: {self.pack_dir} has no detection model (.onnx); "
                                    f"{INSIGHTFACE_RELEASES}") from exc
        except Exception as exc:  # onnxruntime's errors for truncated / corrupt files derive from Exception only
            raise ValueError(f"face_models: insightface cannot load the .onnx files in {self.pack_dir} ({exc}); "
                             f"download the pack again from {INSIGHTFACE_RELEASES}") from exc
        if "recognition" not in self.app.models:
            raise FileNotFoundError(f"face_models: {self.pack_dir} has no recognition model (.onnx); "
                                    f"{INSIGHTFACE_RELEASES}")
        cpu_only = all(str(p) == "CPUExecutionProvider" for p in providers)
        self.app.prepare(ctx_id=-1 if cpu_only else 0, det_thresh=det_thresh, det_size=(det_size, det_size))
        self.name = f"insightface:{self.pack_dir.name}"

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(_check_image(image)[:, :, ::-1])
        return [DetectedFace(box=tuple(float(c) for c in f.bbox[:4]), score=float(f.det_score),
                             embedding=np.asarray(f.embedding, dtype=np.float32))
                for f in self.app.get(bgr) if getattr(f, "embedding", None) is not None]


def _load_plugin(spec: str) -> FaceModel:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        file = Path(target).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"face_models: {file} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"idflux_face_plugin_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"face_models: {target} defines no {attr!r}")
    model = obj
    if not isinstance(obj, FaceModel) and callable(obj):
        try:
            model = obj()
        except TypeError as exc:
            raise ValueError(f"face_models: {spec} must name a FaceModel or a factory taking no argument "
                             f"({exc})") from exc
    if not isinstance(model, FaceModel):
        raise ValueError(f"face_models: {spec} gave a {type(model).__name__}, not an idflux.eval.FaceModel")
    return model


def load_face_model(spec: str, pack: str | None = None) -> FaceModel:
    """A face model from a spec: an insightface pack folder or root (``pack`` picks under a root), or
    ``FILE.py:NAME`` / ``package.module:NAME`` naming a FaceModel instance or a no-argument factory."""
    spec = str(spec)
    target, sep, attr = spec.rpartition(":")
    if sep and attr and not Path(spec).exists() and (target.endswith(".py") or re.fullmatch(r"[\w.]+", target)):
        return _load_plugin(spec)
    return InsightFaceModel(spec, pack)

