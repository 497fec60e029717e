import json

import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from idflux.cli import main  # noqa: E402


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


def test_generate_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0 and "--box" in capsys.readouterr().out


def test_generate_tiny_writes_image_and_settings(tmp_path, refs):
    out = tmp_path / "a" / "img.png"
    argv = ["generate", "--preset", "tiny", "--prompt", "two people", "--ref", refs[0], "--ref", refs[1],
            "--box", "0,0,32,64", "--box", "0.5,0,1,1", "--size", "64", "--steps", "2", "--seed", "3", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    first = np.asarray(Image.open(out))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert first.shape == (64, 64, 3) and meta["seed"] == 3 and meta["refs"] == refs and meta["preset"] == "tiny"
    assert main(argv) == 0
    assert np.array_equal(first, np.asarray(Image.open(out))), "same seed, same image"


def test_generate_batch_mode(tmp_path, refs):
    cases = [{"id": "c1", "prompt": "a person", "refs": [refs[0]], "boxes": [[0.1, 0.1, 0.6, 0.9]], "out": "c1/out.png"},
             {"id": "c2", "prompt": "two", "refs": refs, "boxes": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]], "out": "c2/out.png"}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    assert main(["generate", "--preset", "tiny", "--batch", str(tmp_path / "cases.json"), "--out", str(tmp_path / "gen"),
                 "--size", "64", "--steps", "1", "--device", "cpu"]) == 0
    assert (tmp_path / "gen" / "c1" / "out.png").is_file() and (tmp_path / "gen" / "c2" / "out.json").is_file()


def test_generate_errors(tmp_path, refs, capsys):
    assert main(["generate", "--preset", "tiny", "--prompt", "x", "--ref", refs[0], "--out", str(tmp_path / "o.png")]) == 2
    assert "one box per reference" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny", "--prompt", "x", "--ref", refs[0], "--box", "70,70,90,90", "--size", "64",
                 "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 2
    assert "outside" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--flux"):
        main(["generate", "--prompt", "x", "--ref", refs[0], "--box", "0,0,1,1", "--out", str(tmp_path / "o.png")])
