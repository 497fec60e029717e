"""A weight-free face model for the eval tests: faces are saturated coloured squares on a neutral image.

The detector finds the connected regions of colourful pixels; the embedding is the region's mean
colour, centred on its grey level, mapped through a fixed orthonormal 3 -> D matrix, so the cosine of
two faces is the cosine of their chroma vectors: the hue is the identity. Black padding and grey
backgrounds are no faces. Loaded by the CLI as ``tests/eval/fake_faces.py:ColourSquareFaces``.
"""

from __future__ import annotations

import colorsys

import numpy as np
from scipy import ndimage

from idflux.eval.faces import DetectedFace, FaceModel

BACKGROUND = 128


def hue_rgb(hue: float) -> tuple[int, int, int]:
    """Pure, fully saturated colour of ``hue`` in [0, 1) as uint8 RGB."""
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue % 1.0, 1.0, 1.0))


def draw_faces(hues, size: int = 64, side: int = 12) -> tuple[np.ndarray, list[list[float]]]:
    """(size, size, 3) uint8 grey image with one ``side``-pixel square per hue, left to right; and the boxes."""
    img = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    boxes = []
    step = size // max(len(hues), 1)
    for k, hue in enumerate(hues):
        x, y = k * step + (step - side) // 2, (size - side) // 2
        img[y:y + side, x:x + side] = hue_rgb(hue)
        boxes.append([float(x), float(y), float(x + side), float(y + side)])
    return img, boxes


class ColourSquareFaces(FaceModel):
    """Fake recogniser: embedding = orthonormal map of the square's centred mean colour, D dims."""

    name = "fake-colour"
    dim = 8

    def __init__(self):
        q, _ = np.linalg.qr(np.random.default_rng(self.dim).standard_normal((self.dim, 3)))
        self.proj = q.astype(np.float64)

    def embed_colour(self, rgb) -> np.ndarray:
        c = np.asarray(rgb, dtype=np.float64) / 255.0
        return (self.proj @ (c - c.mean())).astype(np.float32)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        chroma = image.max(axis=2).astype(np.int32) - image.min(axis=2).astype(np.int32)
        labels, n = ndimage.label(chroma > 40)
        faces = []
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[sl] == k
            if mask.sum() < 16:
                continue
            colour = image[sl][mask].mean(axis=0)
            box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
            faces.append(DetectedFace(box=box, score=1.0, embedding=self.embed_colour(colour)))
        return faces


class WideColourSquareFaces(ColourSquareFaces):
    """The same fake with 16-dimensional embeddings, to pool two "models"."""

    name = "fake-colour-wide"
    dim = 16
