"""The layout page's logic, without a browser: page state -> checked pipeline arguments and sidecar.

Every function here is plain Python over plain values (numbers, lists, dicts, numpy arrays), so
the page handlers in :mod:`idflux.serve.app` stay thin and the rules are unit-tested directly:

- :func:`canvas_image`: the blank canvas (output size, 16-pixel token grid) the boxes are drawn on;
- :func:`boxes_from_annotation`: the annotator's boxes (in drawing order) -> ``[[x1, y1, x2, y2]]``;
- :func:`check_layout`: references + boxes + size -> the pipeline's ``boxes`` (None: every reference
  on the whole image), or ValueError naming the problem and the fix;
- :func:`page_settings`: every page field -> the keyword arguments of ``IDFluxPipeline.__call__``;
- :func:`sidecar`: the JSON written beside the PNG, with the settings used and the equivalent
  ``idflux generate`` command line.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Sequence

import numpy as np

from idflux.engine.regions import MAX_REFERENCES, TOKEN_PIXELS, parse_boxes

#: One colour per person, in reference order (the same as ``idflux.engine.pipeline.draw_boxes``).
COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0))
COLOUR_NAMES = ("red", "green", "blue", "yellow")
#: Smallest box side the page accepts, in pixels (a box smaller than a token is almost surely a slip).
MIN_BOX = 4
#: Largest output side the page offers.
MAX_SIDE = 2048


def person_label(i: int) -> str:
    """``"person 1 (red)"`` for reference ``i`` (0-based)."""
    return f"person {i + 1} ({COLOUR_NAMES[i % len(COLOUR_NAMES)]})"


def check_size(height, width) -> tuple[int, int]:
    """(height, width) as ints, multiples of 16 in [16, MAX_SIDE]; ValueError naming the field."""
    out = []
    for name, value in (("height", height), ("width", width)):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value):
            raise ValueError(f"{name}: give a whole number of pixels, got {value!r}")
        value = int(value)
        if not TOKEN_PIXELS <= value <= MAX_SIDE or value % TOKEN_PIXELS:
            raise ValueError(f"{name}: must be a multiple of {TOKEN_PIXELS} between {TOKEN_PIXELS} and {MAX_SIDE}, "
                             f"got {value} (e.g. {max(TOKEN_PIXELS, min(MAX_SIDE, value // TOKEN_PIXELS * TOKEN_PIXELS))})")
        out.append(value)
    return out[0], out[1]


def canvas_image(height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: a light canvas with the 16-pixel token grid (boxes snap to it in the
    model: a token takes a reference's identity when its cell touches that reference's box)."""
    height, width = check_size(height, width)
    canvas = np.full((height, width, 3), 236, np.uint8)
    canvas[::TOKEN_PIXELS, :] = 205
    canvas[:, ::TOKEN_PIXELS] = 205
    return canvas


def boxes_from_annotation(value) -> list[list[float]]:
    """The boxes of an ``ImageAnnotator`` value (``{"image": ..., "boxes": [{"xmin", "ymin", "xmax",
    "ymax", "label", ...}]}``, or None) as ``[[x1, y1, x2, y2], ...]`` in reference order.

    The annotator puts each box the mouse draws FIRST in its list, unlabelled; boxes the page set
    (from the numbers table) carry their ``person N`` label. So: labelled boxes by person number,
    then the drawn ones oldest first (the reverse of their list order)."""
    if not value:
        return []
    boxes = value.get("boxes") if isinstance(value, dict) else None
    labelled, drawn = [], []
    for i, box in enumerate(boxes or []):
        try:
            coords = [float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"box {i + 1}: expected xmin, ymin, xmax, ymax numbers, got {box!r}") from None
        match = re.match(r"person (\d+)", str(box.get("label") or ""))
        if match:
            labelled.append((int(match.group(1)), i, coords))
        else:
            drawn.append(coords)
    return [c for _, _, c in sorted(labelled)] + drawn[::-1]


def boxes_from_table(rows) -> list[list[float]]:
    """The numeric box list (rows of ``[x1, y1, x2, y2]``, e.g. a Dataframe's values; blank rows
    skipped) as floats; ValueError naming the row for a non-number."""
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.values.tolist()
    out = []
    for i, row in enumerate(rows):
        cells = [c for c in list(row)[-4:]]
        if all(c is None or str(c).strip() == "" for c in cells):
            continue
        try:
            values = [float(c) for c in cells]
        except (TypeError, ValueError):
            raise ValueError(f"box {i + 1}: x1, y1, x2, y2 must be numbers, got {cells!r}") from None
        if len(values) != 4:
            raise ValueError(f"box {i + 1}: needs four numbers x1, y1, x2, y2, got {cells!r}")
        out.append(values)
    return out


def annotation_value(canvas: np.ndarray, boxes: Sequence[Sequence[float]]) -> dict:
    """An ``ImageAnnotator`` value: ``canvas`` with ``boxes`` labelled and coloured per person."""
    return {"image": canvas,
            "boxes": [{"xmin": round(b[0]), "ymin": round(b[1]), "xmax": round(b[2]), "ymax": round(b[3]),
                       "label": person_label(i), "color": COLOURS[i % len(COLOURS)]} for i, b in enumerate(boxes)]}


def box_rows(boxes: Sequence[Sequence[float]]) -> list[list]:
    """The boxes as table rows ``[person label, x1, y1, x2, y2]`` (pixels, rounded)."""
    return [[person_label(i), *(int(round(c)) for c in b)] for i, b in enumerate(boxes)]


def check_layout(n_refs: int, boxes: Sequence[Sequence[float]], height: int, width: int) -> list[list[float]] | None:
    """The pipeline's ``boxes`` for ``n_refs`` references and the drawn ``boxes`` (pixels, reference
    order) on a ``height`` x ``width`` canvas: None when no box is drawn (every reference on the whole
    image), else one box per reference. ValueError, naming the box and the fix, for: no reference,
    more than four, more boxes than references, fewer boxes than references (but some), an empty or
    tiny box, a box outside the canvas."""
    height, width = check_size(height, width)
    if n_refs < 1:
        raise ValueError("references: upload at least one reference photo (one person each)")
    if n_refs > MAX_REFERENCES:
        raise ValueError(f"references: {n_refs} uploaded, at most {MAX_REFERENCES} are supported")
    boxes = [list(map(float, b)) for b in boxes]
    if not boxes:
        return None
    if len(boxes) > n_refs:
        raise ValueError(f"boxes: {len(boxes)} boxes drawn for {n_refs} reference(s); draw one box per reference "
                         "(remove the extra box, or upload another reference)")
    if len(boxes) < n_refs:
        raise ValueError(f"boxes: {len(boxes)} box(es) drawn for {n_refs} references; draw one box per reference "
                         "in reference order, or remove all boxes to put every reference on the whole image")
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        label = f"box {i + 1} ({person_label(i)}) = [{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
        if not all(math.isfinite(c) for c in (x1, y1, x2, y2)):
            raise ValueError(f"{label}: coordinates must be finite numbers")
        if x2 - x1 < MIN_BOX or y2 - y1 < MIN_BOX:
            raise ValueError(f"{label} is smaller than {MIN_BOX} pixels (need x2 > x1 and y2 > y1); draw it larger")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise ValueError(f"{label} is outside the {width}x{height} canvas; keep it within 0..{width} x 0..{height}")
    parse_boxes(boxes, n_refs, height, width)  # the engine's own rules, so the page never lets through what it refuses
    return boxes


def page_settings(*, prompt, n_refs: int, boxes, height, width, steps, guidance, seed, id_weight,
                  siglip_weight) -> dict:
    """Every page field -> checked keyword arguments of ``IDFluxPipeline.__call__`` (without
    ``ref_images`` and ``generator``; ``seed`` is returned for the generator). ValueError naming the
    field for a bad value, before any work."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: write a prompt describing the image")
    height, width = check_size(height, width)
    if steps is None or isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps) \
            or not 1 <= steps <= 200:
        raise ValueError(f"steps: a whole number from 1 to 200, got {steps!r}")
    if seed is None or isinstance(seed, bool) or not isinstance(seed, (int, float)) or not math.isfinite(seed) \
            or seed != int(seed) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed: a whole number >= 0, got {seed!r}")
    numbers = {}
    for name, value in (("guidance", guidance), ("id_weight", id_weight), ("siglip_weight", siglip_weight)):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: a finite number, got {value!r}")
        numbers[name] = float(value)
    return {"prompt": prompt.strip(), "boxes": check_layout(n_refs, boxes, height, width), "height": height,
            "width": width, "num_inference_steps": int(steps), "guidance_scale": numbers["guidance"],
            "seed": int(seed), "id_weight": numbers["id_weight"], "siglip_weight": numbers["siglip_weight"]}


def generate_command(settings: dict, ref_names: Sequence[str], preset: str, out: str = "out.png") -> str:
    """The ``idflux generate`` command line that reproduces ``settings`` (from :func:`page_settings`)."""
    args = ["idflux", "generate", "--preset", preset, "--prompt", settings["prompt"]]
    for name in ref_names:
        args += ["--ref", name]
    for b in settings["boxes"] or []:
        args += ["--box", ",".join(f"{c:g}" for c in b)]
    args += ["--height", str(settings["height"]), "--width", str(settings["width"]),
             "--steps", str(settings["num_inference_steps"]), "--guidance", f"{settings['guidance_scale']:g}",
             "--seed", str(settings["seed"]), "--id-weight", f"{settings['id_weight']:g}",
             "--siglip-weight", f"{settings['siglip_weight']:g}", "--out", out]
    return shlex.join(args)


def sidecar(settings: dict, used: dict, ref_names: Sequence[str], preset: str, source: dict | None,
            image_name: str) -> dict:
    """The JSON sidecar of a page generation: the pipeline's own record (``used``: ``out.settings[0]``),
    the boxes as drawn, the references, the preset and weights, and the equivalent CLI command."""
    return {**used, "boxes": settings["boxes"], "refs": list(ref_names), "preset": preset,
            "weights": source or {}, "image": image_name, "source": "idflux serve",
            "command": generate_command(settings, ref_names, preset, image_name)}
