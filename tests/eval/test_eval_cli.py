"""End to end on the CPU: a tiny bench and two generated runs through the ``idflux eval`` CLI function."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fake_faces import ColourSquareFaces, draw_faces, hue_rgb
from idflux.eval import add_eval_parser, face_metrics, load_bench

FAKE = Path(__file__).with_name("fake_faces.py")

# case id -> (subset field as the bench spells it, GT hues, reference hues); references are the same
# people photographed differently: a hue a little off the GT's.
CASES = {
    "c1": ("p1", [0.00], [0.06]),
    "c2": ("v202", [0.30, 0.60], [0.36, 0.66]),
    "c3": ("p3", [0.10, 0.45, 0.80], [0.16, 0.51, 0.86]),
    "c4": ("p1", [0.20], [0.26]),
}


def _save(img: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return str(path)


def _parser():
    parser = argparse.ArgumentParser(prog="idflux")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv) -> int:
    args = _parser().parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture()
def bench(tmp_path):
    """bench.json + run A (GT faces, shuffled) and run B (reference faces), with awkward cases."""
    records = []
    for cid, (subset, gt_hues, ref_hues) in CASES.items():
        gt_img, boxes = draw_faces(gt_hues)
        refs = [_save(draw_faces([h], size=24)[0], tmp_path / "bench" / f"{cid}_ref{k}.png") for k, h in enumerate(ref_hues)]
        records.append({"ID": cid, "GT": f"{cid}_gt.png", "input_images": [Path(r).name for r in refs],
                        "prompt": f"{len(gt_hues)} people", "bboxes": boxes, "subset": subset,
                        "num_persons": len(gt_hues)})
        _save(gt_img, tmp_path / "bench" / f"{cid}_gt.png")
        # Run A reproduces the GT people (in reverse order); c4 comes out with no face at all.
        a_hues = gt_hues[::-1] if cid != "c4" else []
        _save(draw_faces(a_hues)[0] if a_hues else np.full((64, 64, 3), 128, np.uint8), tmp_path / "A" / cid / "out.png")
        # Run B pastes the references; it drops a person in c2 and never produced c4.
        if cid != "c4":
            _save(draw_faces(ref_hues[:1] if cid == "c2" else ref_hues)[0], tmp_path / "B" / f"{cid}.png")
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(records))
    return tmp_path


def test_eval_end_to_end_two_runs(bench, capsys):
    out = bench / "eval" / "report.json"
    rc = _run(["--bench", str(bench / "bench" / "bench.json"), "--generated", f"gtlike={bench / 'A'}",
               "--generated", str(bench / "B"), "--face-models", f"{FAKE}:ColourSquareFaces",
               "--face-models", f"{FAKE}:WideColourSquareFaces", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["face_models"] == ["fake-colour", "fake-colour-wide"] and report["clip"] is None
    assert report["subsets"] == ["p1", "p2", "p3"] and set(report["runs"]) == {"gtlike", "B"}
    a, b = report["runs"]["gtlike"]["summary"], report["runs"]["B"]["summary"]

    # Run A equals the GT: SimGT 1 and copy-paste -1 everywhere it is defined.
    for subset in ("p1", "p2", "p3"):
        assert a[subset]["metrics"]["SimGT"]["mean"] == pytest.approx(1.0, abs=1e-5), subset
        assert a[subset]["metrics"]["CP"]["mean"] == pytest.approx(-1.0, abs=1e-4), subset
        assert b[subset]["metrics"]["SimRef"]["mean"] == pytest.approx(1.0, abs=1e-5), subset
    # Run B copies the references: +1 where the counts agree; c2 lost a face, so it has no CP.
    assert b["p1"]["metrics"]["CP"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert b["p3"]["metrics"]["CP"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert b["p2"]["metrics"]["CP"]["count"] == 0 and b["p2"]["per_model"]["fake-colour"]["cp_undefined"] == 1
    assert b["p2"]["missing_faces"] == 1 and b["p2"]["evaluated"] == 1
    # Two face models pooled: each case counts once per model, as the released "average".
    assert a["p3"]["metrics"]["SimGT"]["count"] == 2 and a["p3"]["per_model"]["fake-colour"]["SimGT"]["count"] == 1
    # c4: A has an image without faces (counted, not crashed), B has no image.
    assert a["p1"]["no_face"] == 1 and a["p1"]["evaluated"] == 1 and a["p1"]["missing_faces"] == 1
    assert b["p1"]["missing_images"] == 1 and b["p1"]["cases"] == 2
    rows = {r["id"]: r for r in report["runs"]["B"]["cases"]}
    assert rows["c4"]["status"] == "missing_image" and rows["c2"]["faces"]["fake-colour"]["n_gen"] == 1

    # Per-case values equal face_metrics on the same embeddings.
    model = ColourSquareFaces()
    _, gt_hues, ref_hues = CASES["c2"]
    gen = np.stack([f.embedding for f in model.detect(np.asarray(Image.open(bench / "B" / "c2.png")))])
    colours = lambda hues: np.stack([model.embed_colour(hue_rgb(h)) for h in hues])  # noqa: E731
    expected = face_metrics(gen, colours(gt_hues), colours(ref_hues))
    got = rows["c2"]["faces"]["fake-colour"]
    for key in ("SimGT", "SimRef"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert got["CP"] is None and got["blending"] is not None
    assert b["p2"]["per_model"]["fake-colour"]["SimGT"]["mean"] == pytest.approx(expected["SimGT"], abs=1e-6)

    # The paper-style tables are printed and stored; the trade-off plot is drawn.
    assert "MultiID-Bench p2 (two persons)" in printed and "SimGT↑" in printed and "CLIP-T" not in printed
    assert "gtlike" in report["tables"]["p1"] and "-1.000" in report["tables"]["p3"]
    plot = out.with_name("report_tradeoff.png")
    assert plot.stat().st_size > 5000 and Image.open(plot).size[0] > 3 * 400


def test_eval_without_bench_reads_the_released_layout_and_write_cases(bench, tmp_path, capsys):
    released = tmp_path / "released" / "0001"
    gt_img, _ = draw_faces([0.3, 0.6])
    _save(gt_img, released / "ori.png")
    _save(draw_faces([0.36])[0], released / "ref_0.png")
    _save(draw_faces([0.66])[0], released / "ref_1.png")
    _save(draw_faces([0.36, 0.66])[0], released / "out.png")
    (released / "meta.json").write_text(json.dumps({"prompt": "two people"}))
    out = tmp_path / "r.json"
    assert _run(["--generated", str(tmp_path / "released"), "--face-models", f"{FAKE}:ColourSquareFaces",
                 "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    summary = json.loads(out.read_text())["runs"]["released"]["summary"]
    assert list(summary) == ["p2"] and summary["p2"]["metrics"]["CP"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "p.png").is_file()
    cases_json = tmp_path / "cases.json"
    assert _run(["--bench", str(bench / "bench"), "--write-cases", str(cases_json), "--subset", "p3"]) == 0
    (case,) = load_bench(cases_json)
    assert case["id"] == "c3" and len(case["refs"]) == 3
    assert json.loads(cases_json.read_text())[0]["boxes"][0] == pytest.approx([4 / 64, 26 / 64, 16 / 64, 38 / 64])


def test_eval_cli_errors_are_clear(bench, tmp_path, capsys):
    fake = f"{FAKE}:ColourSquareFaces"
    assert _run([]) == 2 and "--bench" in capsys.readouterr().err
    assert _run(["--bench", str(bench / "bench"), "--generated", str(bench / "A"), "--face-models", fake]) == 2
    assert "--out" in capsys.readouterr().err
    assert _run(["--bench", str(bench / "bench"), "--generated", str(bench / "A"), "--out", "x.json"]) == 2
    assert "--face-models" in capsys.readouterr().err
    assert _run(["--bench", str(tmp_path / "nope"), "--generated", str(bench / "A"), "--face-models", fake,
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "nope" in capsys.readouterr().err
    assert _run(["--bench", str(bench / "bench"), "--generated", str(bench / "A"), "--face-models",
                 str(tmp_path / "no_models"), "--out", str(tmp_path / "x.json")]) == 2
    assert "insightface/releases" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert _run(["--bench", str(bench / "bench"), "--generated", str(tmp_path / "empty_run"), "--face-models", fake,
                 "--out", str(tmp_path / "x.json")]) == 1
    assert "no generated image" in capsys.readouterr().err


def test_eval_help(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["eval", "--help"])
    assert exc.value.code == 0 and "--face-models" in capsys.readouterr().out


def test_evaluate_bad_input_names_the_argument(bench):
    from idflux.eval import evaluate

    cases = load_bench(bench / "bench")
    with pytest.raises(ValueError, match="cases"):
        evaluate([], {"A": bench / "A"}, [ColourSquareFaces()])
    with pytest.raises(ValueError, match="runs"):
        evaluate(cases, {}, [ColourSquareFaces()])
    with pytest.raises(ValueError, match="face_models"):
        evaluate(cases, {"A": bench / "A"}, [])
    with pytest.raises(ValueError, match="face_models"):
        evaluate(cases, {"A": bench / "A"}, ["buffalo_l"])
