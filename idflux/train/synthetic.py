"""Procedural faces with known identities: the default data of the tiny preset and of the tests.

Each identity (:class:`Identity`) has a fixed face geometry (face ellipse aspect, eye spacing and
height, iris size, nose length, mouth width and height, hairline, hair volume, brow thickness,
beard), fixed colours (skin, hair, eyes, lips, clothes) and a random unit vector of dimension
``embed_dim`` (512) that stands in for its antelopev2 ArcFace embedding. Each image draws a pose
(rotation up to 12 degrees, scale, position), an expression (mouth openness) and a lighting
(brightness and a linear gradient over the image), plus a background and pixel noise.

Geometry lives in "template units": the 112 x 112 frame of the ArcFace template, face centre at
(56, 64), landmarks near the template's (38.3, 51.7), (73.5, 51.5), (56.0, 71.7), (41.5, 92.4),
(70.7, 92.2). A face is placed by ``image = c + k * R(theta) @ (q - (56, 64))``, and every pixel is
rasterised by mapping its centre back to template units, so the five landmarks (iris centres, nose
tip, mouth corners; ArcFace order: left eye, right eye, nose, left and right mouth corners, the
"left" eye being the one with the smaller x) are exact: the pixel nearest an eye landmark has the
eye colour (times the lighting). Pixel centres sit at integer coordinates (insightface / cv2).
Boxes are the axis-aligned bounds of the rotated face (skin) ellipse, as a detector's box would be.

The stand-in embedding of a face in an image is ``identity.embedding + eta * n`` with ``n`` a random
unit vector and ``eta`` in [0.15, 0.45] (not re-normalised: norm about 1.0-1.1, where antelopev2's
raw embeddings have norms near 20; cosine to the identity vector 0.91-0.99, between two images of
one identity about 0.83-0.98, between identities about N(0, 1/sqrt(512))). It is a label, not a
function of the pixels: an ArcFace model run on these images does not reproduce it.

Rasterisation loops (background, bodies, heads, lighting) are numba ``@njit`` kernels compiled once
and cached on disk; without numba the same functions run as plain Python (slow but identical).
Everything is seeded: identity ``i`` of seed ``s`` is the same whatever the number of identities,
and :func:`write_multiid` writes byte-identical files for the same arguments.

:func:`write_multiid` writes the MultiID-2M layout (spec section 3) that
:class:`idflux.train.data.MultiIDDataset` reads::

    root/shards/000000.tar ...   webdataset tars: <key>.jpg, <key>.json, <key>.npy per sample
    root/ref/<name>/<id>.jpg|json|npy   the identity gallery (one face per image)
    root/ref/<name>.npy                 cluster centre (mean of the gallery embeddings)

Sample ``json``: ``crop`` [x1, y1, x2, y2] (the jpg is that region of the rendered canvas),
``caption_en``, ``names`` (sorted by name, not in box order, as captions list people in MultiID-2M).
Sample ``npy`` (pickled dict): ``bboxes`` (N, 4) xyxy and ``landmarks`` (N, 5, 2) in canvas pixels
(before the crop), ``embeddings`` (N, 512) float32 aligned with ``bboxes``. The real shards have no
``landmarks``; the reader handles both. Gallery ``json``: ``bboxes`` [[x1, y1, x2, y2]], ``name``;
gallery ``npy``: dict with ``embeddings`` (1, 512), ``bboxes`` (1, 4), ``landmarks`` (1, 5, 2) (the
released gallery reader takes row 0 of ``embeddings``).
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

try:
    from numba import njit

    HAS_NUMBA = True
except ImportError:  # the same loops, run by the interpreter
    HAS_NUMBA = False

    def njit(*args, **kwargs):
        if args and callable(args[0]):
            return args[0]
        return lambda fn: fn

__all__ = [
    "HAS_NUMBA", "EMBED_DIM", "FACE_CENTRE", "Identity", "SyntheticIdentities", "write_multiid",
]

#: Dimension of the stand-in ArcFace embedding (antelopev2 glintr100 gives 512).
EMBED_DIM = 512
#: Template-unit point that a face's image position ``c`` refers to.
FACE_CENTRE = (56.0, 64.0)

# Geometry vector layout (template units). _OPEN is per image (expression), the rest per identity.
(_A, _B, _EYE_DX, _EYE_Y, _IRIS_R, _NOSE_Y, _MOUTH_DX, _MOUTH_Y, _LIP, _HAIRLINE, _HAIR_W, _HAIR_H,
 _HAIR_DY, _BROW_T, _BEARD, _NECK_W, _OPEN) = range(17)
_N_GEOM = 17
# Palette rows (labels returned by the rasteriser).
_SKIN, _HAIR, _IRIS, _SCLERA, _LIPS, _MOUTH, _NOSE_BRIDGE, _NOSE_TIP, _CLOTHES = range(9)
_N_LABELS = 9

SKIN_TONES = (("pale", (236, 208, 186)), ("light", (222, 184, 150)), ("tan", (198, 150, 110)),
              ("brown", (150, 105, 70)), ("dark", (100, 68, 48)))
HAIR_COLOURS = (("black", (28, 24, 22)), ("brown", (96, 62, 36)), ("blonde", (214, 180, 108)),
                ("red", (158, 62, 30)), ("grey", (160, 160, 160)))
# Saturated on purpose: every eye colour is > 100 (RGB distance) from every skin tone and hair colour.
EYE_COLOURS = (("blue", (40, 96, 210)), ("green", (34, 160, 72)), ("violet", (130, 60, 190)),
               ("teal", (20, 165, 175)))
SCLERA = (240, 238, 232)
MOUTH_INSIDE = (60, 20, 25)
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True, eq=False)
class Identity:
    """One synthetic person: fixed geometry, colours, features and embedding."""

    index: int
    """Position in its :class:`SyntheticIdentities` (0-based)."""
    name: str
    """Gallery folder name, ``synth_<index:05d>``."""
    geometry: np.ndarray
    """(17,) float64 geometry in template units (last entry, mouth openness, is set per image)."""
    palette: np.ndarray
    """(9, 3) float64 RGB colours: skin, hair, iris, sclera, lips, mouth inside, nose bridge, nose tip, clothes."""
    embedding: np.ndarray
    """(embed_dim,) float32 unit vector: the identity's stand-in ArcFace embedding."""
    description: str
    """Words for captions, e.g. ``"blue eyes and black hair"``."""

    @property
    def eye_colour(self) -> np.ndarray:
        return self.palette[_IRIS]

    @property
    def skin_colour(self) -> np.ndarray:
        return self.palette[_SKIN]

    @property
    def hair_colour(self) -> np.ndarray:
        return self.palette[_HAIR]

    def canonical_landmarks(self) -> np.ndarray:
        """(5, 2) float64 landmarks in template units (ArcFace order)."""
        g = self.geometry
        cx = FACE_CENTRE[0]
        return np.array([[cx - g[_EYE_DX], g[_EYE_Y]], [cx + g[_EYE_DX], g[_EYE_Y]], [cx, g[_NOSE_Y]],
                         [cx - g[_MOUTH_DX], g[_MOUTH_Y]], [cx + g[_MOUTH_DX], g[_MOUTH_Y]]])


# --------------------------------------------------------------------------------------------- kernels

@njit(cache=True)
def _in_ellipse(u, v, cx, cy, rx, ry):
    du = (u - cx) / rx
    dv = (v - cy) / ry
    return du * du + dv * dv <= 1.0


@njit(cache=True)
def _head_label(u, v, g):
    """Palette row of template point (u, v) of a head, -1 outside it. Tests run front to back."""
    cx = 56.0
    cy = 64.0
    r = g[_IRIS_R]
    exl = cx - g[_EYE_DX]
    exr = cx + g[_EYE_DX]
    ey = g[_EYE_Y]
    if _in_ellipse(u, v, exl, ey, r, r) or _in_ellipse(u, v, exr, ey, r, r):
        return _IRIS
    if _in_ellipse(u, v, exl, ey, 1.9 * r, 1.15 * r) or _in_ellipse(u, v, exr, ey, 1.9 * r, 1.15 * r):
        return _SCLERA
    brow_bottom = ey - 1.15 * r - 2.5
    if brow_bottom - g[_BROW_T] <= v <= brow_bottom and (abs(u - exl) <= 1.7 * r or abs(u - exr) <= 1.7 * r):
        return _HAIR
    my = g[_MOUTH_Y]
    mh = g[_LIP] + 5.0 * g[_OPEN]
    if g[_OPEN] > 0.3 and _in_ellipse(u, v, cx, my, 0.75 * g[_MOUTH_DX], mh - g[_LIP]):
        return _MOUTH
    if _in_ellipse(u, v, cx, my, g[_MOUTH_DX], mh):
        return _LIPS
    ny = g[_NOSE_Y]
    if _in_ellipse(u, v, cx, ny, 3.0, 2.6):
        return _NOSE_TIP
    if abs(u - cx) <= 1.5 and ey + 4.0 <= v <= ny:
        return _NOSE_BRIDGE
    if _in_ellipse(u, v, cx, cy, g[_A], g[_B]):
        if v < g[_HAIRLINE]:
            return _HAIR
        if g[_BEARD] > 0.5 and v > ny + 5.0:
            return _HAIR
        return _SKIN
    if _in_ellipse(u, v, cx, cy - g[_HAIR_DY], g[_A] * g[_HAIR_W], g[_B] * g[_HAIR_H]):
        return _HAIR
    return -1


@njit(cache=True)
def _body_label(u, v, g):
    """Palette row of template point (u, v) of the neck and shoulders, -1 outside them."""
    cx = 56.0
    bottom = 64.0 + g[_B]
    if abs(u - cx) <= g[_NECK_W] and 64.0 + 0.5 * g[_B] <= v <= bottom + 16.0:
        return _SKIN
    if v <= bottom + 60.0 and _in_ellipse(u, v, cx, bottom + 42.0, 2.0 * g[_A], 30.0):
        return _CLOTHES
    return -1


@njit(cache=True)
def _paint_person(canvas, g, palette, cx, cy, k, cos_t, sin_t, x0, y0, x1, y1, head):
    """Rasterise a head (head=True) or body into canvas[y0:y1, x0:x1] (float32, H x W x 3)."""
    for y in range(y0, y1):
        for x in range(x0, x1):
            dx = x - cx
            dy = y - cy
            u = (cos_t * dx + sin_t * dy) / k + 56.0
            v = (-sin_t * dx + cos_t * dy) / k + 64.0
            lab = _head_label(u, v, g) if head else _body_label(u, v, g)
            if lab >= 0:
                for c in range(3):
                    canvas[y, x, c] = palette[lab, c]


@njit(cache=True)
def _paint_background(canvas, c0, c1, dirx, diry, blobs):
    """Linear gradient c0 -> c1 along (dirx, diry), then soft-edged ellipses ``blobs`` (m, 7): cx, cy, rx, ry, rgb."""
    H, W = canvas.shape[0], canvas.shape[1]
    half = 0.5 * (H + W)
    for y in range(H):
        for x in range(W):
            t = ((x - 0.5 * W) * dirx + (y - 0.5 * H) * diry) / half + 0.5
            t = min(max(t, 0.0), 1.0)
            for c in range(3):
                canvas[y, x, c] = c0[c] * (1.0 - t) + c1[c] * t
            for i in range(blobs.shape[0]):
                du = (x - blobs[i, 0]) / blobs[i, 2]
                dv = (y - blobs[i, 1]) / blobs[i, 3]
                d = du * du + dv * dv
                if d < 1.0:
                    w = 0.6 * (1.0 - d)
                    for c in range(3):
                        canvas[y, x, c] = canvas[y, x, c] * (1.0 - w) + blobs[i, 4 + c] * w


@njit(cache=True)
def _apply_lighting(canvas, bright, gx, gy):
    """canvas *= bright * (1 + gx * (x / W - 1/2) + gy * (y / H - 1/2)), in place."""
    H, W = canvas.shape[0], canvas.shape[1]
    for y in range(H):
        for x in range(W):
            f = bright * (1.0 + gx * (x / W - 0.5) + gy * (y / H - 0.5))
            for c in range(3):
                canvas[y, x, c] *= f


# ------------------------------------------------------------------------------------------ identities

def _jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float64) + rng.uniform(-amount, amount, 3), 0, 255)


def _make_identity(seed: int, index: int, embed_dim: int) -> Identity:
    rng = np.random.default_rng([seed, 0x1D, index])
    g = np.zeros(_N_GEOM)
    g[_A] = rng.uniform(33.0, 39.0)
    g[_B] = g[_A] * rng.uniform(1.12, 1.38)
    g[_EYE_DX] = rng.uniform(15.5, 19.5)
    g[_EYE_Y] = rng.uniform(49.5, 54.0)
    g[_IRIS_R] = rng.uniform(3.6, 4.6)
    g[_NOSE_Y] = g[_EYE_Y] + rng.uniform(16.5, 23.0)
    g[_MOUTH_DX] = rng.uniform(12.5, 16.5)
    # Keeps the open mouth (5 more units) inside the face ellipse.
    g[_MOUTH_Y] = rng.uniform(g[_EYE_Y] + 36.0, min(g[_EYE_Y] + 42.0, 64.0 + g[_B] - 10.0))
    g[_LIP] = rng.uniform(2.2, 3.5)
    g[_BROW_T] = rng.uniform(1.5, 3.5)
    top = 64.0 - g[_B]
    brow_top = g[_EYE_Y] - 1.15 * g[_IRIS_R] - 2.5 - g[_BROW_T]
    g[_HAIRLINE] = rng.uniform(top + 6.0, min(top + 20.0, brow_top - 3.0))
    g[_HAIR_W] = rng.uniform(1.08, 1.25)
    g[_HAIR_H] = rng.uniform(0.95, 1.1)
    g[_HAIR_DY] = rng.uniform(4.0, 12.0)
    g[_BEARD] = float(rng.random() < 0.25)
    g[_NECK_W] = g[_A] * rng.uniform(0.45, 0.6)
    skin_name, skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    hair_name, hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]
    eye_name, eyes = EYE_COLOURS[rng.integers(len(EYE_COLOURS))]
    palette = np.zeros((_N_LABELS, 3))
    palette[_SKIN] = _jitter(rng, skin, 10)
    palette[_HAIR] = _jitter(rng, hair, 10)
    palette[_IRIS] = _jitter(rng, eyes, 12)
    palette[_SCLERA] = SCLERA
    palette[_LIPS] = np.clip(0.65 * palette[_SKIN] + 0.35 * np.array([170.0, 40.0, 50.0]), 0, 255)
    palette[_MOUTH] = MOUTH_INSIDE
    palette[_NOSE_BRIDGE] = 0.88 * palette[_SKIN]
    palette[_NOSE_TIP] = 0.72 * palette[_SKIN]
    palette[_CLOTHES] = rng.uniform(30, 230, 3)
    embedding = rng.standard_normal(embed_dim)
    embedding = (embedding / np.linalg.norm(embedding)).astype(np.float32)
    beard = ", a beard" if g[_BEARD] else ""
    description = f"{eye_name} eyes, {hair_name} hair and {skin_name} skin{beard}"
    return Identity(index, f"synth_{index:05d}", g, palette, embedding, description)


class SyntheticIdentities:
    """``n_identities`` procedural people drawn from ``seed``, and the renderer of their images.

    Identity ``i`` depends on (seed, i) only. ``embed_dim`` (default 512) is the length of the
    stand-in ArcFace embeddings.

    Example:
        >>> synth = SyntheticIdentities(4, seed=0)
        >>> image, boxes, landmarks, ids = synth.render_scene(np.random.default_rng(0), [0, 3], (96, 128))
        >>> image.shape, image.dtype, boxes.shape, landmarks.shape, ids.tolist()
        ((96, 128, 3), dtype('uint8'), (2, 4), (2, 5, 2), [0, 3])
    """

    def __init__(self, n_identities: int, seed: int = 0, *, embed_dim: int = EMBED_DIM):
        if isinstance(n_identities, bool) or not isinstance(n_identities, int) or n_identities < 1:
            raise ValueError(f"SyntheticIdentities: n_identities={n_identities!r} must be an int >= 1")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 2:
            raise ValueError(f"SyntheticIdentities: embed_dim={embed_dim!r} must be an int >= 2 (512 as antelopev2)")
        self.seed = int(seed)
        self.embed_dim = embed_dim
        self.identities = [_make_identity(self.seed, i, embed_dim) for i in range(n_identities)]

    def __len__(self) -> int:
        return len(self.identities)

    def __getitem__(self, index: int) -> Identity:
        return self.identities[index]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.identities]

    # ------------------------------------------------------------------------------------ per image

    def image_embedding(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """(embed_dim,) float32 stand-in embedding of one image of identity ``index``: vector + noise."""
        noise = rng.standard_normal(self.embed_dim)
        eta = rng.uniform(0.15, 0.45)
        return (self.identities[index].embedding + eta * noise / np.linalg.norm(noise)).astype(np.float32)

    def caption(self, ids: Sequence[int], rng: np.random.Generator) -> str:
        """An English caption naming the people's looks, e.g. ``"a photo of two people: ..."``."""
        n = len(ids)
        people = "one person" if n == 1 else f"{_COUNT_WORDS[n] if n < len(_COUNT_WORDS) else n} people"
        parts = [self.identities[i].description for i in rng.permutation(np.asarray(ids, np.int64))]
        place = ("in a park", "in a studio", "at a street corner", "in a living room", "on a beach")[rng.integers(5)]
        return f"a photo of {people} {place}: " + "; ".join(f"one with {p}" for p in parts)

    def render_scene(self, rng: np.random.Generator, ids: Sequence[int], size, *,
                     face_scale: float = 0.55) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One image holding the faces of identities ``ids`` (1 or more, distinct or not), non-overlapping.

        Args:
            rng: numpy Generator (all randomness of the image). ids: identity indices.
            size: int (square) or (H, W).
            face_scale: the widest head spans ``face_scale * min(H, W) / ceil(sqrt(n))`` pixels
                (heads are drawn 0.6-1.0 times that, shrunk when they do not fit); 0.55 by default,
                the tiny world uses 0.9 so a face box spans several 16-pixel tokens.

        Returns:
            image (H, W, 3) uint8 RGB; boxes (n, 4) float32 xyxy; landmarks (n, 5, 2) float32 (x, y)
            pixels in ArcFace order; ids (n,) int64, all in the order of ``ids``.
        """
        H, W = _hw(size)
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= len(self):
            raise ValueError(f"render_scene: ids={ids.tolist()} must be 1 or more indices in [0, {len(self)})")
        if not 0.05 <= face_scale <= 1.0:
            raise ValueError(f"render_scene: face_scale={face_scale!r} must be in [0.05, 1]")
        per_face = face_scale * min(H, W) / math.ceil(math.sqrt(ids.size))
        return self._compose(rng, ids, H, W, (0.6 * per_face, per_face)) + (ids,)

    def render_reference(self, index: int, rng: np.random.Generator, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One large face of identity ``index`` (a gallery / reference photo).

        Returns image (H, W, 3) uint8, box (4,) float32, landmarks (5, 2) float32.
        """
        H, W = _hw(size)
        if not 0 <= index < len(self):
            raise ValueError(f"render_reference: index={index!r} must be in [0, {len(self)})")
        m = min(H, W)
        image, boxes, landmarks = self._compose(rng, np.array([index]), H, W, (0.4 * m, 0.6 * m))
        return image, boxes[0], landmarks[0]

    def _compose(self, rng, ids, H, W, head_width):
        n = ids.size
        geoms = []
        for i in ids:
            g = self.identities[i].geometry.copy()
            g[_OPEN] = rng.uniform(0.0, 1.0)
            geoms.append(g)
        poses = _place(rng, geoms, H, W, head_width)
        canvas = np.empty((H, W, 3), np.float32)
        c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
        angle = rng.uniform(0, 2 * np.pi)
        n_blobs = rng.integers(2, 6)
        blobs = np.concatenate([rng.uniform(0, 1, (n_blobs, 2)) * [W, H],
                                rng.uniform(0.05, 0.3, (n_blobs, 2)) * [W, H],
                                rng.uniform(30, 225, (n_blobs, 3))], axis=1)
        _paint_background(canvas, c0, c1, math.cos(angle), math.sin(angle), blobs)
        # Bodies first, heads after: heads never overlap, so no face is ever occluded.
        for head in (False, True):
            for i, g, (cx, cy, k, theta) in zip(ids, geoms, poses):
                x0, y0, x1, y1 = _extent(g, cx, cy, k, theta, head)
                x0, y0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
                x1, y1 = min(int(math.ceil(x1)) + 1, W), min(int(math.ceil(y1)) + 1, H)
                if x1 > x0 and y1 > y0:
                    _paint_person(canvas, g, self.identities[i].palette, cx, cy, k, math.cos(theta), math.sin(theta),
                                  x0, y0, x1, y1, head)
        _apply_lighting(canvas, rng.uniform(0.85, 1.15), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))
        canvas += rng.normal(0.0, 2.0, canvas.shape).astype(np.float32)
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        boxes = np.zeros((n, 4), np.float32)
        landmarks = np.zeros((n, 5, 2), np.float32)
        for j, (i, g, (cx, cy, k, theta)) in enumerate(zip(ids, geoms, poses)):
            c, s = math.cos(theta), math.sin(theta)
            hx = k * math.sqrt((g[_A] * c) ** 2 + (g[_B] * s) ** 2)
            hy = k * math.sqrt((g[_A] * s) ** 2 + (g[_B] * c) ** 2)
            boxes[j] = (cx - hx, cy - hy, cx + hx, cy + hy)
            landmarks[j] = _to_image(self.identities[i].canonical_landmarks(), cx, cy, k, theta)
        return image, boxes, landmarks


def _hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        H = W = int(size)
    else:
        try:
            H, W = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(f"size={size!r} must be an int or (H, W)") from None
    if H < 32 or W < 32:
        raise ValueError(f"size={size!r} is too small: H and W must be >= 32 pixels")
    return H, W


def _to_image(q: np.ndarray, cx, cy, k, theta) -> np.ndarray:
    """Template points (m, 2) -> image pixels: c + k R(theta) (q - FACE_CENTRE)."""
    c, s = math.cos(theta), math.sin(theta)
    du, dv = q[:, 0] - FACE_CENTRE[0], q[:, 1] - FACE_CENTRE[1]
    return np.stack([cx + k * (c * du - s * dv), cy + k * (s * du + c * dv)], axis=1)


def _extent(g, cx, cy, k, theta, head: bool) -> tuple[float, float, float, float]:
    """Image-pixel bounds (x0, y0, x1, y1) of the head (hair + face) or of the body of a placed face."""
    if head:
        hw = g[_A] * max(1.0, g[_HAIR_W])
        top = min(64.0 - g[_B], 64.0 - g[_HAIR_DY] - g[_B] * g[_HAIR_H])
        u0, u1, v0, v1 = 56.0 - hw, 56.0 + hw, top, 64.0 + g[_B]
    else:
        u0, u1, v0, v1 = 56.0 - 2.0 * g[_A], 56.0 + 2.0 * g[_A], 64.0 + 0.5 * g[_B], 64.0 + g[_B] + 60.0
    corners = _to_image(np.array([[u0, v0], [u1, v0], [u0, v1], [u1, v1]]), cx, cy, k, theta)
    return corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()


def _place(rng, geoms, H, W, head_width, tries: int = 200):
    """Poses (cx, cy, k, theta) with heads inside the image and 2 px apart; shrinks until they fit."""
    lo, hi = head_width
    for _ in range(40):
        poses, taken = [], []
        for g in geoms:
            pose = _place_one(rng, g, H, W, rng.uniform(lo, hi), taken, tries)
            if pose is None:
                break
            poses.append(pose)
        if len(poses) == len(geoms):
            return poses
        lo, hi = 0.85 * lo, 0.85 * hi
    raise ValueError(f"render_scene: cannot place {len(geoms)} faces in a {W}x{H} image; use a larger size")


def _place_one(rng, g, H, W, width, taken: list, tries: int):
    k = width / (2.0 * g[_A] * max(1.0, g[_HAIR_W]))
    theta = math.radians(rng.uniform(-12.0, 12.0))
    x0, y0, x1, y1 = _extent(g, 0.0, 0.0, k, theta, True)
    if x1 - x0 > W - 4 or y1 - y0 > H - 4:
        return None
    for _ in range(tries):
        cx = rng.uniform(2 - x0, W - 2 - x1)
        cy = rng.uniform(2 - y0, H - 2 - y1)
        box = (cx + x0 - 2, cy + y0 - 2, cx + x1 + 2, cy + y1 + 2)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            taken.append(box)
            return cx, cy, k, theta
    return None


# ----------------------------------------------------------------------------------------- the writer

def _jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # 4:4:4 chroma: the irises are a few pixels wide and must keep their colour.
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _npy(obj) -> bytes:
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_multiid(root, n_identities: int, n_samples: int, size: int = 256, seed: int = 0, shard_size: int = 100, *,
                  refs_per_identity: int = 4, max_faces: int = 4, aspect: tuple[float, float] = (0.75, 1.5),
                  embed_dim: int = EMBED_DIM, quality: int = 95, face_scale: float = 0.55) -> dict:
    """Write a synthetic dataset in the MultiID-2M layout under ``root`` (see the module docstring).

    Args:
        root: output folder (created; existing files of the same names are replaced).
        n_identities: people (>= max_faces). n_samples: multi-person samples.
        size: canvas height in pixels; the width is ``size * aspect`` with aspect drawn in
            ``aspect`` (default 0.75-1.5, so sources are rarely square). Gallery images are size x size.
        seed: everything is drawn from it; same arguments -> byte-identical files.
        shard_size: samples per tar shard. refs_per_identity: gallery images per person.
        max_faces: each sample shows 1..max_faces distinct people (uniform).
        embed_dim: stand-in embedding length (512). quality: JPEG quality.
        face_scale: head size of the samples (see :meth:`SyntheticIdentities.render_scene`).

    Returns:
        dict with ``shards`` (list of Path), ``names`` (identity names), ``n_samples``, ``gallery`` (Path of ref/).

    Example:
        >>> import tempfile
        >>> out = write_multiid(tempfile.mkdtemp(), n_identities=4, n_samples=3, size=96, refs_per_identity=1)
        >>> len(out["shards"]), out["names"][:2]
        (1, ['synth_00000', 'synth_00001'])
    """
    for name, value, low in (("n_identities", n_identities, 1), ("n_samples", n_samples, 1), ("shard_size", shard_size, 1),
                             ("refs_per_identity", refs_per_identity, 1), ("max_faces", max_faces, 1), ("size", size, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"write_multiid: {name}={value!r} must be an int >= {low}")
    if n_identities < max_faces:
        raise ValueError(f"write_multiid: n_identities={n_identities} must be >= max_faces={max_faces} (faces in a sample are distinct people)")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"write_multiid: aspect={aspect!r} must be (low, high) with 0 < low <= high")
    root = Path(root)
    synth = SyntheticIdentities(n_identities, seed, embed_dim=embed_dim)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    gallery = root / "ref"
    for person in synth.identities:
        folder = gallery / person.name
        folder.mkdir(parents=True, exist_ok=True)
        embeddings = []
        for r in range(refs_per_identity):
            rng = np.random.default_rng([seed, 0x2E, person.index, r])
            image, box, landmarks = synth.render_reference(person.index, rng, size)
            emb = synth.image_embedding(person.index, rng)
            embeddings.append(emb)
            _write_atomic(folder / f"{r:04d}.jpg", _jpeg(image, quality))
            _write_atomic(folder / f"{r:04d}.json", json.dumps({"bboxes": [box.tolist()], "name": person.name}).encode())
            _write_atomic(folder / f"{r:04d}.npy", _npy({"embeddings": emb[None], "bboxes": box[None], "landmarks": landmarks[None]}))
        _write_atomic(gallery / f"{person.name}.npy", _npy(np.mean(embeddings, axis=0).astype(np.float32)))
    shards = []
    for first in range(0, n_samples, shard_size):
        path = root / "shards" / f"{first // shard_size:06d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(first, min(first + shard_size, n_samples)):
                _write_sample(tar, synth, index, seed, size, max_faces, aspect, quality, face_scale)
        _write_atomic(path, buf.getvalue())
        shards.append(path)
    return {"shards": shards, "names": synth.names, "n_samples": n_samples, "gallery": gallery}


def _write_sample(tar, synth: SyntheticIdentities, index: int, seed: int, size: int, max_faces: int, aspect, quality: int,
                  face_scale: float = 0.55):
    rng = np.random.default_rng([seed, 0x5A, index])
    n = int(rng.integers(1, max_faces + 1))
    ids = rng.choice(len(synth), n, replace=False)
    H, W = size, int(round(size * rng.uniform(*aspect)))
    image, boxes, landmarks, ids = synth.render_scene(rng, ids, (H, W), face_scale=face_scale)
    embeddings = np.stack([synth.image_embedding(int(i), rng) for i in ids])
    # The json crop: the stored jpg is this region of the canvas (all faces inside); a third are uncropped.
    ux0, uy0 = np.floor(boxes[:, :2].min(0)).astype(int)
    ux1, uy1 = np.ceil(boxes[:, 2:].max(0)).astype(int)
    if rng.random() < 1 / 3:
        crop = [0, 0, W, H]
    else:
        f = rng.uniform(0, 0.5, 4)
        crop = [int(f[0] * max(ux0, 0)), int(f[1] * max(uy0, 0)),
                W - int(f[2] * max(W - ux1, 0)), H - int(f[3] * max(H - uy1, 0))]
    key = f"{index:08d}"
    meta = {"crop": crop, "caption_en": synth.caption(ids, rng), "names": sorted(synth[int(i)].name for i in ids)}
    _add(tar, f"{key}.jpg", _jpeg(np.ascontiguousarray(image[crop[1]:crop[3], crop[0]:crop[2]]), quality))
    _add(tar, f"{key}.json", json.dumps(meta).encode())
    _add(tar, f"{key}.npy", _npy({"bboxes": boxes, "embeddings": embeddings, "landmarks": landmarks}))
