"""``idflux generate``: outputs (image, <name>.json sidecar, boxes preview), sizes, batch mode, and every
bad input as a one-line error with exit status 2 before a model is built."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

import idflux.engine.cli as gen_cli  # noqa: E402
from idflux.cli import main  # noqa: E402

#: The random tiny models (not the shipped world): fast and independent of the assets.
TINY = ["generate", "--preset", "tiny", "--flux", "random", "--device", "cpu", "--steps", "1"]


@pytest.fixture
def refs(tmp_path):
    paths = []
    for i, colour in enumerate([(200, 120, 90), (60, 90, 200)]):
        img = np.zeros((96, 80, 3), np.uint8)
        img[20:76, 16:64] = colour
        path = tmp_path / f"ref{i}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if the command gets as far as building a model."""
    def build(args):
        raise AssertionError("the model was built before the bad input was reported")

    monkeypatch.setattr(gen_cli, "build", build)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_generate_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--box" in out and "--height" in out and "o.png.json" in out
    assert "(default: 25)" in out and "(default: 4.0)" in out and "(default: flux-dev)" in out


def test_generate_tiny_writes_image_sidecar_and_preview(tmp_path, refs):
    out = tmp_path / "a" / "img.png"
    argv = TINY + ["--prompt", "two people", "--ref", refs[0], "--ref", refs[1], "--box", "0,0,16,32", "--box", "16,0,32,32",
                   "--size", "32", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    first = np.asarray(Image.open(out))
    meta = json.loads((tmp_path / "a" / "img.png.json").read_text())
    assert first.shape == (32, 32, 3) and meta["seed"] == 3 and meta["refs"] == refs and meta["preset"] == "tiny"
    assert meta["boxes"] == [[0, 0, 16, 32], [16, 0, 32, 32]] and meta["height"] == meta["width"] == 32
    assert meta["peak_memory"]["kind"] == "rss_high_water" and meta["peak_memory"]["bytes"] > 0, "peak memory reported"
    preview = np.asarray(Image.open(tmp_path / "a" / "img.boxes.png"))
    assert preview.shape == first.shape and not np.array_equal(preview, first), "boxes and prompt are drawn"
    assert main(argv) == 0
    assert np.array_equal(first, np.asarray(Image.open(out))), "same seed, same image"


def test_generate_non_square_without_boxes(tmp_path, refs):
    out = tmp_path / "o.jpg"
    assert main(TINY + ["--prompt", "a person", "--ref", refs[0], "--height", "32", "--width", "48", "--out", str(out)]) == 0
    assert Image.open(out).size == (48, 32)
    meta = json.loads((tmp_path / "o.jpg.json").read_text())
    assert meta["boxes"] is None and (meta["height"], meta["width"]) == (32, 48), "no --box: the whole image"
    assert not (tmp_path / "o.json").exists(), "o.png and o.jpg must not share a sidecar"


def test_generate_batch_mode(tmp_path, refs):
    cases = [{"id": "c1", "prompt": "a person", "refs": [refs[0]], "boxes": [[0.1, 0.1, 0.6, 0.9]], "out": "c1/out.png"},
             {"id": "c2", "prompt": "two", "refs": refs, "boxes": None, "out": "c2/out.png"}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    assert main(TINY + ["--batch", str(tmp_path / "cases.json"), "--out", str(tmp_path / "gen"), "--size", "32"]) == 0
    assert (tmp_path / "gen" / "c1" / "out.png").is_file() and (tmp_path / "gen" / "c2" / "out.png.json").is_file()


def test_batch_keeps_outputs_inside_out_and_goes_on_after_a_bad_case(tmp_path, refs, capsys):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    cases = [{"id": "escape", "prompt": "x", "refs": [refs[0]], "out": "../victim.png"},
             {"id": "absolute", "prompt": "x", "refs": [refs[0]], "out": str(tmp_path / "abs.png")},
             {"id": "../../up", "prompt": "x", "refs": [refs[0]]},
             {"id": "noref", "prompt": "x", "refs": [str(tmp_path / "missing.png")]},
             {"id": "good", "prompt": "x", "refs": [refs[0]]}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    gen = tmp_path / "gen"
    assert main(TINY + ["--batch", str(tmp_path / "cases.json"), "--out", str(gen), "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "abs.png").exists()
    assert not (tmp_path.parent / "up").exists()
    assert (gen / "good" / "out.png").is_file(), "the good case still runs"
    for name in ("escape", "absolute", "../../up", "noref"):
        assert f"case {name}:" in err
    assert "4 of 5 cases failed" in err


@pytest.mark.parametrize("extra, needle", [
    (["--guidance", "nan"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--id-weight", "nan"], "--id-weight"),
    (["--siglip-weight", "-inf"], "--siglip-weight"),
    (["--box", "0,0,inf,inf"], "finite"),
    (["--box", "0,0,nan,1"], "finite"),
    (["--size", "60"], "multiple of 16"),
    (["--height", "0"], "--height"),
    (["--device", "bogus"], "unknown device"),
    (["--device", "tpu"], "device"),
])
def test_bad_numbers_and_devices_fail_at_parse_time(tmp_path, refs, capsys, never_built, extra, needle):
    argv = ["generate", "--preset", "tiny", "--prompt", "x", "--ref", refs[0], "--out", str(tmp_path / "o.png")] + extra
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "o.png").exists()


def test_cuda_device_without_cuda_is_a_parse_error(tmp_path, refs, capsys, never_built):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--preset", "tiny", "--prompt", "x", "--ref", refs[0], "--out", str(tmp_path / "o.png"),
              "--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA device" in one_line_error(capsys)


def test_bad_files_and_outputs_fail_before_the_model_is_built(tmp_path, refs, capsys, never_built):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    (tmp_path / "folder.png").mkdir()
    base = ["generate", "--preset", "tiny", "--prompt", "x"]
    good_out = ["--out", str(tmp_path / "o.png")]
    cases = [
        (["--ref", str(text)] + good_out, "not a readable image"),
        (["--ref", str(fake)] + good_out, "not a readable image"),
        (["--ref", str(truncated)] + good_out, "not a readable image"),
        (["--ref", str(tmp_path / "nope.png")] + good_out, "not found"),
        (["--ref", refs[0], "--out", str(tmp_path)], "is a folder"),
        (["--ref", refs[0], "--out", str(tmp_path / "folder.png")], "is a folder"),
        (["--ref", refs[0], "--out", str(tmp_path / "noext")], "not an image format"),
        (["--ref", refs[0], "--out", str(tmp_path / "o.txt")], "not an image format"),
        (["--ref", refs[0], "--out", str(text / "o.png")], "not a folder"),
        (["--ref", refs[0], "--box", "0,0,8,8", "--box", "8,8,16,16"] + good_out, "one box per reference"),
        (["--ref", refs[0], "--box", "70,70,90,90", "--size", "64"] + good_out, "outside"),
        (["--ref", refs[0], "--box", "9,0,3,8"] + good_out, "empty"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = one_line_error(capsys)
        assert err.startswith("idflux generate: ") and needle in err, (extra, err)


def test_flux_dev_names_every_missing_part_and_the_tiny_preset(tmp_path, refs, capsys, never_built):
    assert main(["generate", "--prompt", "x", "--ref", refs[0], "--out", str(tmp_path / "o.png")]) == 2
    err = one_line_error(capsys)
    assert all(f in err for f in ("--flux", "--adapter", "--face-models", "--siglip", "--preset tiny")), err
    assert main(["generate", "--prompt", "x", "--ref", refs[0], "--out", str(tmp_path / "o.png"),
                 "--flux", str(tmp_path / "nowhere"), "--siglip", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert "nowhere" in err and "--adapter FILE" in err and "--face-models DIR" in err and "--siglip DIR" not in err


def test_tiny_default_size_is_the_worlds_training_size():
    from idflux.cli import build_parser
    from idflux.engine.cli import _hw
    from idflux.engine.loading import TINY_WORLD, tiny_world_available

    parse = build_parser().parse_args
    world = parse(["generate", "--preset", "tiny", "--prompt", "x", "--ref", "a.png", "--out", "o.png"])
    random_models = parse(TINY + ["--prompt", "x", "--ref", "a.png", "--out", "o.png"])
    assert _hw(random_models) == (64, 64)
    size = json.loads((TINY_WORLD / "manifest.json").read_text())["world"]["size"] if tiny_world_available() else 64
    assert _hw(world) == (size, size)
    assert _hw(parse(["generate", "--preset", "tiny", "--prompt", "x", "--ref", "a.png", "--out", "o.png", "--width", "96"])) == (size, 96)
