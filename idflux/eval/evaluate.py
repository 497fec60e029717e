"""Evaluate generated folders against MultiID-Bench cases: per-case metrics and per-subset summaries."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from idflux.eval.bench import SUBSETS, find_generated, load_rgb
from idflux.eval.faces import FaceModel, face_embeddings, reference_embedding
from idflux.eval.metrics import face_metrics, summarize

#: Per-face-model metrics, pooled over the face models in the summaries (as the released "average").
FACE_METRICS = ("SimGT", "SimRef", "CP", "blending")
#: Model-free metrics.
CLIP_METRICS = ("CLIP-I", "CLIP-T")


def _unique_names(models: Sequence[FaceModel]) -> list[str]:
    names: list[str] = []
    for m in models:
        base = str(getattr(m, "name", type(m).__name__))
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def evaluate(cases: Sequence[dict], runs: Mapping[str, str | Path], face_models: Sequence[FaceModel], clip=None,
             *, iqr: float | None = 1.5, pad_refs: bool = True, progress: bool = False) -> dict:
    """Metrics of every run on every case, and their per-subset summaries.

    Args:
        cases: case dicts from :func:`idflux.eval.bench.load_bench`.
        runs: run name -> folder of generated images (``<id>/out.<ext>`` or ``<id>.<ext>``).
        face_models: one or more :class:`FaceModel`; summaries pool their per-case values (the released
            evaluation averages buffalo_l, FaceNet and AdaFace this way), ``per_model`` keeps each.
        clip: optional :class:`idflux.eval.clip.ClipScorer` for CLIP-I (vs the GT image) and CLIP-T.
        iqr: outlier rule of :func:`summarize`.
        pad_refs: pad reference images to a 1.5x black square before detection, as released.
        progress: show a progress bar.

    GT and reference embeddings are computed once per case and shared by the runs. A missing generated
    image is reported (``status: missing_image``) and left out of the statistics; so is a case where no
    face model finds a generated face (``no_face``): as in the released evaluation it enters no mean,
    CLIP included, but its faces count in ``missing_faces`` and it in ``no_face``.

    Returns:
        the report dict: ``face_models``, ``clip``, ``iqr``, ``subsets`` and per run ``generated``,
        ``summary`` (per subset: ``cases``, ``evaluated``, ``missing_images``, ``no_face``,
        ``missing_faces``, ``metrics`` {metric: summarize dict}, ``per_model``) and ``cases``.
    """
    if not cases:
        raise ValueError("cases is empty: the bench gave no case (check --bench or --subset)")
    if not runs:
        raise ValueError("runs is empty: pass at least one folder of generated images")
    if not face_models or not all(isinstance(m, FaceModel) for m in face_models):
        raise ValueError(f"face_models must be a non-empty list of idflux.eval.FaceModel, got {face_models!r}")
    names = _unique_names(face_models)
    results: dict[str, list[dict]] = {run: [] for run in runs}
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="eval", unit="case")
    for case in iterator:
        gt_img = load_rgb(case["gt"]) if case.get("gt") else None
        ref_imgs = [load_rgb(p) for p in case["refs"]]
        gt_embs, ref_embs = {}, {}
        for name, model in zip(names, face_models):
            gt_embs[name] = face_embeddings(model, gt_img) if gt_img is not None else None
            found = [e for e in (reference_embedding(model, img, pad=pad_refs) for img in ref_imgs) if e is not None]
            ref_embs[name] = np.stack(found) if found else None
        clip_gt = clip_text = None
        if clip is not None:
            clip_gt = clip.image_features([gt_img])[0] if gt_img is not None else None
            clip_text = clip.text_features([case["prompt"]])[0] if case.get("prompt") else None
        for run, folder in runs.items():
            path = find_generated(folder, case["id"])
            row = {"id": case["id"], "subset": case["subset"], "image": str(path) if path else None,
                   "status": "missing_image", "faces": {}, "CLIP-I": None, "CLIP-T": None}
            if path is not None:
                gen = load_rgb(path)
                for name, model in zip(names, face_models):
                    row["faces"][name] = face_metrics(face_embeddings(model, gen), gt_embs[name], ref_embs[name])
                found_any = any(m["n_gen"] for m in row["faces"].values())
                row["status"] = "ok" if found_any else "no_face"
                if clip is not None:
                    feat = clip.image_features([gen])[0]
                    row["CLIP-I"] = float(feat @ clip_gt) if clip_gt is not None else None
                    row["CLIP-T"] = float(feat @ clip_text) if clip_text is not None else None
            results[run].append(row)
    present = [s for s in SUBSETS if any(c["subset"] == s for c in cases)]
    return {
        "idflux_eval": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "face_models": names,
        "clip": getattr(clip, "name", None) if clip is not None else None,
        "iqr": iqr,
        "subsets": present,
        "runs": {run: {"generated": str(runs[run]),
                       "summary": {s: summarize_cases([r for r in rows if r["subset"] == s], names, iqr)
                                   for s in present},
                       "cases": rows}
                 for run, rows in results.items()},
    }


def summarize_cases(rows: Sequence[dict], model_names: Sequence[str], iqr: float | None = 1.5) -> dict:
    """Summary of one run's case rows (one subset): counts, pooled metrics and per-model metrics."""
    with_image = [r for r in rows if r["status"] != "missing_image"]
    per_model = {}
    for name in model_names:
        faces = [r["faces"][name] for r in with_image]
        entry = {metric: summarize([f[metric] for f in faces], iqr) for metric in FACE_METRICS}
        entry["missing_faces"] = int(sum(f["missing_faces"] for f in faces))
        entry["no_face"] = int(sum(1 for f in faces if f["n_gen"] == 0))
        entry["cp_undefined"] = int(sum(1 for f in faces if f["CP"] is None))
        per_model[name] = entry
    # Means over the evaluated cases only: the released evaluation drops a case without faces entirely.
    ok = [r for r in rows if r["status"] == "ok"]
    metrics = {metric: summarize([r["faces"][n][metric] for n in model_names for r in ok], iqr)
               for metric in FACE_METRICS}
    for metric in CLIP_METRICS:
        metrics[metric] = summarize([r[metric] for r in ok], iqr)
    return {
        "cases": len(rows),
        "evaluated": sum(1 for r in rows if r["status"] == "ok"),
        "missing_images": len(rows) - len(with_image),
        "no_face": sum(1 for r in rows if r["status"] == "no_face"),
        "missing_faces": float(np.mean([per_model[n]["missing_faces"] for n in model_names])) if model_names else 0.0,
        "metrics": metrics,
        "per_model": per_model,
    }
