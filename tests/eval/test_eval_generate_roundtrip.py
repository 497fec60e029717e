"""The bench -> `idflux generate --batch` -> `idflux eval` round trip on the CPU (tiny preset, fake face model)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from fake_faces import draw_faces  # noqa: E402
from idflux.cli import main  # noqa: E402

FAKE = Path(__file__).with_name("fake_faces.py")


def test_cases_written_by_eval_drive_generate_and_come_back(tmp_path, capsys):
    bench = tmp_path / "bench"
    records = []
    for cid, hues in {"a": [0.1], "b": [0.3, 0.7]}.items():
        gt, boxes = draw_faces(hues)
        bench.mkdir(exist_ok=True)
        Image.fromarray(gt).save(bench / f"{cid}_gt.png")
        refs = []
        for k, h in enumerate(hues):
            Image.fromarray(draw_faces([h], size=24)[0]).save(bench / f"{cid}_ref{k}.png")
            refs.append(f"{cid}_ref{k}.png")
        records.append({"ID": cid, "GT": f"{cid}_gt.png", "input_images": refs, "prompt": "people", "bboxes": boxes,
                        "subset": "p1" if len(hues) == 1 else "p2", "num_persons": len(hues)})
    (bench / "bench.json").write_text(json.dumps(records))

    cases = tmp_path / "cases.json"
    assert main(["eval", "--bench", str(bench / "bench.json"), "--write-cases", str(cases)]) == 0
    entries = json.loads(cases.read_text())
    assert [len(e["boxes"]) for e in entries] == [1, 2] and all(0 <= c <= 1 for e in entries for b in e["boxes"] for c in b)

    gen = tmp_path / "gen"
    assert main(["generate", "--preset", "tiny", "--batch", str(cases), "--out", str(gen), "--size", "64", "--steps", "1",
                 "--device", "cpu"]) == 0
    for e in entries:
        image = np.asarray(Image.open(gen / e["out"]))
        assert image.shape == (64, 64, 3)
        assert json.loads((gen / (e["out"] + ".json")).read_text())["case"] == e["id"]  # <image name>.json

    report = tmp_path / "report.json"
    assert main(["eval", "--bench", str(bench / "bench.json"), "--generated", str(gen), "--face-models",
                 f"{FAKE}:ColourSquareFaces", "--out", str(report)]) == 0
    doc = json.loads(report.read_text())
    summary = doc["runs"]["gen"]["summary"]
    assert summary["p1"]["cases"] == 1 and summary["p2"]["cases"] == 1
    assert summary["p1"].get("missing_images", 0) == 0, "every generated image must be found by eval"
