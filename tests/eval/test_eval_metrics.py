"""Identity metrics on synthetic embeddings: copy-paste, Hungarian matching, face_metrics, summarize."""

import itertools
import math

import numpy as np
import pytest
import torch

from idflux.eval import copy_paste_score, face_metrics, match_faces, summarize


def _unit(angles_deg):
    """(n, 2) unit vectors at the given angles: cosines are known in closed form."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


# ---------------------------------------------------------------- copy-paste

@pytest.mark.parametrize("as_torch", [False, True])
def test_copy_paste_is_plus_one_for_a_copy_of_the_reference_and_minus_one_for_the_gt(as_torch):
    rng = np.random.default_rng(1)
    gt, ref = rng.standard_normal((5, 16)), rng.standard_normal((5, 16))
    if as_torch:
        gt, ref = torch.tensor(gt, dtype=torch.float32), torch.tensor(ref, dtype=torch.float32)
    copy = copy_paste_score(ref * 3.0, gt, ref)  # raw (unnormalised) embeddings
    faithful = copy_paste_score(gt, gt, ref)
    assert isinstance(copy, torch.Tensor) and copy.shape == (5,)
    assert copy.dtype == (torch.float32 if as_torch else torch.float64), "copy dtype"
    torch.testing.assert_close(copy, torch.ones_like(copy), msg="M_CP(gen == ref)")
    torch.testing.assert_close(faithful, -torch.ones_like(faithful), msg="M_CP(gen == gt)")


def test_copy_paste_matches_the_angle_formula_and_stays_in_range():
    rng = np.random.default_rng(2)
    gen, gt, ref = (rng.standard_normal((64, 8)) for _ in range(3))

    def theta(a, b):
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        return np.arccos(np.clip(cos, -1, 1))

    expected = (theta(gen, gt) - theta(gen, ref)) / np.maximum(theta(gt, ref), 1e-6)
    got = copy_paste_score(gen, gt, ref).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg="M_CP")
    assert np.all(np.abs(got) <= 1 + 1e-9), "M_CP outside [-1, 1]"
    # Half-way along the great circle from GT to reference: M_CP = 0.
    mid = copy_paste_score(_unit([45]), _unit([0]), _unit([90]))
    assert abs(float(mid)) < 1e-12


def test_copy_paste_eps_floors_the_gt_reference_angle():
    same = _unit([10.0])
    assert float(copy_paste_score(_unit([20.0]), same, same)) == 0.0  # GT == reference: nothing to tell apart
    # theta(gt, ref) = 0.5 deg < eps = 1 rad: the denominator is eps, not the angle.
    floored = copy_paste_score(_unit([0.0]), _unit([0.0]), _unit([0.5]), eps=1.0)
    assert float(floored) == pytest.approx(-math.radians(0.5), rel=1e-6)


@pytest.mark.parametrize("args, kwargs, name", [
    ((np.ones(4), np.ones((1, 4)), np.ones((1, 4))), {}, "gen"),
    ((np.ones((2, 4)), np.ones((3, 4)), np.ones((2, 4))), {}, "gt"),
    ((np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 5))), {}, "ref"),
    ((np.ones((2, 4)), np.full((2, 4), np.nan), np.ones((2, 4))), {}, "gt"),
    ((np.ones((2, 4)),) * 3, {"eps": 0.0}, "eps"),
])
def test_copy_paste_bad_input_names_the_argument(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        copy_paste_score(*args, **kwargs)


# ---------------------------------------------------------------- Hungarian matching

def _brute_force_best(sim):
    n, m = sim.shape
    if n <= m:
        return max(sum(sim[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return max(sum(sim[r, j] for j, r in enumerate(rows)) for rows in itertools.permutations(range(n), m))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 3), (4, 4), (2, 4), (4, 2), (3, 5), (5, 3), (1, 4)])
@pytest.mark.parametrize("as_torch", [False, True])
def test_match_faces_equals_brute_force(shape, as_torch):
    rng = np.random.default_rng(hash(shape) % 2**32)
    for _ in range(5):
        sim = rng.uniform(-1, 1, size=shape)
        rows, cols = match_faces(torch.tensor(sim) if as_torch else sim)
        assert isinstance(rows, np.ndarray) and rows.dtype.kind == "i" and cols.dtype.kind == "i"
        assert len(rows) == len(cols) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols), "one-to-one"
        assert sim[rows, cols].sum() == pytest.approx(_brute_force_best(sim), abs=1e-12), f"total for {shape}"


def test_match_faces_empty_and_bad_input():
    rows, cols = match_faces(np.zeros((0, 3)))
    assert rows.shape == cols.shape == (0,)
    with pytest.raises(ValueError, match="sim"):
        match_faces(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="sim"):
        match_faces(np.array([[0.1, np.nan], [0.2, 0.3]]))


# ---------------------------------------------------------------- face_metrics

def test_face_metrics_known_values_with_shuffled_faces():
    gt = _unit([0, 90])
    ref = _unit([30, 120])
    gen = _unit([90, 0])  # the GT faces, in the other order
    m = face_metrics(gen, gt, ref)
    assert m["SimGT"] == pytest.approx(1.0)
    assert m["SimRef"] == pytest.approx(math.cos(math.radians(30)))
    assert m["blending"] == pytest.approx(0.0, abs=1e-12)  # cos(0 deg face, 90 deg face)
    assert m["CP"] == pytest.approx(-1.0), "each generated face must be paired with its own GT and reference"
    assert m["CP_faces"] == pytest.approx([-1.0, -1.0])
    assert m["match_gt"] == [[0, 1], [1, 0]]
    assert (m["n_gen"], m["n_gt"], m["n_ref"], m["missing_faces"]) == (2, 2, 2, 0)
    copy = face_metrics(_unit([120, 30]), gt, ref)
    assert copy["CP"] == pytest.approx(1.0) and copy["SimRef"] == pytest.approx(1.0)


def test_face_metrics_blending_is_the_mean_of_unmatched_entries():
    gen, gt = _unit([0, 60]), _unit([10, 50])
    m = face_metrics(gen, gt, gt)
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    assert m["SimGT"] == pytest.approx((cos(10) + cos(10)) / 2)
    assert m["blending"] == pytest.approx((cos(50) + cos(50)) / 2)
    single = face_metrics(_unit([0]), _unit([5]), _unit([9]))
    assert single["blending"] is None  # no unmatched entry in a 1 x 1 matrix


def test_face_metrics_unequal_counts_give_no_cp_as_released():
    gt, ref = _unit([0, 90, 180]), _unit([5, 95, 185])
    m = face_metrics(_unit([0, 90]), gt, ref)
    assert m["CP"] is None and m["CP_faces"] is None
    assert m["SimGT"] == pytest.approx(1.0) and m["SimRef"] == pytest.approx(math.cos(math.radians(5)))
    assert m["missing_faces"] == 1
    extra = face_metrics(_unit([0, 90, 180, 270]), gt, ref)
    assert extra["CP"] is None and extra["missing_faces"] == 0
    assert extra["blending"] is not None
    # A reference whose face was not found also makes the counts disagree.
    assert face_metrics(_unit([0, 90, 180]), gt, ref[:2])["CP"] is None


@pytest.mark.parametrize("empty", [None, np.zeros((0, 2)), torch.zeros(0, 2), []])
def test_face_metrics_missing_faces_are_counted_not_crashed(empty):
    gt, ref = _unit([0, 90]), _unit([10, 100])
    none = face_metrics(empty, gt, ref)
    assert all(none[k] is None for k in ("SimGT", "SimRef", "CP", "blending"))
    assert none["n_gen"] == 0 and none["missing_faces"] == 2
    no_gt = face_metrics(_unit([0]), empty, ref)
    assert no_gt["SimGT"] is None and no_gt["SimRef"] == pytest.approx(math.cos(math.radians(10)))
    assert no_gt["CP"] is None and no_gt["missing_faces"] == 1
    assert face_metrics(empty, empty, empty)["missing_faces"] == 0


@pytest.mark.parametrize("args, name", [
    ((np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 3))), "ref_emb"),
    ((np.ones(4), np.ones((2, 4)), np.ones((2, 4))), "gen_emb"),
    ((np.ones((2, 4)), np.full((2, 4), np.inf), np.ones((2, 4))), "gt_emb"),
    ((np.ones((2, 4)), "faces", np.ones((2, 4))), "gt_emb"),
])
def test_face_metrics_bad_input_names_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        face_metrics(*args)


# ---------------------------------------------------------------- summarize

def test_summarize_removes_iqr_outliers():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    # q1 = 2, q3 = 4 -> bounds [-1, 7]: 100 goes.
    assert s["outliers_removed"] == 1 and s["count"] == 4 and not s["fallback"]
    assert s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4]))  # population std, as released
    assert (s["min"], s["max"]) == (1.0, 4.0)
    kept_all = summarize([1.0, 2.0, 3.0, 4.0, 100.0], iqr=None)
    assert kept_all["count"] == 5 and kept_all["mean"] == pytest.approx(22.0)
    wide = summarize([1.0, 2.0, 3.0, 4.0, 100.0], iqr=100.0)
    assert wide["outliers_removed"] == 0


def test_summarize_bounds_are_inclusive():
    # q1 = 1, q3 = 2 (iqr 1) -> bounds [-0.5, 3.5] at iqr 1.5: 3.5 stays, 3.6 goes.
    assert summarize([1, 1, 1, 2, 2, 2, 3.5])["outliers_removed"] == 0
    assert summarize([1, 1, 1, 2, 2, 2, 3.6])["outliers_removed"] == 1


def test_summarize_falls_back_to_median_statistics_when_more_than_half_would_go():
    s = summarize([0.0, 1.0], iqr=0.0)  # q1 = 0.25, q3 = 0.75: both values fall outside
    assert s["fallback"] is True
    assert s["mean"] == s["median"] == pytest.approx(0.5)
    assert s["std"] == pytest.approx(0.5)  # q3 - q1 stands in for the std
    assert (s["min"], s["max"]) == pytest.approx((0.05, 0.95))  # 5th / 95th percentiles
    assert s["count"] == 2 and s["outliers_removed"] == 0
    # Exactly half surviving is not "more than half removed".
    assert summarize([0.0, 1.0, 2.0, 3.0], iqr=0.0)["fallback"] is False


def test_summarize_drops_none_and_nan_and_handles_empty_input():
    s = summarize([0.5, None, float("nan"), 0.7, float("inf")])
    assert s["count"] == 2 and s["dropped"] == 3 and s["mean"] == pytest.approx(0.6)
    assert summarize(torch.tensor([0.5, float("nan"), 0.7]))["mean"] == pytest.approx(0.6)
    assert summarize(np.array([0.5, 0.7]))["count"] == 2
    empty = summarize([None, float("nan")])
    assert empty["count"] == 0 and empty["mean"] is None and empty["std"] is None and empty["dropped"] == 2
    assert summarize([])["count"] == 0


@pytest.mark.parametrize("values, kwargs, name", [
    ([1.0], {"iqr": -1.0}, "iqr"),
    ([1.0], {"iqr": float("nan")}, "iqr"),
    (["a"], {}, "values"),
    (3.0, {}, "values"),
])
def test_summarize_bad_input_names_the_argument(values, kwargs, name):
    with pytest.raises(ValueError, match=name):
        summarize(values, **kwargs)
