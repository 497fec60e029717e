"""The product loop on the tiny preset: idflux train -> idflux export -> idflux generate --adapter -> idflux eval."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from idflux.cli import main  # noqa: E402

FAKE = Path(__file__).parent / "eval" / "fake_faces.py"
#: The random tiny models (``--flux random``): the same backbone in training and generation.
GEN = ["generate", "--preset", "tiny", "--flux", "random", "--device", "cpu", "--steps", "1", "--size", "32"]


def _fake_faces():
    spec = importlib.util.spec_from_file_location("fake_faces_loop", FAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_export_generate_eval(tmp_path, capsys):
    from idflux.engine.weights import adapter_file_kind, load_adapter
    from idflux.train.config import Phase, tiny
    from idflux.train.synthetic import write_multiid
    from idflux.train.trainer import train

    data = tmp_path / "data"
    write_multiid(data, n_identities=4, n_samples=6, size=64, seed=0, shard_size=6, refs_per_identity=2, max_faces=2)
    run = tmp_path / "run"
    cfg = tiny(out=str(run), data=str(data), flux="random", ema_decay=0.5, batch_size=2, checkpoint_every=2)
    cfg.phases = [Phase("fixed", 2, "fixed", 0.0, 5e-2)]
    train(cfg, max_steps=2)

    # export: EMA by default when the run kept one, raw weights with --no-ema
    ema_file, raw_file = tmp_path / "adapter.safetensors", tmp_path / "raw.safetensors"
    assert main(["export", str(run), "--out", str(ema_file)]) == 0
    assert main(["export", str(run), "--no-ema", "--out", str(raw_file)]) == 0
    assert adapter_file_kind(ema_file) == adapter_file_kind(raw_file) == "idflux"
    ema, raw = load_adapter(ema_file), load_adapter(raw_file)
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))
    assert main(["export", str(run), "--out", str(tmp_path / "x.bin")]) == 2
    assert ".safetensors" in capsys.readouterr().err

    # generate with and without the exported adapter: the adapter must reach the image
    ref = tmp_path / "ref.png"
    Image.fromarray(_fake_faces().draw_faces([0.2], size=48)[0]).save(ref)
    with_adapter, without = tmp_path / "with.png", tmp_path / "without.png"
    assert main(GEN + ["--prompt", "a person", "--ref", str(ref), "--adapter", str(ema_file), "--out", str(with_adapter)]) == 0
    assert main(GEN + ["--prompt", "a person", "--ref", str(ref), "--out", str(without)]) == 0
    assert not np.array_equal(np.asarray(Image.open(with_adapter)), np.asarray(Image.open(without)))
    assert json.loads((tmp_path / "with.png.json").read_text())["adapter"] == str(ema_file)

    # a bench of two cases -> generate --batch with the adapter -> eval with the weight-free face model
    bench = tmp_path / "bench"
    bench.mkdir()
    records = []
    for cid, hues in {"a": [0.1], "b": [0.4, 0.8]}.items():
        gt, boxes = _fake_faces().draw_faces(hues)
        Image.fromarray(gt).save(bench / f"{cid}_gt.png")
        names = []
        for k, h in enumerate(hues):
            Image.fromarray(_fake_faces().draw_faces([h], size=24)[0]).save(bench / f"{cid}_ref{k}.png")
            names.append(f"{cid}_ref{k}.png")
        records.append({"ID": cid, "GT": f"{cid}_gt.png", "input_images": names, "prompt": "people", "bboxes": boxes,
                        "subset": f"p{len(hues)}", "num_persons": len(hues)})
    (bench / "bench.json").write_text(json.dumps(records))
    cases = tmp_path / "cases.json"
    assert main(["eval", "--bench", str(bench / "bench.json"), "--write-cases", str(cases)]) == 0
    gen = tmp_path / "gen"
    assert main(GEN + ["--batch", str(cases), "--adapter", str(ema_file), "--out", str(gen)]) == 0
    report = tmp_path / "report.json"
    assert main(["eval", "--bench", str(bench / "bench.json"), "--generated", str(gen), "--face-models",
                 f"{FAKE}:ColourSquareFaces", "--out", str(report)]) == 0
    summary = json.loads(report.read_text())["runs"]["gen"]["summary"]
    assert summary["p1"]["cases"] == 1 and summary["p2"]["cases"] == 1
    assert summary["p1"].get("missing_images", 0) == 0, "eval finds every generated image"
