import json

import pytest
import torch

pytest.importorskip("diffusers")

from idflux.engine.pipeline import GenerateSettings, Pipeline, save_generation  # noqa: E402


def identity_inputs(pipe, R=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.adapter.cfg
    return torch.randn(R, cfg.arc_dim, generator=g), torch.randn(R, cfg.siglip_tokens, cfg.siglip_dim, generator=g)


def test_tiny_generate_is_deterministic_and_written(tmp_path):
    pipe = Pipeline.tiny(backend="torch")
    arc, sig = identity_inputs(pipe)
    s = GenerateSettings(prompt="two people", boxes=[(0, 0, 32, 64), (32, 0, 64, 64)], size=64, steps=3, seed=7)
    a = pipe.generate(s, arc, sig, progress=False)
    b = pipe.generate(s, arc, sig, progress=False)
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b), "same seed, same image"
    c = pipe.generate(GenerateSettings(**{**s.__dict__, "seed": 8}), arc, sig, progress=False)
    assert not torch.equal(a, c)
    out = save_generation(a, s, tmp_path / "img.png")
    assert out.stat().st_size > 100
    assert json.loads((tmp_path / "img.png.json").read_text())["seed"] == 7


def test_identity_only_changes_boxed_tokens_through_adapter():
    pipe = Pipeline.tiny(backend="torch")
    arc, sig = identity_inputs(pipe)
    s = GenerateSettings(prompt="a person", boxes=[(0, 0, 16, 16)], size=64, steps=2, seed=1)
    base = pipe.generate(s, arc[:1], sig[:1], progress=False)
    other = pipe.generate(s, arc[1:], sig[1:], progress=False)
    assert not torch.equal(base, other), "the identity must reach the image"
    zero = pipe.generate(GenerateSettings(**{**s.__dict__, "id_weight": 0.0, "siglip_weight": 0.0}), arc[:1], sig[:1], progress=False)
    zero2 = pipe.generate(GenerateSettings(**{**s.__dict__, "id_weight": 0.0, "siglip_weight": 0.0}), arc[1:], sig[1:], progress=False)
    assert torch.equal(zero, zero2), "with both weights 0 the identity must not matter"


def test_generate_validates_boxes_and_size():
    pipe = Pipeline.tiny(backend="torch")
    arc, sig = identity_inputs(pipe)
    with pytest.raises(ValueError, match="one box per reference"):
        pipe.generate(GenerateSettings(prompt="x", boxes=[(0, 0, 16, 16)], size=64, steps=1), arc, sig, progress=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate(GenerateSettings(prompt="x", boxes=[(0, 0, 16, 16)] * 2, size=60, steps=1), arc, sig, progress=False)


def save_tiny_flux_folder(root):
    from idflux.engine.loading import tiny_flux_parts

    p = tiny_flux_parts()
    p.transformer.save_pretrained(root / "transformer")
    p.vae.save_pretrained(root / "vae")
    p.clip.save_pretrained(root / "text_encoder")
    p.clip_tokenizer.save_pretrained(root / "tokenizer")
    p.t5.save_pretrained(root / "text_encoder_2")
    p.t5_tokenizer.save_pretrained(root / "tokenizer_2")
    return p


def test_load_flux_from_local_folder_round_trip(tmp_path):
    from idflux.engine.loading import load_flux

    src = save_tiny_flux_folder(tmp_path)
    parts = load_flux(tmp_path, dtype=torch.float32, max_text_tokens=64)
    for a, b in zip(src.transformer.state_dict().values(), parts.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert parts.t5_tokenizer("ab").input_ids == src.t5_tokenizer("ab").input_ids
    assert not any(p.requires_grad for p in parts.transformer.parameters()), "the backbone is frozen"


@pytest.mark.parametrize("missing", ["tokenizer/tokenizer.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder_2"])
def test_missing_flux_file_is_a_clear_error(tmp_path, missing):
    import shutil

    from idflux.engine.loading import load_flux

    save_tiny_flux_folder(tmp_path)
    target = tmp_path / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=missing.split("/")[0]):
        load_flux(tmp_path, dtype=torch.float32)


def test_fp8_storage_and_offload_stay_close_to_full_precision():
    from idflux.engine.lowvram import Fp8Linear

    full = Pipeline.tiny(backend="torch")
    low = Pipeline.tiny(backend="torch", offload=True, fp8=True)
    assert any(isinstance(m, Fp8Linear) for m in low.parts.transformer.modules())
    assert next(low.parts.vae.parameters()).device.type == "cpu"
    arc, sig = identity_inputs(full)
    s = GenerateSettings(prompt="two people", boxes=[(0, 0, 32, 64), (32, 0, 64, 64)], size=64, steps=2, seed=5)
    a, b = full.generate(s, arc, sig, progress=False), low.generate(s, arc, sig, progress=False)
    assert (a - b).abs().mean() < 0.05, "fp8 weights must not change the image much"


def test_fp8_linear_matches_linear():
    from idflux.engine.lowvram import Fp8Linear

    lin = torch.nn.Linear(64, 48)
    q = Fp8Linear(lin)
    x = torch.randn(5, 64)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.05 and q.weight_fp8.dtype == torch.float8_e4m3fn


def test_generate_batch_matches_single_generations():
    pipe = Pipeline.tiny(backend="torch")
    arc, sig = identity_inputs(pipe, R=3)
    s1 = GenerateSettings(prompt="two people", boxes=[(0, 0, 32, 64), (32, 0, 64, 64)], size=64, steps=2, seed=1)
    s2 = GenerateSettings(prompt="one person", boxes=[(8, 8, 56, 56)], size=64, steps=2, seed=2)
    batch = pipe.generate_batch([s1, s2], [arc[:2], arc[2:]], [sig[:2], sig[2:]], progress=False)
    one = pipe.generate(s1, arc[:2], sig[:2], progress=False)
    two = pipe.generate(s2, arc[2:], sig[2:], progress=False)
    torch.testing.assert_close(batch, torch.cat([one, two]), atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="settings.steps differs"):
        pipe.generate_batch([s1, GenerateSettings(**{**s2.__dict__, "steps": 3})], [arc[:2], arc[2:]], [sig[:2], sig[2:]])
