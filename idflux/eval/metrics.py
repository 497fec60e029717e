"""MultiID-Bench identity metrics: Hungarian face matching, SimGT / SimRef / blending, copy-paste, summaries.

Definitions follow the WithAnyone paper and its released evaluation (``MultiID-Bench/eval.py`` and
``metrics/arcface_metric.py``, GitHub ``Doby-Xu/WithAnyone``):

- faces of the generated image are matched to the GT faces, and separately to the reference faces,
  by the Hungarian algorithm on negative cosine (rectangular matrices allowed);
- SimGT / SimRef: mean matched cosine; blending: mean of the unmatched generated x GT entries;
- copy-paste ``M_CP = (theta(gen, gt) - theta(gen, ref)) / max(theta(gt, ref), eps)`` per face, only when
  the generated, GT and reference face counts agree: +1 is a copy of the reference, -1 matches the GT;
- summary statistics drop outliers by the IQR rule, falling back to median statistics when that would
  drop more than half of the values.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

#: Norm floor used when normalising embeddings, as ``F.cosine_similarity`` (the released evaluation's cosine).
COS_EPS = 1e-8

#: Keys of the dict returned by :func:`face_metrics` (documented there).
FACE_METRIC_KEYS = ("SimGT", "SimRef", "CP", "blending", "SimGT_faces", "SimRef_faces", "CP_faces",
                    "match_gt", "match_ref", "n_gen", "n_gt", "n_ref", "missing_faces")


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numpy array or torch tensor of numbers, got {type(x).__name__}") from exc


def _embeddings(x, name: str) -> np.ndarray:
    """(n, D) float64 array; None or an empty sequence means "no face" and gives shape (0, 0)."""
    if x is None:
        return np.zeros((0, 0))
    arr = _to_numpy(x, name)
    if arr.size == 0:
        return np.zeros((0, arr.shape[-1] if arr.ndim == 2 else 0))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (n_faces, D) embeddings, got shape {tuple(arr.shape)}; "
                         f"stack one row per face (use x[None] for a single face)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; drop the faces whose embedding failed")
    return arr


def cosine_matrix(a, b) -> np.ndarray:
    """(n, m) float64 cosine similarities between the rows of ``a`` (n, D) and ``b`` (m, D)."""
    a = _embeddings(a, "a")
    b = _embeddings(b, "b")
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b has embedding size {b.shape[1]} but a has {a.shape[1]}; use one face model for both")
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), COS_EPS)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), COS_EPS)
    return an @ bn.T


def match_faces(sim) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment maximising the total cosine of a (n_gen, n_other) similarity matrix.

    Args:
        sim: (n_gen, n_other) numpy array or torch tensor; rectangular allowed (min(n_gen, n_other)
            pairs are matched). An empty dimension gives empty results.

    Returns:
        (rows, cols): int64 numpy arrays of equal length, rows ascending; generated face ``rows[k]`` is
        matched to face ``cols[k]``. Solved by ``scipy.optimize.linear_sum_assignment(-sim)``.

    Example:
        >>> import numpy as np
        >>> match_faces(np.array([[0.1, 0.9], [0.8, 0.2]]))
        (array([0, 1]), array([1, 0]))
    """
    arr = _to_numpy(sim, "sim")
    if arr.ndim != 2:
        raise ValueError(f"sim must be a 2-D (n_gen, n_other) similarity matrix, got shape {tuple(arr.shape)}")
    if 0 in arr.shape:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if not np.isfinite(arr).all():
        raise ValueError("sim contains NaN or inf; check the embeddings it was computed from")
    rows, cols = linear_sum_assignment(-arr)
    return rows.astype(np.int64), cols.astype(np.int64)


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(COS_EPS)


def copy_paste_score(gen, gt, ref, eps: float = 1e-6) -> torch.Tensor:
    """Per-face copy-paste metric of matched (generated, GT, reference) embeddings.

    ``M_CP = (theta(gen, gt) - theta(gen, ref)) / max(theta(gt, ref), eps)`` with
    ``theta(a, b) = arccos(clamp(cos(a, b), -1, 1))``: +1 when the generated face equals the reference
    (copy-paste), -1 when it equals the GT, in [-1, 1] otherwise (triangle inequality on the sphere).
    Computed in float64. (The released code returns 0 when theta(gt, ref) < eps; with the max() the
    result there is (theta_gt - theta_gr) / eps, which is 0 whenever GT == reference exactly.)

    Args:
        gen, gt, ref: (n, D) embeddings (numpy or torch), already matched row to row; raw or normalised.
        eps: floor of the GT-reference angle, > 0 (default 1e-6).

    Returns:
        (n,) torch tensor in the promoted floating dtype of the inputs (numpy arrays count as float64,
        integer tensors as float32), on ``gen``'s device when it is a tensor.

    Example:
        >>> import torch
        >>> gt, ref = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> copy_paste_score(ref, gt, ref), copy_paste_score(gt, gt, ref)
        (tensor([1.]), tensor([-1.]))
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    tensors = {}
    for name, x in (("gen", gen), ("gt", gt), ("ref", ref)):
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(_to_numpy(x, name))
        if t.ndim != 2:
            raise ValueError(f"{name} must be (n_faces, D) embeddings, got shape {tuple(t.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
        tensors[name] = t
    for name in ("gt", "ref"):
        if tensors[name].shape != tensors["gen"].shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)} but gen has "
                             f"{tuple(tensors['gen'].shape)}; match the faces first (face_metrics does)")
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    out_dtype = floats[0] if floats else torch.float32
    for dt in floats[1:]:
        out_dtype = torch.promote_types(out_dtype, dt)
    g, t, r = (_normalize_rows(tensors[k].to("cpu", torch.float64)) for k in ("gen", "gt", "ref"))

    def theta(a, b):
        return torch.arccos((a * b).sum(dim=1).clamp(-1.0, 1.0))

    score = (theta(g, t) - theta(g, r)) / theta(t, r).clamp_min(eps)
    device = gen.device if isinstance(gen, torch.Tensor) else torch.device("cpu")
    return score.to(device=device, dtype=out_dtype)



def _match_into(out: dict, name: str, gen, other):
    """Hungarian-match gen to other faces; record Sim<name>, Sim<name>_faces and match_<name lower>
    in ``out``. Returns (similarity matrix, matched rows, matched cols)."""
    sim = cosine_matrix(gen, other)
    rows, cols = match_faces(sim)
    matched = sim[rows, cols]
    out[f"Sim{name}"] = float(matched.mean())
    out[f"Sim{name}_faces"] = matched.tolist()
    out[f"match_{name.lower()}"] = [[int(r), int(c)] for r, c in zip(rows, cols)]
    return sim, rows, cols


def face_metrics(gen_emb, gt_emb, ref_emb) -> dict[str, Any]:
    """Identity metrics of one case from the face embeddings of its three images.

    Args:
        gen_emb: (n_gen, D) embeddings of the faces found in the generated image.
        gt_emb: (n_gt, D) embeddings of the faces in the ground-truth image.
        ref_emb: (n_ref, D) embeddings, one per reference image whose face was found.
        Each may be numpy or torch; ``None`` or an empty array means no face was found.

    Returns:
        dict with
        - ``SimGT``: mean matched cos(gen, GT) over min(n_gen, n_gt) Hungarian pairs; None without faces.
        - ``SimRef``: likewise against the references (counts may differ, as released).
        - ``CP``: mean copy-paste over the faces, None unless n_gen == n_gt == n_ref > 0 (released rule).
          Each generated face is paired with its Hungarian GT match and its Hungarian reference match.
        - ``blending``: mean of the generated x GT cosines left unmatched by the assignment (how much a
          face resembles the other people); None when no entry is unmatched (e.g. one face each).
        - ``SimGT_faces``, ``SimRef_faces``, ``CP_faces``: the per-face values behind the means (lists).
        - ``match_gt``, ``match_ref``: matched pairs as lists of [gen index, other index].
        - ``n_gen``, ``n_gt``, ``n_ref``: face counts.
        - ``missing_faces``: max(0, max(n_gt, n_ref) - n_gen), the faces the generation lacks. A case
          with no generated face gets None for every metric and never raises.

    Example:
        >>> import numpy as np
        >>> m = face_metrics(np.eye(2), np.eye(2), np.eye(2))
        >>> m["SimGT"], m["CP"], m["blending"], m["missing_faces"]
        (1.0, 0.0, 0.0, 0)
    """
    gen = _embeddings(gen_emb, "gen_emb")
    gt = _embeddings(gt_emb, "gt_emb")
    ref = _embeddings(ref_emb, "ref_emb")
    dims = {name: a.shape[1] for name, a in (("gen_emb", gen), ("gt_emb", gt), ("ref_emb", ref)) if a.shape[0]}
    if len(set(dims.values())) > 1:
        raise ValueError(f"gt_emb / ref_emb / gen_emb embedding sizes differ: {dims}; embed all three with "
                         f"the same face model")
    n_gen, n_gt, n_ref = gen.shape[0], gt.shape[0], ref.shape[0]
    out: dict[str, Any] = {
        "SimGT": None, "SimRef": None, "CP": None, "blending": None,
        "SimGT_faces": None, "SimRef_faces": None, "CP_faces": None,
        "match_gt": [], "match_ref": [],
        "n_gen": n_gen, "n_gt": n_gt, "n_ref": n_ref,
        "missing_faces": max(0, max(n_gt, n_ref) - n_gen),
    }
    gt_rows = gt_cols = ref_rows = ref_cols = None
    if n_gen and n_gt:
        sim, gt_rows, gt_cols = _match_into(out, "GT", gen, gt)
        unmatched = np.ones(sim.shape, dtype=bool)
        unmatched[gt_rows, gt_cols] = False
        if unmatched.any():
            out["blending"] = float(sim[unmatched].mean())
    if n_gen and n_ref:
        _, ref_rows, ref_cols = _match_into(out, "Ref", gen, ref)
    if n_gen and n_gen == n_gt == n_ref:
        # Square matrices: the assignments cover every generated face, rows in ascending order.
        cp = copy_paste_score(gen, gt[gt_cols], ref[ref_cols])
        out["CP"] = float(cp.mean())
        out["CP_faces"] = cp.tolist()
    return out


def _finite_floats(values, name: str) -> tuple[np.ndarray, int]:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    elif isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be an iterable of numbers (None / NaN allowed), got {type(values).__name__}")
    kept, dropped = [], 0
    for v in values:
        if v is None:
            dropped += 1
            continue
        try:
            f = float(v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} holds {v!r}, which is not a number") from exc
        if math.isfinite(f):
            kept.append(f)
        else:
            dropped += 1
    return np.asarray(kept, dtype=np.float64), dropped


def summarize(values, iqr: float | None = 1.5) -> dict[str, Any]:
    """Mean, std, median and count of per-case values after IQR outlier removal (released behaviour).

    Steps (as ``_compute_statistics`` in the released ``MultiID-Bench/eval.py``):
    1. None, NaN and +-inf are dropped first (a case whose metric is undefined) and counted in ``dropped``.
    2. q1, q3 = 25th / 75th percentiles (numpy linear interpolation); values outside
       [q1 - iqr * (q3 - q1), q3 + iqr * (q3 - q1)] (inclusive bounds) are outliers.
    3. If fewer than half of the values survive, the released fallback applies (``fallback`` True):
       mean = median of all values, std = q3 - q1, min / max = 5th / 95th percentiles, no value removed,
       count = all values. Otherwise the statistics (population std, ddof 0) are those of the survivors.
    ``iqr=None`` disables outlier removal.

    Returns:
        dict: ``mean``, ``std``, ``median``, ``count`` (values the statistics describe), ``min``, ``max``,
        ``q1``, ``q3``, ``outliers_removed``, ``dropped``, ``fallback``. With no finite value left every
        statistic is None and count is 0.

    Example:
        >>> s = summarize([1.0, 2.0, 3.0, 4.0, 100.0, None])
        >>> s["mean"], s["count"], s["outliers_removed"], s["dropped"]
        (2.5, 4, 1, 1)
    """
    if iqr is not None and not (isinstance(iqr, (int, float)) and math.isfinite(iqr) and iqr >= 0):
        raise ValueError(f"iqr must be a finite number >= 0 (or None to keep every value), got {iqr!r}")
    arr, dropped = _finite_floats(values, "values")
    out: dict[str, Any] = {"mean": None, "std": None, "median": None, "count": 0, "min": None, "max": None,
                           "q1": None, "q3": None, "outliers_removed": 0, "dropped": dropped, "fallback": False}
    if arr.size == 0:
        return out
    q1, q3 = (float(q) for q in np.percentile(arr, [25, 75]))
    kept = arr
    if iqr is not None:
        spread = q3 - q1
        kept = arr[(arr >= q1 - iqr * spread) & (arr <= q3 + iqr * spread)]
        if kept.size < 0.5 * arr.size:
            p5, p95 = (float(q) for q in np.percentile(arr, [5, 95]))
            median = float(np.median(arr))
            out.update(mean=median, std=q3 - q1, median=median, count=int(arr.size), min=p5, max=p95,
                       q1=q1, q3=q3, fallback=True)
            return out
    out.update(mean=float(np.mean(kept)), std=float(np.std(kept)), median=float(np.median(kept)),
               count=int(kept.size), min=float(np.min(kept)), max=float(np.max(kept)),
               q1=float(np.percentile(kept, 25)), q3=float(np.percentile(kept, 75)),
               outliers_removed=int(arr.size - kept.size))
    return out
