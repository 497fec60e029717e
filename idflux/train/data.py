"""MultiID-2M reader: webdataset tar shards + identity gallery -> training samples with 1-4 faces.

Layout (spec section 3; :func:`idflux.train.synthetic.write_multiid` writes it)::

    root/shards/*.tar        per sample <key>.jpg, <key>.json (crop, caption_en, names), <key>.npy
                             (pickled dict: bboxes (N, 4) and embeddings (N, D) before the crop,
                             optional landmarks (N, 5, 2) in the same frame)
    root/ref/<name>/<id>.jpg|json|npy   gallery: one face per image (json ``bboxes``, npy ``embeddings``)
    root/ref/<name>.npy                 cluster centre (D,)

A webdataset tar is a plain tar whose members are grouped by key (the file name up to its first dot).
Shards are read with :mod:`tarfile` (no webdataset dependency): the constructor indexes every
member's offset once, then a sample is three seeks, so the dataset is map-style and any position can
be read in any process.

What a sample is (``dataset[position]``):

- The stored jpg is the json ``crop`` region of the original image, so boxes and landmarks are
  shifted by the crop origin (as the released loader does), clipped to the jpg.
- A square holding every face box: side min(W, H) placed at a random feasible offset (the released
  rule); if the faces span more than that, the square grows to their span and the part outside the
  image is black. Resized to ``size`` (Lanczos, as released); boxes scale with the square, landmarks
  keep pixel centres at integer coordinates (x' = (x - x0 + 0.5) * s - 0.5).
- Faces are the npy boxes. Each face's embedding is the npy row of the same box; landmarks come from
  the npy row of that box when stored, else from ``landmark_fn(jpg)`` matched to the boxes
  (Hungarian on landmark-centroid to box-centre distance, nose inside the box), cached per sample.
  The released training pairs detector landmarks with embeddings by list order; here nothing is
  assumed to be in order.
- Names (json ``name`` / ``names`` / ``keyword``, released precedence) are assigned to faces by the
  Hungarian algorithm on the cosine between each face's embedding and each name's cluster centre
  (captions list people in no box order); the released order is the fallback when a centre is missing.
  ``ids`` are the names' positions in the gallery's sorted name list, the ids of
  :meth:`idflux.losses.NegativeBank.from_gallery` on ``root/ref`` (-1: unknown or not in the gallery).
- References: with probability ``paired_prob`` per sample every face gets another gallery image of
  its identity: of up to ``paired_candidates`` (20) random gallery images, the one whose embedding
  has the highest cosine to the face's GT embedding, if >= ``paired_min_cos`` (0.6) (released rule;
  the released code compares with any face of the image and stops at the first > 0.8, and drops the
  whole sample when one face has no match). Fallback: the next best valid candidate, then the face's
  own crop (counted in ``paired_fallbacks``). Otherwise the reference is the face's crop from the GT
  jpg and its GT embedding. Crops are :func:`idflux.engine.faces.square_face_crop` (the released
  ``extract_moref``: square, clipped, Lanczos to ``ref_size``).
- Prompt: the json ``caption_en``, or ``fixed_prompt`` (``"{people}"`` in it becomes "one person",
  "two people", ...); then "" with probability ``caption_dropout``.
- Faces are ordered by box (x1, then y1) in the output frame, the engine's reference order.

A malformed sample (missing member, truncated member, undecodable jpg / json / npy, json without a
valid crop, box/embedding/landmark counts that disagree, no face, more than ``max_faces``, a face under
``min_face`` pixels, no landmarks) is skipped: ``dataset[p]`` returns ``{"skipped": kind, ...}``, the
kind is counted in ``dataset.skipped`` (a Counter, in the process that read it) and warned about once
per kind. Iterating the dataset or batching with :func:`collate_faces` drops those records (the batch
carries their counts in ``"skipped"``), so a bad sample never stops a run. A truncated or unreadable
shard keeps the members read before the damage.

Order and resumption: positions 0, 1, 2, ... run through epochs (position p is epoch p // len,
index perm_epoch[p % len], the permutation drawn from (seed, epoch)), and all randomness of a sample
is drawn from (seed, p). ``iter(dataset)`` streams valid samples from ``dataset.position``;
:meth:`MultiIDDataset.sampler` gives the same positions to a DataLoader (any number of workers,
ranks taking every world_size-th position). Every position is consumed once whether skipped or not,
so after ``n`` steps of global batch ``b`` the next position is ``start + n * b``:
``state_dict()`` / ``load_state_dict()`` carry it (and in-process iteration keeps it up to date).

The npy dicts are pickles: they are read by :func:`idflux.safe_npy.load_npy`, whose unpickler admits
numpy arrays and plain containers only, so a crafted npy is skipped (``unsafe_npy``) and nothing in
it runs.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from idflux.safe_npy import UnsafePickleError, load_npy

__all__ = ["MultiIDDataset", "PositionSampler", "collate_faces", "square_crop", "landmarks_from_detector", "SKIP_KINDS"]

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SLOTS = ("image", "json", "npy")
_PEOPLE = ("no people", "one person", "two people", "three people", "four people", "five people")
#: Skip kinds (the keys of ``MultiIDDataset.skipped``) and what they mean.
SKIP_KINDS = {
    "missing_image": "no jpg/jpeg/png/webp member",
    "missing_json": "no json member",
    "missing_npy": "no npy member",
    "truncated_member": "member data ends before its declared size",
    "io_error": "the shard could not be read (OSError)",
    "bad_image": "image does not decode",
    "bad_json": "json does not parse or is not an object",
    "no_crop": "json has no valid crop [x1, y1, x2, y2]",
    "no_caption": "json has no caption_en (and no fixed_prompt is set)",
    "bad_npy": "npy does not load, or lacks bboxes / embeddings of the right shapes",
    "unsafe_npy": "npy pickles something other than arrays and plain containers (refused, never run)",
    "unsafe_gallery_npy": "a gallery npy pickles something other than arrays and containers (not a candidate)",
    "count_mismatch": "bboxes, embeddings and landmarks disagree in number",
    "no_faces": "no face box",
    "too_many_faces": "more faces than max_faces",
    "bad_box": "a face box lies outside the image or is empty",
    "small_face": "a face box is smaller than min_face pixels",
    "no_landmarks": "no stored landmarks and landmark_fn gave none matching every box",
}


class _Skip(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(kind)
        self.kind, self.detail = kind, detail


def _check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"MultiIDDataset: {name}={value!r} must be a probability in [0, 1]")
    return float(value)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"MultiIDDataset: {name}={value!r} must be an int >= {low}")
    return int(value)


# ------------------------------------------------------------------------------------------- geometry

def square_crop(boxes: np.ndarray, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(x0, y0, side) of a square holding every box (n, 4) xyxy of a width x height image.

    side = min(width, height) when the boxes' union fits in it, placed uniformly among the integer
    offsets that keep both the union and the square inside the image (the released rule); otherwise
    side = the union's larger span (rounded up), centred on the union as far as the image allows, and
    the square extends past the image on the short axis (the caller pads).

    Example:
        >>> square_crop(np.array([[150.0, 20, 190, 70]]), 200, 100, np.random.default_rng(0))[2]
        100
    """
    u0 = np.floor(boxes[:, :2].min(0)).astype(np.int64)
    u1 = np.ceil(boxes[:, 2:].max(0)).astype(np.int64)
    side = max(min(width, height), int((u1 - u0).max()))
    start = []
    for lo_edge, hi_edge, length in ((u0[0], u1[0], width), (u0[1], u1[1], height)):
        lo = max(int(hi_edge) - side, min(0, length - side))
        hi = min(int(lo_edge), max(0, length - side))
        if lo <= hi:
            start.append(int(rng.integers(lo, hi + 1)))
        else:
            centre = (int(lo_edge) + int(hi_edge) - side) // 2
            start.append(min(max(centre, min(0, length - side)), max(0, length - side)))
    return start[0], start[1], side


def _match_landmarks(boxes: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
    """Detected landmarks (m, 5, 2) assigned to boxes (n, 4): (n, 5, 2), or None if a box gets none."""
    from scipy.optimize import linear_sum_assignment

    n, m = len(boxes), len(landmarks)
    if m < n:
        return None
    centre = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
    scale = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0).max(1)[:, None]
    cost = np.linalg.norm(landmarks.mean(1)[None] - centre, axis=-1) / scale
    nose = landmarks[None, :, 2]
    inside = ((nose >= boxes[:, None, :2]) & (nose <= boxes[:, None, 2:])).all(-1)
    cost = np.where(inside, cost, 1e6)
    rows, cols = linear_sum_assignment(cost)
    if len(rows) < n or (cost[rows, cols] >= 1e6).any():
        return None
    out = np.empty((n, 5, 2), np.float32)
    out[rows] = landmarks[cols]
    return out


def landmarks_from_detector(detector) -> Callable[[np.ndarray], np.ndarray]:
    """A ``landmark_fn`` from an :class:`idflux.engine.faces.BaseFaceDetector` (e.g. insightface antelopev2).

    Example:
        >>> from idflux.engine.faces import FaceDetector  # doctest: +SKIP
        >>> ds = MultiIDDataset(root, landmark_fn=landmarks_from_detector(FaceDetector(path)))  # doctest: +SKIP
    """
    def landmark_fn(image: np.ndarray) -> np.ndarray:
        faces = detector.detect(image)
        if not faces:
            return np.zeros((0, 5, 2), np.float32)
        return np.stack([np.asarray(f.landmarks, np.float32) for f in faces])

    return landmark_fn


# ---------------------------------------------------------------------------------------------- files

def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset naming: key = path up to the first dot of the base name, extension = the rest."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _index_shard(path: Path) -> tuple[list[str], list[list[tuple[int, int]]], str | None]:
    """Keys and (offset, size) of their image/json/npy members (-1 = absent); error text if damaged."""
    keys, slots, where, error = [], [], {}, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_key(info.name)
                slot = "image" if ext in _IMAGE_EXTS else ext if ext in ("json", "npy") else None
                if slot is None:
                    continue
                if key not in where:
                    where[key] = len(keys)
                    keys.append(key)
                    slots.append([(-1, 0)] * len(_SLOTS))
                slots[where[key]][_SLOTS.index(slot)] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return keys, slots, error


def _read_member(path: Path, offset: int, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as exc:
        raise _Skip("io_error", str(exc)) from None
    if len(data) != size:
        raise _Skip("truncated_member", f"{len(data)} of {size} bytes")
    return data


def _decode_npy(data: bytes, name: str = "<npy>"):
    """A plain array, or the dict of a pickled object array, through the restricted unpickler."""
    return load_npy(data, name=name)


def _embedding_row(obj) -> np.ndarray:
    """Row 0 of a gallery npy: a dict with ``embeddings`` / ``embedding``, or a plain (D,) / (n, D) array."""
    if isinstance(obj, dict):
        obj = obj.get("embeddings", obj.get("embedding"))
    arr = np.asarray(obj, np.float32)
    return arr.reshape(-1) if arr.ndim == 1 else arr.reshape(arr.shape[0], -1)[0]


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


# -------------------------------------------------------------------------------------------- dataset

class MultiIDDataset(torch.utils.data.Dataset):
    """MultiID-2M samples (see the module docstring) as a map-style dataset over stream positions.

    Args:
        root: folder with ``shards/*.tar`` (or ``*.tar`` directly) and optionally ``ref/``.
        size: output side, a multiple of 16 (default 512).
        paired_prob: probability a sample's references come from the gallery (phase 3: 0.5).
        caption_dropout: probability of the empty prompt (default 0.1).
        fixed_prompt: use this prompt instead of captions (phase 1: "two people"); ``{people}``
            becomes the face count in words. None (default): captions.
        max_faces: samples with more faces are skipped (default 4).
        seed: order and every random choice.
        shuffle: shuffle each epoch (default True) or read in index order.
        ref_size: side of reference face crops (default 512, as released; SigLIP's processor resizes).
        min_face: skip samples with a face box under this many pixels (default 0; released: 100).
        landmark_fn: (H, W, 3) uint8 RGB -> (m, 5, 2) landmarks, used when the npy has none.
        paired_candidates / paired_min_cos: the gallery rule (20 / 0.6, released).

    A sample (dict): ``image`` (3, size, size) float32 in [-1, 1]; ``prompt`` str; ``boxes`` (n, 4)
    float32 xyxy and ``landmarks`` (n, 5, 2) float32 in output pixels; ``gt_embeddings`` (n, D)
    float32; ``names`` (n strs, "" unknown); ``ids`` (n,) int64; ``ref_images`` (n, ref_size,
    ref_size, 3) uint8; ``ref_embeddings`` (n, D) float32; ``paired`` (n,) bool; ``ref_sources`` (n
    strs: "self" or "<name>/<id>"); ``key``; ``position``. Or ``{"skipped": kind, "key", "position"}``.

    Attributes: ``position`` (next stream position of in-process iteration), ``skipped`` (Counter of
    skip kinds, see ``SKIP_KINDS``), ``paired_fallbacks`` (faces that wanted a gallery reference and
    got their own crop), ``identity_names`` (gallery names, sorted; ``ids`` index it). ``paired_prob``,
    ``caption_dropout`` and ``fixed_prompt`` are plain attributes a phase change may set.

    Example:
        >>> from idflux.train.synthetic import write_multiid
        >>> import tempfile
        >>> root = tempfile.mkdtemp(); _ = write_multiid(root, 4, 3, size=96, refs_per_identity=1)
        >>> ds = MultiIDDataset(root, size=64, ref_size=32)
        >>> s = next(iter(ds))
        >>> s["image"].shape, s["ref_images"].shape[1:], ds.state_dict()["position"]
        (torch.Size([3, 64, 64]), torch.Size([32, 32, 3]), 1)
    """

    def __init__(self, root, size: int = 512, paired_prob: float = 0.0, caption_dropout: float = 0.1,
                 fixed_prompt: str | None = None, max_faces: int = 4, seed: int = 0, *, shuffle: bool = True,
                 ref_size: int = 512, min_face: int = 0, landmark_fn: Callable | None = None,
                 paired_candidates: int = 20, paired_min_cos: float = 0.6):
        self.size = _check_int("size", size, 16)
        if self.size % 16:
            raise ValueError(f"MultiIDDataset: size={size!r} must be a multiple of 16 (one FLUX token is 16 pixels), "
                             f"e.g. {max(16, round(size / 16) * 16)}")
        self.paired_prob = _check_prob("paired_prob", paired_prob)
        self.caption_dropout = _check_prob("caption_dropout", caption_dropout)
        if fixed_prompt is not None and not isinstance(fixed_prompt, str):
            raise ValueError(f"MultiIDDataset: fixed_prompt={fixed_prompt!r} must be a string or None")
        self.fixed_prompt = fixed_prompt
        self.max_faces = _check_int("max_faces", max_faces, 1)
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.ref_size = _check_int("ref_size", ref_size, 1)
        self.min_face = _check_int("min_face", min_face, 0)
        if landmark_fn is not None and not callable(landmark_fn):
            raise ValueError(f"MultiIDDataset: landmark_fn={landmark_fn!r} must be callable (image -> (n, 5, 2)) or None")
        self.landmark_fn = landmark_fn
        self.paired_candidates = _check_int("paired_candidates", paired_candidates, 1)
        if isinstance(paired_min_cos, bool) or not isinstance(paired_min_cos, (int, float)) or not -1 <= paired_min_cos <= 1:
            raise ValueError(f"MultiIDDataset: paired_min_cos={paired_min_cos!r} must be a cosine in [-1, 1] (0.6 as released)")
        self.paired_min_cos = float(paired_min_cos)

        self.root = Path(root)
        folder = self.root / "shards" if (self.root / "shards").is_dir() else self.root
        self.shards = sorted(folder.glob("*.tar"))
        if not self.shards:
            raise FileNotFoundError(f"MultiIDDataset: no *.tar shards in {str(folder)!r}; expected root/shards/000000.tar ... "
                                    "(write a synthetic set with idflux.train.synthetic.write_multiid)")
        self.skipped: Counter = Counter()
        self.paired_fallbacks = 0
        self._warned: set[str] = set()
        shard_of, keys, slots = [], [], []
        for s, path in enumerate(self.shards):
            k, sl, error = _index_shard(path)
            if error:
                self._warn("bad_shard", f"{path}: {error}; kept the {len(k)} samples indexed before it")
                self.skipped["bad_shard"] += 1
            shard_of += [s] * len(k)
            keys += k
            slots += sl
        if not keys:
            raise ValueError(f"MultiIDDataset: the shards in {str(folder)!r} hold no samples")
        self._shard_of = np.asarray(shard_of, np.int32)
        self._keys = keys
        self._slots = np.asarray(slots, np.int64).reshape(len(keys), len(_SLOTS), 2)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._landmark_cache: dict[tuple[int, str], np.ndarray] = {}
        self.position = 0

        self.gallery_root = self.root / "ref"
        self._gallery: dict[str, list[str]] = {}
        if self.gallery_root.is_dir():
            for person in sorted(p for p in self.gallery_root.iterdir() if p.is_dir()):
                stems = sorted(f.stem for f in person.iterdir() if f.suffix == ".npy" and f.is_file())
                if stems:
                    self._gallery[person.name] = stems
        self.identity_names = list(self._gallery)
        self._identity_id = {n: i for i, n in enumerate(self.identity_names)}
        self._cache: dict[tuple[str, str], np.ndarray | None] = {}

    # ----------------------------------------------------------------------------- order and state

    def __len__(self) -> int:
        """Samples in one epoch (indexed shard entries, malformed ones included)."""
        return len(self._keys)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self)
            perm = np.random.default_rng([self.seed, 0x0DE5, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def state_dict(self) -> dict:
        """{"position", "seed", "num_samples"}: the next stream position and what it refers to."""
        return {"position": self.position, "seed": self.seed, "num_samples": len(self)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["position"]``; ValueError if the seed or dataset size differ (not the same stream)."""
        for name, mine in (("seed", self.seed), ("num_samples", len(self))):
            if name in state and int(state[name]) != mine:
                raise ValueError(f"MultiIDDataset.load_state_dict: state {name}={state[name]} but this dataset has {mine}; "
                                 "resume with the same data and seed")
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
            raise ValueError(f"MultiIDDataset.load_state_dict: position={position!r} must be an int >= 0")
        self.position = int(position)

    def sampler(self, rank: int = 0, world_size: int = 1, num_samples: int | None = None) -> "PositionSampler":
        """Positions from ``self.position`` for a DataLoader: rank r of world_size takes every world_size-th one."""
        return PositionSampler(self.position, rank=rank, world_size=world_size, num_samples=num_samples)

    def __iter__(self) -> Iterator[dict]:
        """Valid samples from ``self.position`` on, forever (epochs follow each other); advances the position."""
        misses = 0
        while True:
            sample = self[self.position]
            self.position += 1
            if "skipped" in sample:
                misses += 1
                if misses >= len(self):
                    raise RuntimeError(f"MultiIDDataset: a whole epoch ({len(self)} samples) was skipped: "
                                       f"{dict(self.skipped)}; see the warnings for the first sample of each kind")
                continue
            misses = 0
            yield sample

    # -------------------------------------------------------------------------------------- samples

    def __getitem__(self, position: int) -> dict:
        position = int(position)
        if position < 0:
            raise IndexError(f"MultiIDDataset: position={position} must be >= 0")
        epoch, i = divmod(position, len(self))
        index = int(self._order(epoch)[i])
        rng = np.random.default_rng([self.seed, position])
        try:
            sample = self._load(index, rng)
        except _Skip as skip:
            self.skipped[skip.kind] += 1
            where = f"sample {self._keys[index]!r} of {self.shards[self._shard_of[index]].name}"
            self._warn(skip.kind, f"{where}: {SKIP_KINDS.get(skip.kind, skip.kind)}" + (f" ({skip.detail})" if skip.detail else ""))
            return {"skipped": skip.kind, "key": self._keys[index], "position": position}
        sample["position"] = position
        return sample

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"MultiIDDataset skipped {message} [{kind}]; later '{kind}' skips are only counted in "
                          "dataset.skipped", RuntimeWarning, stacklevel=3)

    def _member(self, index: int, slot: str) -> bytes:
        offset, size = self._slots[index, _SLOTS.index(slot)]
        if offset < 0:
            raise _Skip(f"missing_{slot}")
        return _read_member(self.shards[self._shard_of[index]], int(offset), int(size))

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        # Fixed draw order, whatever the settings: the same position gives the same choices.
        u_drop, u_paired = rng.random(2)
        key = self._keys[index]
        meta_bytes, npy_bytes, image_bytes = (self._member(index, s) for s in ("json", "npy", "image"))
        try:
            meta = json.loads(meta_bytes)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Skip("bad_json", str(exc)) from None
        if not isinstance(meta, dict):
            raise _Skip("bad_json", f"a {type(meta).__name__}, not an object")
        crop = meta.get("crop")
        try:
            cx0, cy0, cx1, cy1 = (float(v) for v in crop)
            if not (math.isfinite(cx0) and math.isfinite(cy0)) or cx1 <= cx0 or cy1 <= cy0:
                raise ValueError
        except (TypeError, ValueError):
            raise _Skip("no_crop", f"crop={crop!r}") from None
        caption = meta.get("caption_en")
        if self.fixed_prompt is None and not isinstance(caption, str):
            raise _Skip("no_caption")
        try:
            npy = _decode_npy(npy_bytes, f"{key}.npy")
            boxes = np.asarray(npy["bboxes"], np.float64)
            embeddings = np.asarray(npy["embeddings"] if "embeddings" in npy else npy["embedding"], np.float32)
            stored = npy.get("landmarks")
            stored = None if stored is None else np.asarray(stored, np.float64)
        except UnsafePickleError as exc:  # a crafted pickle: refused before anything in it ran
            raise _Skip("unsafe_npy", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 -- any decoding / shape failure is a malformed sample
            raise _Skip("bad_npy", f"{type(exc).__name__}: {exc}") from None
        if boxes.size == 0:
            raise _Skip("no_faces")
        if boxes.ndim != 2 or boxes.shape[1:] != (4,) or embeddings.ndim != 2 or not np.isfinite(boxes).all():
            raise _Skip("bad_npy", f"bboxes {boxes.shape}, embeddings {embeddings.shape}")
        n = len(boxes)
        if len(embeddings) != n or (stored is not None and stored.shape != (n, 5, 2)):
            shapes = f"bboxes {boxes.shape}, embeddings {embeddings.shape}" + ("" if stored is None else f", landmarks {stored.shape}")
            raise _Skip("count_mismatch", shapes)
        if n == 0:
            raise _Skip("no_faces")
        if n > self.max_faces:
            raise _Skip("too_many_faces", f"{n} > max_faces={self.max_faces}")
        try:
            image = _decode_image(image_bytes)
        except Exception as exc:  # noqa: BLE001 -- PIL raises many types for broken files
            raise _Skip("bad_image", f"{type(exc).__name__}: {exc}") from None
        H, W = image.shape[:2]

        # Into jpg pixels (the jpg is the crop), clipped to the jpg.
        origin = np.array([cx0, cy0])
        boxes = boxes - np.tile(origin, 2)
        boxes = np.concatenate([np.maximum(boxes[:, :2], 0), np.minimum(boxes[:, 2:], [W, H])], axis=1)
        if ((boxes[:, 2:] - boxes[:, :2]) <= 1).any():
            raise _Skip("bad_box", f"boxes {np.round(boxes, 1).tolist()} in a {W}x{H} image")
        if ((boxes[:, 2:] - boxes[:, :2]) < self.min_face).any():
            raise _Skip("small_face", f"min_face={self.min_face}")
        if stored is not None:
            landmarks = stored - origin
        else:
            landmarks = self._detected_landmarks(index, image, boxes)

        names = self._assign_names(meta, embeddings)
        ids = np.array([self._identity_id.get(nm, -1) for nm in names], np.int64)

        x0, y0, side = square_crop(boxes, W, H, rng)
        scale = self.size / side
        out_boxes = ((boxes - [x0, y0, x0, y0]) * scale).clip(0, self.size).astype(np.float32)
        out_landmarks = ((landmarks - [x0, y0] + 0.5) * scale - 0.5).astype(np.float32)
        out_image = self._crop_resize(image, x0, y0, side)

        paired = u_paired < self.paired_prob
        ref_images = np.empty((n, self.ref_size, self.ref_size, 3), np.uint8)
        ref_embeddings = np.empty_like(embeddings)
        ref_paired = np.zeros(n, bool)
        sources = []
        for j in range(n):
            ref = self._gallery_reference(names[j], embeddings[j], rng) if paired else None
            if ref is None:
                if paired:
                    self.paired_fallbacks += 1
                ref = (self._face_crop(image, boxes[j]), embeddings[j], "self")
            else:
                ref_paired[j] = True
            ref_images[j], ref_embeddings[j], source = ref
            sources.append(source)

        if self.fixed_prompt is not None:
            prompt = self.fixed_prompt.replace("{people}", _PEOPLE[n] if n < len(_PEOPLE) else f"{n} people")
        else:
            prompt = caption
        if u_drop < self.caption_dropout:
            prompt = ""

        order = np.lexsort((out_boxes[:, 1], out_boxes[:, 0]))
        return {
            "image": torch.from_numpy(out_image).permute(2, 0, 1).float().div_(127.5).sub_(1.0),
            "prompt": prompt,
            "boxes": torch.from_numpy(out_boxes[order]),
            "landmarks": torch.from_numpy(np.ascontiguousarray(out_landmarks[order])),
            "gt_embeddings": torch.from_numpy(np.ascontiguousarray(embeddings[order])),
            "names": [names[j] for j in order],
            "ids": torch.from_numpy(ids[order]),
            "ref_images": torch.from_numpy(np.ascontiguousarray(ref_images[order])),
            "ref_embeddings": torch.from_numpy(np.ascontiguousarray(ref_embeddings[order])),
            "paired": torch.from_numpy(ref_paired[order]),
            "ref_sources": [sources[j] for j in order],
            "key": key,
        }

    def _crop_resize(self, image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
        from PIL import Image

        # PIL fills the part of a crop box outside the image with black.
        region = Image.fromarray(image).crop((x0, y0, x0 + side, y0 + side))
        if side != self.size:
            region = region.resize((self.size, self.size), Image.LANCZOS)
        return np.array(region)

    def _face_crop(self, image: np.ndarray, box) -> np.ndarray:
        from idflux.engine.faces import square_face_crop

        try:
            return square_face_crop(image, box, self.ref_size)
        except ValueError as exc:
            raise _Skip("bad_box", str(exc)) from None

    def _detected_landmarks(self, index: int, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if self.landmark_fn is None:
            raise _Skip("no_landmarks", "the npy has no landmarks; pass landmark_fn (e.g. landmarks_from_detector(FaceDetector(...)))")
        cache_key = (int(self._shard_of[index]), self._keys[index])
        if cache_key not in self._landmark_cache:
            try:
                found = np.asarray(self.landmark_fn(image), np.float32).reshape(-1, 5, 2)
            except Exception as exc:  # noqa: BLE001 -- a detector failure costs one sample, not the run
                raise _Skip("no_landmarks", f"landmark_fn raised {type(exc).__name__}: {exc}") from None
            self._landmark_cache[cache_key] = found
        matched = _match_landmarks(boxes, self._landmark_cache[cache_key])
        if matched is None:
            raise _Skip("no_landmarks", f"{len(self._landmark_cache[cache_key])} detections for {len(boxes)} boxes")
        return matched.astype(np.float64)

    # -------------------------------------------------------------------------------------- gallery

    @staticmethod
    def _json_names(meta: dict) -> list[str]:
        """Names in the released precedence: ``name``, then ``names``, then the words of ``keyword``."""
        for field in ("name", "names"):
            if field in meta:
                value = meta[field]
                return [value] if isinstance(value, str) else [str(v) for v in value]
        keyword = meta.get("keyword")
        return keyword.split(" ") if isinstance(keyword, str) else []

    def _assign_names(self, meta: dict, embeddings: np.ndarray) -> list[str]:
        """One name per face ("" unknown): Hungarian on cos(face embedding, name's cluster centre)."""
        from scipy.optimize import linear_sum_assignment

        try:
            names = self._json_names(meta)
        except TypeError:
            names = []
        n = len(embeddings)
        out = [""] * n
        if not names:
            return out
        centres = [self._centre(nm) for nm in names]
        if any(c is None or c.shape != embeddings.shape[1:] for c in centres):
            return (names + out)[:n]  # released: names in box order
        sim = np.array([[_cos(e, c) for c in centres] for e in embeddings])
        for r, c in zip(*linear_sum_assignment(-sim)):
            out[r] = names[c]
        return out

    def _centre(self, name: str) -> np.ndarray | None:
        """The cluster centre ``ref/<name>.npy`` (None if absent or broken)."""
        if not name or "/" in name or name.startswith("."):
            return None
        return self._cached_embedding(name, "", self.gallery_root / f"{name}.npy")

    def _gallery_embedding(self, name: str, stem: str) -> np.ndarray | None:
        return self._cached_embedding(name, stem, self.gallery_root / name / f"{stem}.npy")

    def _cached_embedding(self, name: str, stem: str, path: Path) -> np.ndarray | None:
        # A plain dict (picklable for spawned workers), emptied when it reaches 65536 embeddings (~128 MB).
        if (name, stem) not in self._cache:
            if len(self._cache) >= 1 << 16:
                self._cache.clear()
            try:
                self._cache[name, stem] = _embedding_row(_decode_npy(path.read_bytes(), str(path)))
            except UnsafePickleError as exc:  # refused, never run: this gallery image is no candidate
                self.skipped["unsafe_gallery_npy"] += 1
                self._warn("unsafe_gallery_npy", str(exc))
                self._cache[name, stem] = None
            except Exception:  # noqa: BLE001 -- missing or broken file: no embedding (one candidate less)
                self._cache[name, stem] = None
        return self._cache[name, stem]

    def _gallery_reference(self, name: str, target: np.ndarray, rng: np.random.Generator):
        """(crop, embedding, "<name>/<id>") of the best gallery image of ``name`` for ``target``, or None."""
        stems = self._gallery.get(name)
        if not stems:
            return None
        picks = rng.choice(len(stems), min(self.paired_candidates, len(stems)), replace=False)
        scored = []
        for p in picks:
            emb = self._gallery_embedding(name, stems[p])
            if emb is not None and emb.shape == target.shape:
                scored.append((_cos(emb, target), stems[p], emb))
        for score, stem, emb in sorted(scored, key=lambda t: -t[0]):
            if score < self.paired_min_cos:
                break
            crop = self._gallery_crop(name, stem)
            if crop is not None:
                return crop, emb, f"{name}/{stem}"
        return None

    def _gallery_crop(self, name: str, stem: str) -> np.ndarray | None:
        folder = self.gallery_root / name
        try:
            meta = json.loads((folder / f"{stem}.json").read_text())
            box = np.asarray(meta["bboxes"][0], np.float64)
            image = next(_decode_image(p.read_bytes()) for e in _IMAGE_EXTS if (p := folder / f"{stem}.{e}").is_file())
        except Exception:  # noqa: BLE001 -- unreadable gallery image: try the next candidate
            return None
        if box.shape != (4,) or ((box[2:] - box[:2]) < max(self.min_face, 1)).any():
            return None
        try:
            return self._face_crop(image, box)
        except _Skip:
            return None


class PositionSampler(torch.utils.data.Sampler):
    """Stream positions ``start + rank``, ``start + rank + world_size``, ... (``num_samples`` of them, or forever).

    Example:
        >>> list(PositionSampler(10, rank=1, world_size=2, num_samples=3))
        [11, 13, 15]
    """

    def __init__(self, start: int = 0, *, rank: int = 0, world_size: int = 1, num_samples: int | None = None):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"PositionSampler: world_size={world_size!r} must be an int >= 1")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"PositionSampler: rank={rank!r} must be an int in [0, world_size={world_size})")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0):
            raise ValueError(f"PositionSampler: num_samples={num_samples!r} must be an int >= 0 or None (forever)")
        self.start, self.rank, self.world_size, self.num_samples = int(start), rank, world_size, num_samples

    def __iter__(self) -> Iterator[int]:
        p, count = self.start + self.rank, 0
        while self.num_samples is None or count < self.num_samples:
            yield p
            p += self.world_size
            count += 1

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("PositionSampler: an endless sampler has no length; pass num_samples")
        return self.num_samples


# -------------------------------------------------------------------------------------------- batches

def collate_faces(batch: Sequence[dict]) -> dict:
    """Batch samples of :class:`MultiIDDataset`, faces flattened with the image each belongs to.

    Skip records (and None) are dropped and counted. Returns a dict:
    ``images`` (B, 3, S, S) float32; ``prompts`` B strs; ``num_faces`` (B,) int64; ``image_index``
    (F,) int64; ``boxes`` (F, 4) and ``image_boxes`` (B lists of [x1, y1, x2, y2], for
    :func:`idflux.engine.regions.boxes_to_membership`); ``landmarks`` (F, 5, 2); ``gt_embeddings``
    (F, D); ``ids`` (F,) int64; ``names`` F strs; ``ref_images`` (F, R, R, 3) uint8;
    ``ref_embeddings`` (F, D); ``paired`` (F,) bool; ``ref_sources`` F strs; ``keys`` B strs;
    ``positions`` (N,) int64 of every input record, skipped ones included; ``skipped`` Counter by kind.
    With no valid sample, the tensors are empty (B = F = 0).

    Example:
        >>> b = collate_faces([{"skipped": "bad_json", "key": "k", "position": 3}])
        >>> b["images"].shape[0], dict(b["skipped"]), b["positions"].tolist()
        (0, {'bad_json': 1}, [3])
    """
    records = [r for r in batch if r is not None]
    items = [r for r in records if "skipped" not in r]
    out = {
        "positions": torch.tensor([r["position"] for r in records], dtype=torch.int64),
        "skipped": Counter(r["skipped"] for r in records if "skipped" in r),
        "prompts": [r["prompt"] for r in items],
        "keys": [r["key"] for r in items],
        "names": [nm for r in items for nm in r["names"]],
        "ref_sources": [s for r in items for s in r["ref_sources"]],
        "image_boxes": [r["boxes"].tolist() for r in items],
    }
    if not items:
        out.update(images=torch.zeros(0, 3, 0, 0), num_faces=torch.zeros(0, dtype=torch.int64),
                   image_index=torch.zeros(0, dtype=torch.int64), boxes=torch.zeros(0, 4), landmarks=torch.zeros(0, 5, 2),
                   gt_embeddings=torch.zeros(0, 0), ids=torch.zeros(0, dtype=torch.int64),
                   ref_images=torch.zeros(0, 0, 0, 3, dtype=torch.uint8), ref_embeddings=torch.zeros(0, 0),
                   paired=torch.zeros(0, dtype=torch.bool))
        return out
    num_faces = torch.tensor([len(r["boxes"]) for r in items], dtype=torch.int64)
    out.update(
        images=torch.stack([r["image"] for r in items]),
        num_faces=num_faces,
        image_index=torch.repeat_interleave(torch.arange(len(items)), num_faces),
        **{k: torch.cat([r[k] for r in items]) for k in ("boxes", "landmarks", "gt_embeddings", "ids", "ref_images",
                                                         "ref_embeddings", "paired")},
    )
    return out
