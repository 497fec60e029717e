"""MultiID-Bench reader: the benchmark in any of its layouts -> case dicts; generated folders -> images.

A *case* is a plain dict (JSON-serialisable)::

    {"id": "0001", "subset": "p2", "num_persons": 2, "prompt": "...",
     "gt": "/abs/GT.jpg", "refs": ["/abs/ref_1.jpg", "/abs/ref_2.jpg"],
     "bboxes": [[x1, y1, x2, y2], ...] | None,     # faces in GT pixels, reference order
     "task_type": ...}                             # only when the bench has it

Subsets: ``p1`` single person, ``p2`` two, ``p3`` three to four. The released data names them
``v200_single``, ``v202`` and ``v200_m``; both spellings are accepted, and a missing subset is derived
from ``num_persons`` (or the number of references).

Bench layouts read by :func:`load_bench`:

- parquet (the Hugging Face ``WithAnyone/MultiID-Bench`` files): a ``.parquet`` file or a folder of them,
  fields ``ID, GT, input_images, prompt, task_type, bboxes, subset, num_persons``; images stored in the
  file (bytes, ``{"bytes", "path"}`` structs or base64) are written under ``extract_dir``. Needs pyarrow
  or pandas, which idflux does not install.
- the folder written by the released ``hf2bench.py``: ``v200_single.json``, ``v202.json``, ``v200_m.json``
  indexes (``prompt``, ``image_paths``, ``ori_img_path``) with a ``<GT stem>.json`` holding ``bboxes``
  beside each GT image. Case ids follow the released inference script's output folder names
  (``0001``, ``num_3_0001``).
- a JSON list / JSONL file of records with the parquet field names (or this module's case keys, so a
  ``cases.json`` from :func:`write_cases` reads back), image paths relative to the file; a folder holding
  ``cases.json``, ``bench.json`` or ``metadata.jsonl`` is read the same way.

Generated images are looked up as ``<generated>/<id>/out.<ext>`` or ``<generated>/<id>.<ext>``
(:func:`find_generated`); :func:`cases_from_generated` reads the released evaluation layout
(``<id>/{out,ori,ref_<k>}.jpg`` + ``meta.json``) when no bench is given.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SUBSETS = ("p1", "p2", "p3")
SUBSET_TITLES = {"p1": "single person", "p2": "two persons", "p3": "three to four persons"}
_SUBSET_ALIASES = {"p1": "p1", "p2": "p2", "p3": "p3", "v200_single": "p1", "single": "p1", "v202": "p2",
                   "v200_m": "p3"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_HF2BENCH_INDEXES = {"v200_single.json": Path("v200_single") / "untar", "v202.json": Path("v202") / "untar",
                     "v200_m.json": Path("v200_m")}
_RECORD_FILES = ("cases.json", "bench.json", "metadata.jsonl", "metadata.json")


def subset_for(subset: Any, num_persons: int) -> str:
    """Canonical subset name (p1 / p2 / p3) from a bench's subset value, else from the person count."""
    if subset is not None and str(subset).strip().lower() in _SUBSET_ALIASES:
        return _SUBSET_ALIASES[str(subset).strip().lower()]
    if num_persons <= 1:
        return "p1"
    return "p2" if num_persons == 2 else "p3"


def load_rgb(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an image file."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_bench(path, extract_dir=None) -> list[dict]:
    """Read MultiID-Bench at ``path`` (any layout of the module docstring) into case dicts.

    Args:
        path: parquet file or folder, hf2bench folder, or JSON / JSONL records file (or a folder with one).
        extract_dir: where images embedded in the records (parquet) are written, one folder per case;
            required only for such records.

    Returns:
        list of case dicts in bench order, ids unique (prefixed with the subset when the bench repeats
        an id across subsets).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"bench: {root} does not exist; pass a MultiID-Bench parquet file or folder "
                                f"(huggingface.co/datasets/WithAnyone/MultiID-Bench), an hf2bench folder or a "
                                f"cases.json")
    if root.is_file():
        if root.suffix == ".parquet":
            return _unique_ids(_records_to_cases(_read_parquet(root), root.parent, extract_dir))
        if root.suffix in (".json", ".jsonl"):
            return _unique_ids(_records_to_cases(_read_records(root), root.parent, extract_dir))
        raise ValueError(f"bench: {root} is neither .parquet, .json nor .jsonl")
    if any((root / name).is_file() for name in _HF2BENCH_INDEXES):
        return _unique_ids(_hf2bench_cases(root))
    parquets = sorted(root.rglob("*.parquet"))
    if parquets:
        records: list[dict] = []
        for file in parquets:
            records += _read_parquet(file)
        return _unique_ids(_records_to_cases(records, root, extract_dir))
    for name in _RECORD_FILES:
        if (root / name).is_file():
            return _unique_ids(_records_to_cases(_read_records(root / name), root, extract_dir))
    raise ValueError(f"bench: {root} holds no *.parquet, no hf2bench index ({', '.join(_HF2BENCH_INDEXES)}) "
                     f"and no {' / '.join(_RECORD_FILES)}")


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        return pq.read_table(path).to_pylist()
    try:
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    except ImportError as exc:
        raise ImportError(f"bench: reading {path} needs pyarrow (pip install pyarrow) or pandas with a parquet "
                          f"engine, which idflux does not install. Or convert the bench once elsewhere with the "
                          f"released hf2bench.py and pass that folder.") from exc


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
        if isinstance(records, dict):
            records = records.get("cases")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"bench: {path} must hold a list of records (objects), or {{\"cases\": [...]}}")
    return records


def _first(record: dict, *keys: str) -> Any:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return None


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._") or "case"


def _sniff_ext(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except Exception as exc:  # PIL raises several types for bytes that are no image
        raise ValueError(f"bench: embedded image bytes are not an image ({exc})") from exc
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt}" if fmt else ".img")


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"GIF8", b"BM")


def _base64_image(text: str) -> bytes | None:
    """The bytes of a base64-encoded image (the released parquet2bench format), else None."""
    if len(text) < 24 or len(text) % 4:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(_IMAGE_MAGIC) else None


def _image_path(value, field: str, case_id: str, base: Path, extract_dir, stem: str) -> str | None:
    """A path on disk for one image field: resolved relative to ``base``, or extracted from its bytes."""
    data = None
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            data = bytes(value["bytes"])
        elif value.get("path"):
            value = value["path"]
        else:
            return None
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image (datasets' decoded Image feature)
        buf = io.BytesIO()
        value.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    if data is None and isinstance(value, str):
        data = _base64_image(value)
    if data is None:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"bench: case {case_id}: {field} must be a path, image bytes or {{'bytes', 'path'}}, "
                             f"got {type(value).__name__}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise FileNotFoundError(f"bench: case {case_id}: {field} file {path} does not exist")
        return str(path.resolve())
    if extract_dir is None:
        raise ValueError(f"extract_dir is needed: case {case_id} stores its {field} inside the bench file; "
                         f"pass a folder to write the images to")
    out = Path(extract_dir).expanduser() / _safe_name(case_id) / f"{stem}{_sniff_ext(data)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.stat().st_size != len(data):
        out.write_bytes(data)
    return str(out.resolve())


def _parse_bboxes(value, case_id: str) -> list[list[float]] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"bboxes of case {case_id} is not JSON: {value[:80]!r}") from exc
    boxes = [[float(c) for c in _as_list(b)] for b in _as_list(value)]
    for box in boxes:
        if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"bboxes of case {case_id} must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, got {box}")
    return boxes or None


def _records_to_cases(records: Iterable[dict], base: Path, extract_dir) -> list[dict]:
    cases = []
    for i, rec in enumerate(records):
        raw_id = _first(rec, "ID", "id")
        case_id = str(raw_id) if raw_id is not None else f"{i + 1:04d}"
        ref_values = _as_list(_first(rec, "input_images", "refs", "image_paths"))
        if not ref_values:
            ref_values = [rec[k] for k in ("ref_1", "ref_2", "ref_3", "ref_4") if rec.get(k) is not None]
        refs = [_image_path(v, f"input_images[{k}]", case_id, base, extract_dir, f"ref_{k + 1}")
                for k, v in enumerate(ref_values)]
        refs = [r for r in refs if r is not None]
        if not refs:
            raise ValueError(f"input_images of case {case_id} is empty: every MultiID-Bench case has 1-4 references")
        gt = _image_path(_first(rec, "GT", "gt", "ori_img_path"), "GT", case_id, base, extract_dir, "gt")
        num_persons = int(_first(rec, "num_persons") or len(refs))
        case = {
            "id": case_id,
            "subset": subset_for(_first(rec, "subset"), num_persons),
            "num_persons": num_persons,
            "prompt": str(_first(rec, "prompt", "caption_en", "caption") or ""),
            "gt": gt,
            "refs": refs,
            "bboxes": _parse_bboxes(_first(rec, "bboxes"), case_id),
        }
        if rec.get("task_type") is not None:
            case["task_type"] = rec["task_type"]
        cases.append(case)
    return cases


def _hf2bench_cases(root: Path) -> list[dict]:
    cases = []
    for index_name, sub in _HF2BENCH_INDEXES.items():
        index = root / index_name
        if not index.is_file():
            continue
        base = root / sub
        subset = _SUBSET_ALIASES[index_name[:-5]]
        for entry in _read_records(index):
            ori = entry.get("ori_img_path")
            if not ori:
                raise ValueError(f"bench: an entry of {index} has no ori_img_path: {entry}")
            case_id = str(Path(ori).with_suffix("")).replace("/", "_").replace("\\", "_")
            refs = [_image_path(p, "image_paths", case_id, base, None, "") for p in entry.get("image_paths") or []]
            if not refs:
                raise ValueError(f"input_images of case {case_id} ({index}) is empty")
            meta_path = (base / ori).with_suffix(".json")
            meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
            cases.append({
                "id": case_id,
                "subset": subset,
                "num_persons": len(refs),
                "prompt": str(entry.get("prompt") or meta.get("caption_en") or ""),
                "gt": _image_path(ori, "ori_img_path", case_id, base, None, ""),
                "refs": refs,
                "bboxes": _parse_bboxes(meta.get("bboxes"), case_id),
            })
    return cases


def _unique_ids(cases: list[dict]) -> list[dict]:
    ids = [c["id"] for c in cases]
    if len(set(ids)) != len(ids):
        for c in cases:
            c["id"] = f"{c['subset']}_{c['id']}"
        ids = [c["id"] for c in cases]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"ID values repeat within a subset ({dup}); give every case a unique ID")
    return cases


def find_generated(folder, case_id: str) -> Path | None:
    """The generated image of a case: ``<folder>/<id>/out.<ext>`` or ``<folder>/<id>.<ext>``; None if absent."""
    folder = Path(folder)
    for stem in (Path(case_id) / "out", Path(_safe_name(case_id)) / "out", Path(case_id), Path(_safe_name(case_id))):
        for ext in IMAGE_EXTS:
            path = folder / stem.with_name(stem.name + ext)
            if path.is_file():
                return path
    return None


def _numbered(path: Path) -> int:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else 0


def cases_from_generated(folder) -> list[dict]:
    """Cases from the released evaluation layout: ``<folder>/<id>/`` with ``ori.*``, ``ref_<k>.*``, ``meta.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"generated folder {folder} does not exist")
    cases = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = [p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTS]
        gt = next((p for p in images if p.stem == "ori"), None)
        refs = sorted((p for p in images if p.stem.startswith("ref_")), key=_numbered)
        if gt is None or not refs:
            continue
        meta = json.loads((sub / "meta.json").read_text(encoding="utf-8")) if (sub / "meta.json").is_file() else {}
        cases.append({
            "id": sub.name,
            "subset": subset_for(meta.get("subset"), len(refs)),
            "num_persons": len(refs),
            "prompt": str(meta.get("prompt") or meta.get("caption_en") or ""),
            "gt": str(gt.resolve()),
            "refs": [str(p.resolve()) for p in refs],
            "bboxes": None,
        })
    if not cases:
        raise ValueError(f"generated folder {folder} has no <id>/ori.* + ref_<k>.* case folders (the released "
                         f"evaluation layout); pass --bench to read the GT and references from the benchmark")
    return cases


def write_cases(cases: list[dict], path) -> Path:
    """Write ``cases`` as the ``idflux generate --batch`` input and return the path.

    Each entry keeps the case keys and adds ``boxes`` (the bboxes normalised 0..1 by the GT size, the
    engine's resolution-free form; None without bboxes or GT), ``gt_size`` ([W, H]) and ``out``
    (``<id>/out.png``, the relative path where the generator should write the image so that
    ``idflux eval --generated <dir>`` finds it). The file reads back with :func:`load_bench`.
    """
    from PIL import Image

    entries = []
    for case in cases:
        entry = dict(case)
        entry["boxes"], entry["gt_size"] = None, None
        if case.get("gt"):
            with Image.open(case["gt"]) as img:
                w, h = img.size
            entry["gt_size"] = [w, h]
            if case.get("bboxes"):
                entry["boxes"] = [[min(max(x1 / w, 0.0), 1.0), min(max(y1 / h, 0.0), 1.0),
                                   min(max(x2 / w, 0.0), 1.0), min(max(y2 / h, 0.0), 1.0)]
                                  for x1, y1, x2, y2 in case["bboxes"]]
        entry["out"] = f"{_safe_name(case['id'])}/out.png"
        entries.append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path
