"""Sample sheets a person can read: per row the references, the ground truth with its boxes, the image
generated with the adapter and with the adapter off (same boxes drawn), and the prompt as a caption.

:func:`draw_sheet` draws rows given as :class:`SheetRow`; :func:`sheet_from_run` generates the rows of
a trained tiny run (``idflux train --preset tiny`` calls it) from held-out cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Box colours, one per reference (reference k's tile is framed in colour k too).
COLOURS = ((230, 60, 60), (60, 160, 255), (60, 200, 90), (240, 200, 40), (200, 90, 230), (255, 140, 40))


@dataclass
class SheetRow:
    """One row: references (uint8 HxWx3 each, in box order), images by column title, boxes in image
    pixels (reference order), the prompt, and optional per-column notes (e.g. identification)."""

    refs: list
    images: dict
    boxes: list
    prompt: str
    notes: dict = field(default_factory=dict)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_sheet(rows: list[SheetRow], path, *, tile: int = 192, ref_tile: int = 64, title: str | None = None) -> Path:
    """Draw ``rows`` into one PNG at ``path``: references stacked at the left (framed in their box's
    colour), then one column per image title with the boxes drawn, the prompt under each row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("draw_sheet: rows is empty; pass at least one SheetRow")
    titles = list(rows[0].images)
    max_refs = max(len(r.refs) for r in rows)
    ref_cols = 2 if max_refs > 2 else 1
    left = ref_cols * (ref_tile + 4) + 8
    caption_h, head_h = 34, 26 + (24 if title else 0)
    W = left + len(titles) * (tile + 8)
    H = head_h + len(rows) * (tile + caption_h + 8)
    sheet = Image.new("RGB", (W, H), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(11)
    y = 4
    if title:
        draw.text((8, y), title, fill=(0, 0, 0), font=font)
        y += 24
    draw.text((8, y), "references", fill=(0, 0, 0), font=small)
    for j, t in enumerate(titles):
        draw.text((left + j * (tile + 8), y), t, fill=(0, 0, 0), font=font)
    y = head_h
    for row in rows:
        for k, ref in enumerate(row.refs):
            im = Image.fromarray(np.asarray(ref, np.uint8)).resize((ref_tile, ref_tile))
            x0 = 8 + (k % ref_cols) * (ref_tile + 4)
            y0 = y + (k // ref_cols) * (ref_tile + 4)
            sheet.paste(im, (x0, y0))
            draw.rectangle((x0, y0, x0 + ref_tile - 1, y0 + ref_tile - 1), outline=COLOURS[k % len(COLOURS)], width=3)
            draw.text((x0 + 3, y0 + 2), str(k + 1), fill=COLOURS[k % len(COLOURS)], font=small)
        for j, t in enumerate(titles):
            img = np.asarray(row.images[t], np.uint8)
            im = Image.fromarray(img)
            sx, sy = tile / im.width, tile / im.height
            im = im.resize((tile, tile))
            x0 = left + j * (tile + 8)
            sheet.paste(im, (x0, y))
            for k, (a, b, c, d) in enumerate(row.boxes):
                draw.rectangle((x0 + a * sx, y + b * sy, x0 + c * sx, y + d * sy), outline=COLOURS[k % len(COLOURS)], width=2)
                draw.text((x0 + a * sx + 3, y + b * sy + 1), str(k + 1), fill=COLOURS[k % len(COLOURS)], font=small)
            if t in row.notes:
                draw.text((x0 + 2, y + tile - 14), str(row.notes[t]), fill=(255, 255, 255), font=small,
                          stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((8, y + tile + 4), _wrap(row.prompt, 150), fill=(40, 40, 40), font=small)
        y += tile + caption_h + 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    text = f'prompt: "{text}"'
    return text if len(text) <= width else text[:width] + "\n" + text[width:2 * width]


def to_uint8(image) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    x = image[0] if image.dim() == 4 else image
    return ((x.float().permute(1, 2, 0).cpu() + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def sheet_from_run(model, path, *, n_cases: int = 4, steps: int = 20, seed: int = 0) -> Path:
    """The sample sheet of a trained tiny-world run: ``n_cases`` held-out bench cases (identities no
    training saw), generated with ``model``'s adapter and with it off."""
    from idflux.train.tiny_world_eval import build_cases, generate_cases, encode_case_refs
    from idflux.engine.faces import CenterFaceDetector
    from idflux.engine.pipeline import Pipeline

    cases = build_cases(n_cases, seed=seed)
    device = next(model.adapter.parameters()).device
    pipe = Pipeline(model.parts, model.adapter, device=device, dtype=next(model.transformer.parameters()).dtype)
    refs = encode_case_refs(cases, CenterFaceDetector(model.recognizer), model.siglip)
    on = generate_cases(pipe, cases, refs, steps=steps)
    off = generate_cases(pipe, cases, refs, steps=steps, adapter_on=False)
    rows = [SheetRow(c["ref_images"], {"ground truth": c["gt_image"], "with adapter": a, "adapter off": b}, c["bboxes"],
                     c["prompt"]) for c, a, b in zip(cases, on, off)]
    return draw_sheet(rows, path, title="tiny world, held-out identities")
