"""Bench reader: records JSON, embedded images, hf2bench folders, parquet (optional), cases round trip."""

import base64
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from idflux.eval import SUBSETS, cases_from_generated, find_generated, load_bench, load_rgb, write_cases
from idflux.eval.bench import _records_to_cases


def _png(path, colour=(200, 30, 30), size=(48, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour=(10, 200, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_records_json_with_relative_paths_and_subset_aliases(tmp_path):
    _png(tmp_path / "img" / "a_gt.jpg")
    _png(tmp_path / "img" / "a_1.jpg")
    _png(tmp_path / "img" / "b_gt.jpg")
    _png(tmp_path / "img" / "b_1.jpg")
    _png(tmp_path / "img" / "b_2.jpg")
    records = [
        {"ID": 7, "GT": "img/a_gt.jpg", "input_images": ["img/a_1.jpg"], "prompt": "a man", "bboxes": [[1, 2, 11, 12]],
         "subset": "v200_single", "num_persons": 1, "task_type": "t2i"},
        {"ID": "b", "GT": "img/b_gt.jpg", "input_images": ["img/b_1.jpg", "img/b_2.jpg"], "prompt": "two",
         "bboxes": "[[0, 0, 10, 10], [20, 0, 30, 10]]"},  # no subset: from the person count
    ]
    (tmp_path / "bench.json").write_text(json.dumps(records))
    for source in (tmp_path / "bench.json", tmp_path):  # the file, or a folder holding it
        cases = load_bench(source)
        assert [c["id"] for c in cases] == ["7", "b"]
        assert [c["subset"] for c in cases] == ["p1", "p2"]
        assert cases[0]["gt"] == str((tmp_path / "img" / "a_gt.jpg").resolve())
        assert cases[1]["bboxes"] == [[0, 0, 10, 10], [20, 0, 30, 10]]
        assert cases[0]["task_type"] == "t2i" and cases[1]["num_persons"] == 2


def test_embedded_images_are_extracted(tmp_path):
    rows = [{"ID": "x/1", "GT": {"bytes": _png_bytes(), "path": "gt.png"}, "input_images": [_png_bytes((0, 0, 255))],
             "prompt": "p", "bboxes": None, "subset": "p3", "num_persons": 3}]
    cases = _records_to_cases(rows, tmp_path, tmp_path / "files")
    assert cases[0]["subset"] == "p3" and cases[0]["bboxes"] is None
    assert load_rgb(cases[0]["gt"])[0, 0].tolist() == [10, 200, 10]
    assert load_rgb(cases[0]["refs"][0])[0, 0].tolist() == [0, 0, 255]
    assert "x_1" in cases[0]["gt"], "the case id is made safe for a folder name"
    # base64 strings (the released parquet2bench format) through a JSON bench.
    record = dict(rows[0], GT=base64.b64encode(_png_bytes()).decode(), input_images=[base64.b64encode(_png_bytes()).decode()])
    (tmp_path / "b64.json").write_text(json.dumps([record]))
    assert load_rgb(load_bench(tmp_path / "b64.json", extract_dir=tmp_path / "x")[0]["gt"]).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="extract_dir"):
        _records_to_cases(rows, tmp_path, None)


def test_hf2bench_folder_layout(tmp_path):
    single = tmp_path / "v200_single" / "untar"
    _png(single / "0001.jpg")
    _png(single / "0001_1.jpg")
    (single / "0001.json").write_text(json.dumps({"caption_en": "one", "bboxes": [[1, 1, 9, 9]]}))
    multi = tmp_path / "v200_m"
    _png(multi / "num_3" / "0002.jpg")
    for k in (1, 2, 3):
        _png(multi / "refs" / f"person_{k}" / f"0002_{k}.jpg")
    (tmp_path / "v200_single.json").write_text(json.dumps(
        [{"prompt": "one", "image_paths": ["0001_1.jpg"], "ori_img_path": "0001.jpg"}]))
    (tmp_path / "v200_m.json").write_text(json.dumps(
        [{"prompt": "three", "image_paths": [f"refs/person_{k}/0002_{k}.jpg" for k in (1, 2, 3)],
          "ori_img_path": "num_3/0002.jpg", "name": ["person_1", "person_2", "person_3"]}]))
    cases = load_bench(tmp_path)
    assert [(c["id"], c["subset"], c["num_persons"]) for c in cases] == [("0001", "p1", 1), ("num_3_0002", "p3", 3)]
    assert cases[0]["bboxes"] == [[1, 1, 9, 9]] and cases[1]["bboxes"] is None


def test_parquet_without_pyarrow_or_pandas_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "bench.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pyarrow"):
        load_bench(tmp_path / "bench.parquet", extract_dir=tmp_path / "files")


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "ID": ["0", "1"], "prompt": ["a", "b"], "subset": ["p1", "p2"], "num_persons": [1, 2],
        "bboxes": ["[[0, 0, 8, 8]]", "[[0, 0, 8, 8], [8, 0, 16, 8]]"],
        "GT": pa.array([{"bytes": _png_bytes(), "path": "g.png"}] * 2, type=image),
        "input_images": pa.array([[{"bytes": _png_bytes(), "path": None}],
                                  [{"bytes": _png_bytes(), "path": None}] * 2], type=pa.list_(image)),
    })
    pq.write_table(table, tmp_path / "test-00000.parquet")
    cases = load_bench(tmp_path, extract_dir=tmp_path / "files")
    assert [len(c["refs"]) for c in cases] == [1, 2] and all(load_rgb(c["gt"]).shape == (16, 16, 3) for c in cases)


def test_write_cases_round_trips_and_normalises_boxes(tmp_path):
    _png(tmp_path / "g.png", size=(200, 100))
    _png(tmp_path / "r.png")
    cases = [{"id": "c1", "subset": "p1", "num_persons": 1, "prompt": "hi", "gt": str(tmp_path / "g.png"),
              "refs": [str(tmp_path / "r.png")], "bboxes": [[20.0, 10.0, 60.0, 50.0]]}]
    path = write_cases(cases, tmp_path / "out" / "cases.json")
    entry = json.loads(path.read_text())[0]
    assert entry["boxes"] == [[0.1, 0.1, 0.3, 0.5]] and entry["gt_size"] == [200, 100]
    assert entry["out"] == "c1/out.png"
    back = load_bench(path)
    assert back[0] == {k: v for k, v in cases[0].items()}


def test_find_generated_and_released_generated_layout(tmp_path):
    _png(tmp_path / "gen" / "c1" / "out.png")
    _png(tmp_path / "gen" / "c2.jpg")
    assert find_generated(tmp_path / "gen", "c1").name == "out.png"
    assert find_generated(tmp_path / "gen", "c2").name == "c2.jpg"
    assert find_generated(tmp_path / "gen", "c3") is None
    run = tmp_path / "released" / "0001"
    for name in ("out.jpg", "ori.jpg", "ref_0.jpg", "ref_1.jpg"):
        _png(run / name)
    (run / "meta.json").write_text(json.dumps({"prompt": "two people"}))
    (cases,) = cases_from_generated(tmp_path / "released")
    assert cases["subset"] == "p2" and cases["prompt"] == "two people" and cases["refs"][0].endswith("ref_0.jpg")
    with pytest.raises(ValueError, match="generated"):
        cases_from_generated(tmp_path / "gen")


def test_bad_bench_input_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench"):
        load_bench(tmp_path / "nope")
    with pytest.raises(ValueError, match="bench"):
        load_bench(tmp_path)  # an empty folder
    _png(tmp_path / "g.png")
    bad = [
        ([{"ID": 1, "GT": "g.png", "input_images": [], "prompt": ""}], ValueError, "input_images"),
        ([{"ID": 1, "GT": "g.png", "input_images": ["g.png"], "bboxes": [[5, 5, 1, 1]]}], ValueError, "bboxes"),
        ([{"ID": 1, "GT": "missing.png", "input_images": ["g.png"]}], FileNotFoundError, "missing.png"),
        ([{"ID": 1, "GT": "g.png", "input_images": ["g.png"], "subset": "p1"}] * 2, ValueError, "ID"),
    ]
    for k, (records, exc, match) in enumerate(bad):
        (tmp_path / f"bad{k}.json").write_text(json.dumps(records))
        with pytest.raises(exc, match=match):
            load_bench(tmp_path / f"bad{k}.json")


def test_duplicate_ids_across_subsets_get_a_subset_prefix(tmp_path):
    _png(tmp_path / "g.png")
    records = [{"ID": 1, "GT": "g.png", "input_images": ["g.png"], "subset": s} for s in SUBSETS]
    (tmp_path / "dup.json").write_text(json.dumps(records))
    assert [c["id"] for c in load_bench(tmp_path / "dup.json")] == ["p1_1", "p2_1", "p3_1"]
    assert np.array_equal(load_rgb(tmp_path / "g.png")[0, 0], [200, 30, 30])
