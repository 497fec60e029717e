"""The layout page's rules without a browser: page state -> pipeline arguments, validation, sidecar."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from idflux.engine.faces import BaseFaceDetector, tiny_face_models
from idflux.serve import layout
from idflux.serve.app import LayoutServer


def _ann(*boxes):
    """The annotator's value after ``boxes`` are drawn by mouse in this order: newest first, unlabelled."""
    return {"image": None, "boxes": [{"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3], "label": "",
                                      "color": (255, 64, 64)} for b in reversed(boxes)]}


def _page(**kw):
    base = dict(prompt="two people", n_refs=2, boxes=[], height=96, width=128, steps=2, guidance=4.0, seed=7,
                id_weight=1.0, siglip_weight=0.5)
    return layout.page_settings(**{**base, **kw})


def test_no_boxes_means_every_reference_on_the_whole_image():
    s = _page()
    assert s["boxes"] is None
    assert (s["height"], s["width"], s["num_inference_steps"], s["seed"]) == (96, 128, 2, 7)
    assert s["guidance_scale"] == 4.0 and s["siglip_weight"] == 0.5


def test_boxes_in_drawing_order_become_the_pipeline_boxes():
    boxes = layout.boxes_from_annotation(_ann((8, 16, 56, 88), (72, 8, 120, 80)))
    assert boxes == [[8, 16, 56, 88], [72, 8, 120, 80]]
    assert _page(boxes=boxes)["boxes"] == [[8.0, 16.0, 56.0, 88.0], [72.0, 8.0, 120.0, 80.0]]


def test_drawn_box_after_table_boxes_comes_last():
    # two boxes set from the numbers table (labelled), then a third drawn by mouse (put first, unlabelled)
    value = layout.annotation_value(layout.canvas_image(96, 128), [[0, 0, 32, 32], [40, 0, 80, 40]])
    value["boxes"].reverse()
    value["boxes"].insert(0, {"xmin": 90, "ymin": 50, "xmax": 120, "ymax": 90, "label": "", "color": (0, 0, 0)})
    assert layout.boxes_from_annotation(value) == [[0, 0, 32, 32], [40, 0, 80, 40], [90, 50, 120, 90]]


@pytest.mark.parametrize("n_refs, boxes, match", [
    (1, [[0, 0, 32, 32], [40, 0, 80, 40]], "2 boxes drawn for 1 reference"),
    (2, [[0, 0, 32, 32]], "1 box\\(es\\) drawn for 2 references"),
    (1, [[100, 0, 140, 40]], "outside the 128x96 canvas"),
    (1, [[0, -8, 40, 40]], "outside"),
    (1, [[10, 10, 12, 40]], "smaller than 4 pixels"),
    (1, [[0, 0, float("nan"), 40]], "finite"),
    (0, [], "upload at least one reference"),
    (5, [], "at most 4"),
])
def test_bad_layouts_name_the_problem(n_refs, boxes, match):
    with pytest.raises(ValueError, match=match):
        layout.check_layout(n_refs, boxes, 96, 128)


@pytest.mark.parametrize("field, value, match", [
    ("prompt", "  ", "prompt"), ("height", 100, "height: must be a multiple of 16"), ("width", 0, "width"),
    ("width", 12.5, "width"), ("steps", 0, "steps"), ("steps", 1.5, "steps"), ("seed", -1, "seed"),
    ("guidance", float("inf"), "guidance"), ("id_weight", None, "id_weight"),
])
def test_bad_fields_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        _page(**{field: value})


def test_table_round_trip_and_annotation_colours():
    boxes = [[8, 16, 56, 88], [72, 8, 120, 80]]
    rows = layout.box_rows(boxes)
    assert rows[0] == ["person 1 (red)", 8, 16, 56, 88]
    assert layout.boxes_from_table(rows + [[None, None, None, None, None]]) == boxes
    with pytest.raises(ValueError, match="box 1"):
        layout.boxes_from_table([["p", "a", 1, 2, 3]])
    value = layout.annotation_value(layout.canvas_image(96, 128), boxes)
    assert value["image"].shape == (96, 128, 3)
    assert [b["color"] for b in value["boxes"]] == [layout.COLOURS[0], layout.COLOURS[1]]
    assert layout.boxes_from_annotation(value) == boxes


def test_canvas_has_the_token_grid():
    c = layout.canvas_image(32, 48)
    assert c.shape == (32, 48, 3) and c[0, 5, 0] == 205 and c[5, 16, 0] == 205 and c[5, 5, 0] == 236


def test_generate_command_reproduces_the_settings():
    s = _page(boxes=[[8, 16, 56, 88], [72, 8, 120, 80]])
    argv = shlex.split(layout.generate_command(s, ["a.png", "b c.png"], "tiny", "o.png"))
    from idflux.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.ref == ["a.png", "b c.png"] and args.box == s["boxes"]
    assert (args.height, args.width, args.steps, args.seed, args.guidance) == (96, 128, 2, 7, 4.0)
    assert (args.id_weight, args.siglip_weight, args.preset, args.prompt) == (1.0, 0.5, "tiny", "two people")


class _NoFace(BaseFaceDetector):
    def detect(self, image):
        return []


class _RecordingPipe:
    """Stands in for IDFluxPipeline in the handler tests: records the call, returns a blank image."""

    def __init__(self, detector):
        self.face_detector = detector
        self.calls = []
        self.source = {"source": "tiny"}

    def __call__(self, **kw):
        self.calls.append(kw)
        for i in range(kw["num_inference_steps"]):
            kw["callback_on_step_end"](self, i, 1000.0, {})
        img = Image.new("RGB", (kw["width"], kw["height"]), (90, 90, 90))
        return SimpleNamespace(images=[img], settings=[{"prompt": kw["prompt"], "boxes": kw["boxes"], "seed": 7,
                                                       "steps": kw["num_inference_steps"], "height": kw["height"],
                                                       "width": kw["width"]}])


@pytest.fixture
def refs(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"r{i}.png"
        Image.fromarray(np.full((64, 80, 3), 60 + 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    return paths, str(bad)


def test_handler_generates_writes_png_and_sidecar(tmp_path, refs):
    paths, _ = refs
    pipe = _RecordingPipe(tiny_face_models()[0])
    server = LayoutServer(pipe, preset="tiny", out_dir=tmp_path / "out")
    steps = []
    shown, files, meta = server.generate("two people", [paths[0], None, paths[1], None],
                                         _ann((8, 16, 56, 88), (72, 8, 120, 80)), 96, 128, 3, 4.0, 7, 1.0, 1.0,
                                         progress=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    call = pipe.calls[0]
    assert call["boxes"] == [[8, 16, 56, 88], [72, 8, 120, 80]] and len(call["ref_images"]) == 2
    assert shown.shape == (96, 128, 3)
    png, side = files
    assert Image.open(png).size == (128, 96)
    assert json.loads(open(side).read()) == meta and meta["refs"] == ["r0.png", "r1.png"]
    assert meta["boxes"] == call["boxes"] and "--box 8,16,56,88" in meta["command"]


@pytest.mark.parametrize("slot, match", [("bad", "not a readable image"), ("noface", "no face found")])
def test_handler_bad_reference_is_a_message_before_any_work(tmp_path, refs, slot, match):
    paths, bad = refs
    pipe = _RecordingPipe(_NoFace() if slot == "noface" else tiny_face_models()[0])
    server = LayoutServer(pipe, preset="tiny", out_dir=tmp_path / "out")
    ref = bad if slot == "bad" else paths[0]
    with pytest.raises(ValueError, match=match):
        server.describe_reference(ref, 0)
    with pytest.raises(ValueError, match=match):
        server.generate("a person", [ref, None, None, None], None, 64, 64, 2, 4.0, 0, 1.0, 1.0)
    assert pipe.calls == []


def test_handler_more_boxes_than_faces_is_refused_before_any_work(tmp_path, refs):
    paths, _ = refs
    pipe = _RecordingPipe(tiny_face_models()[0])
    server = LayoutServer(pipe, preset="tiny", out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="2 boxes drawn for 1 reference"):
        server.generate("a person", [paths[0], None, None, None], _ann((0, 0, 32, 32), (32, 0, 64, 32)),
                        64, 64, 2, 4.0, 0, 1.0, 1.0)
    assert pipe.calls == []


def test_describe_reference_outlines_the_face(refs):
    paths, _ = refs
    server = LayoutServer(_RecordingPipe(tiny_face_models()[0]), preset="tiny")
    image, note = server.describe_reference(paths[1], 1)
    assert image.shape == (64, 80, 3) and "person 2 (green): face at [8, 0, 72, 64]" == note
    assert tuple(image[32, 8]) == layout.COLOURS[1]
    assert server.describe_reference(None, 0) == (None, "")


def test_serve_cli_flags_and_flux_dev_message(capsys):
    from idflux.cli import main

    assert main(["serve", "--preset", "flux-dev", "--port", "7999"]) == 2
    err = capsys.readouterr().err
    assert "--flux" in err and "--preset tiny" in err
    with pytest.raises(SystemExit):
        main(["serve", "--port", "70000"])
