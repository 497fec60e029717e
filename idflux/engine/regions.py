"""Boxes in output pixels -> per-token membership bitmasks on FLUX's 16-pixel token grid."""

from __future__ import annotations

import math
from typing import Sequence

import torch

#: Pixels per image token side: VAE x8 down-sampling, then 2x2 latent patches.
TOKEN_PIXELS = 16


def box_token_range(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Token rows/columns touched by ``box`` = (x1, y1, x2, y2) in pixels: the released floor/ceil rule.

    Returns (col0, row0, col1, row1), half-open, clipped to the grid: columns
    ``floor(x1/16) .. ceil(x2/16) - 1``, rows likewise.
    """
    x1, y1, x2, y2 = (float(c) for c in box)
    gw, gh = width // TOKEN_PIXELS, height // TOKEN_PIXELS
    c0 = min(max(math.floor(x1 / TOKEN_PIXELS), 0), gw)
    r0 = min(max(math.floor(y1 / TOKEN_PIXELS), 0), gh)
    c1 = min(max(math.ceil(x2 / TOKEN_PIXELS), 0), gw)
    r1 = min(max(math.ceil(y2 / TOKEN_PIXELS), 0), gh)
    return c0, r0, c1, r1


def boxes_to_membership(boxes: Sequence[Sequence[Sequence[float]]], height: int, width: int) -> torch.Tensor:
    """(B, n_tokens) int64 bitmask: bit r of token ``y * W_tok + x`` set when the token's cell touches box r.

    ``boxes[b]`` lists image b's boxes in reference order, each (x1, y1, x2, y2) in output pixels.
    """
    if height % TOKEN_PIXELS or width % TOKEN_PIXELS:
        raise ValueError(f"boxes_to_membership: height and width must be multiples of {TOKEN_PIXELS}, got {height}x{width}")
    gh, gw = height // TOKEN_PIXELS, width // TOKEN_PIXELS
    out = torch.zeros(len(boxes), gh, gw, dtype=torch.int64)
    for b, image_boxes in enumerate(boxes):
        for r, box in enumerate(image_boxes):
            c0, r0, c1, r1 = box_token_range(box, height, width)
            out[b, r0:r1, c0:c1] |= 1 << r
    return out.view(len(boxes), gh * gw)


#: References per image the product takes (the method's multi-person setting).
MAX_REFERENCES = 4


def parse_boxes(boxes: Sequence[Sequence[float]] | None, n_refs: int, height: int, width: int, *,
                max_refs: int = MAX_REFERENCES) -> list[tuple[float, float, float, float]]:
    """Validate one image's boxes and return them in output pixels.

    Boxes are (x1, y1, x2, y2) in output pixels, or all normalised to 0..1 (then every coordinate
    of every box is <= 1). One box per reference, in reference order. ``boxes=None`` puts every
    reference on the whole image (the released default without boxes: every token may take
    identity from every reference). A box may reach past the image (it is clipped to it), but not
    lie wholly outside it; coordinates must be finite.
    """
    if n_refs < 1:
        raise ValueError("boxes: no reference given; pass at least one reference image")
    if n_refs > max_refs:
        raise ValueError(f"boxes: {n_refs} references given, at most {max_refs} are supported")
    if boxes is None:
        return [(0.0, 0.0, float(width), float(height))] * n_refs
    if len(boxes) != n_refs:
        raise ValueError(f"boxes: {len(boxes)} boxes for {n_refs} references; give exactly one box per reference "
                         "(or boxes=None to put every reference on the whole image)")
    parsed = []
    for i, box in enumerate(boxes):
        try:
            box = tuple(float(c) for c in box)
        except (TypeError, ValueError):
            raise ValueError(f"boxes[{i}] must be four numbers (x1, y1, x2, y2), got {box!r}") from None
        if len(box) != 4:
            raise ValueError(f"boxes[{i}] must be (x1, y1, x2, y2), got {box!r}")
        if not all(math.isfinite(c) for c in box):
            raise ValueError(f"boxes[{i}] = {box} has a non-finite coordinate; give finite pixels or 0..1 fractions")
        parsed.append(box)
    normalised = all(0.0 <= c <= 1.0 for box in parsed for c in box)
    out = []
    for i, (x1, y1, x2, y2) in enumerate(parsed):
        if normalised:
            x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"boxes[{i}] = {parsed[i]} is empty: need x2 > x1 and y2 > y1")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise ValueError(f"boxes[{i}] = {parsed[i]} lies outside the {width}x{height} image")
        out.append((x1, y1, x2, y2))
    return out
