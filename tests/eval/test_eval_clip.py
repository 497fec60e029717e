"""CLIP-I / CLIP-T through a tiny random transformers CLIP saved in tmp_path (no weights downloaded)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fake_faces import draw_faces
from idflux.eval import ClipScorer, evaluate, format_tables, load_bench

FAKE = Path(__file__).with_name("fake_faces.py")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_scores(tiny_clip):
    clip = ClipScorer(tiny_clip)
    a, _ = draw_faces([0.1, 0.5])
    b = np.full((40, 56, 3), 30, np.uint8)
    assert clip.clip_i(a, a) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= clip.clip_i(a, b) < 0.9999
    feats = clip.text_features(["two people", "a cat"])
    assert feats.shape == (2, 8) and torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)
    assert clip.clip_t(a, "two people") == pytest.approx(float(clip.image_features([a])[0] @ feats[0]), abs=1e-6)


def test_clip_folder_missing_files_are_named(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="clip-vit-base-patch16"):
        ClipScorer(tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_clip / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config.json.*model.safetensors.*tokenizer.json"):
        ClipScorer(partial)


def test_evaluate_with_clip_fills_the_clip_columns(tmp_path, tiny_clip):
    gt, boxes = draw_faces([0.2, 0.7])
    Image.fromarray(gt).save(tmp_path / "gt.png")
    for k, hue in enumerate([0.25, 0.75]):
        Image.fromarray(draw_faces([hue], size=24)[0]).save(tmp_path / f"r{k}.png")
    (tmp_path / "bench.json").write_text(json.dumps([{"ID": "x", "GT": "gt.png", "input_images": ["r0.png", "r1.png"],
                                                      "prompt": "two people", "bboxes": boxes}]))
    (tmp_path / "gen").mkdir()
    Image.fromarray(gt).save(tmp_path / "gen" / "x.png")  # the GT itself: CLIP-I = 1
    from fake_faces import ColourSquareFaces

    clip = ClipScorer(tiny_clip)
    report = evaluate(load_bench(tmp_path / "bench.json"), {"run": tmp_path / "gen"}, [ColourSquareFaces()], clip)
    metrics = report["runs"]["run"]["summary"]["p2"]["metrics"]
    assert metrics["CLIP-I"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["CLIP-T"]["mean"] == pytest.approx(clip.clip_t(gt, "two people"), abs=1e-5)
    assert "CLIP-I↑" in format_tables(report)["p2"] and report["clip"] == tiny_clip.name
