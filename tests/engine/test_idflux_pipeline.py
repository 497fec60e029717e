"""IDFluxPipeline: the diffusers-style contract (from_pretrained, .to, __call__ outputs, boxes, sizes,
generator, callback), input errors before any denoising, and adapter files (bounded metadata)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import idflux  # noqa: E402
import idflux.engine  # noqa: E402
from idflux.engine.diffusers_pipeline import IDFluxPipeline, IDFluxPipelineOutput  # noqa: E402
from idflux.engine.pipeline import GenerateSettings  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    p = IDFluxPipeline.from_pretrained("tiny-random")
    p.set_progress_bar_config(disable=True)
    return p


def face(seed=0, shape=(48, 40)):
    rng = np.random.default_rng(seed)
    img = np.full((*shape, 3), 128, np.uint8)
    img[8:40, 8:32] = rng.integers(0, 255, 3, dtype=np.uint8)
    return img


def test_exported_names_and_diffusers_base():
    assert idflux.IDFluxPipeline is IDFluxPipeline and idflux.engine.IDFluxPipeline is IDFluxPipeline
    assert issubclass(IDFluxPipeline, DiffusionPipeline)


def test_output_types_non_square_and_generator_reproduce_the_engine(pipe):
    refs = [face(0), face(1)]
    boxes = [(0, 0, 24, 32), (24, 0, 48, 32)]
    kw = dict(ref_images=refs, boxes=boxes, height=32, width=48, num_inference_steps=1, guidance_scale=3.5)
    pt = pipe("two people", generator=torch.Generator().manual_seed(5), output_type="pt", **kw)
    assert isinstance(pt, IDFluxPipelineOutput) and pt.images.shape == (1, 3, 32, 48)
    assert pt.images.dtype == torch.float32 and 0 <= pt.images.min() and pt.images.max() <= 1
    s = pt.settings[0]
    assert (s["height"], s["width"], s["seed"], s["steps"], s["guidance"]) == (32, 48, 5, 1, 3.5)
    assert s["boxes"] == [list(map(float, b)) for b in boxes]
    np_out = pipe("two people", generator=torch.Generator().manual_seed(5), output_type="np", **kw).images
    assert np_out.shape == (1, 32, 48, 3) and np_out.dtype == np.float32
    np.testing.assert_allclose(np_out[0], pt.images[0].permute(1, 2, 0).numpy(), atol=1e-6)
    pil = pipe("two people", generator=torch.Generator().manual_seed(5), **kw).images
    assert len(pil) == 1 and pil[0].size == (48, 32)
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_out[0] * 255).round().astype(np.uint8))
    # the same as the engine's Pipeline.generate with embeddings and seed 5 (what training/eval call)
    arc, sig = pipe.encode_references(refs)
    settings = GenerateSettings(prompt="two people", boxes=boxes, steps=1, guidance=3.5, seed=5, height=32, width=48)
    ref = pipe.engine.generate(settings, arc, sig, progress=False)
    torch.testing.assert_close(pt.images, ((ref + 1) / 2).clamp(0, 1))


def test_no_boxes_means_every_reference_on_the_whole_image(pipe):
    kw = dict(ref_images=[face(0), face(1)], height=32, width=32, num_inference_steps=1, output_type="pt")
    none = pipe("x", boxes=None, generator=torch.Generator().manual_seed(1), **kw)
    whole = pipe("x", boxes=[(0, 0, 32, 32)] * 2, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(none.images, whole.images)
    assert none.settings[0]["boxes"] is None


def test_callback_on_step_end_follows_diffusers(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, float(t), tuple(kwargs["latents"].shape)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = pipe("x", ref_images=face(), height=32, width=32, num_inference_steps=3, output_type="pt",
               callback_on_step_end=callback, generator=torch.Generator().manual_seed(0))
    assert [i for i, _, _ in seen] == [0, 1, 2] and seen[0][1] == pytest.approx(1000.0)
    assert seen[0][2] == (1, 4, 16)  # packed latents: 2x2 tokens of 4 x 4 channels
    zero_latent = pipe.postprocess(pipe.engine.parts.vae.decode(
        torch.zeros(1, 4, 4, 4) / pipe.engine.parts.vae.config.scaling_factor
        + pipe.engine.parts.vae.config.shift_factor).sample.clamp(-1, 1), "pt")
    torch.testing.assert_close(out.images, zero_latent), "latents returned by the callback replace the state"


@pytest.mark.parametrize("kw, needle", [
    (dict(prompt=3), "prompt"),
    (dict(ref_images=None), "ref_images"),
    (dict(ref_images=[face()] * 5), "ref_images"),
    (dict(ref_images=["/no/such/file.png"]), "ref_images[0]"),
    (dict(ref_images=[np.zeros((8, 8), np.uint8)]), "ref_images[0]"),
    (dict(boxes=[(0, 0, 8, 8), (8, 8, 16, 16)]), "boxes"),
    (dict(boxes=[(0, 0, float("inf"), 8)]), "boxes"),
    (dict(boxes=[(40, 40, 60, 60)]), "outside"),
    (dict(height=40), "height"),
    (dict(width=0), "width"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(id_weight=float("inf")), "id_weight"),
    (dict(output_type="latent"), "output_type"),
    (dict(generator=[torch.Generator(), torch.Generator()]), "generator"),
    (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), "callback_on_step_end_tensor_inputs"),
])
def test_bad_input_raises_before_any_denoising(pipe, monkeypatch, kw, needle):
    def no_work(*a, **k):
        raise AssertionError("denoising started before the input was checked")

    monkeypatch.setattr(pipe.engine, "generate_batch", no_work)
    args = dict(prompt="x", ref_images=[face()], height=32, width=32, num_inference_steps=1)
    args.update(kw)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        pipe(**args)


def test_no_face_in_a_reference_names_it(monkeypatch, pipe):
    def no_work(*a, **k):
        raise AssertionError("denoising started")

    monkeypatch.setattr(pipe.engine, "generate_batch", no_work)
    monkeypatch.setattr(pipe.face_detector, "detect", lambda image: [])
    with pytest.raises(ValueError, match=r"ref_images: reference image 0: no face found"):
        pipe("x", ref_images=[face()], height=32, width=32)


def test_from_pretrained_flux_dev_names_every_missing_input(tmp_path):
    with pytest.raises(ValueError, match="adapter, face_models, siglip.*source='tiny'"):
        IDFluxPipeline.from_pretrained(str(tmp_path))


def test_adapter_file_loads_for_the_tiny_preset_and_changes_the_image(tmp_path, pipe):
    from idflux.engine.weights import save_adapter

    adapter = pipe.engine.adapter
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter.state_dict().items()}
    save_adapter(adapter, tmp_path / "a.safetensors", state_dict=state)
    other = IDFluxPipeline.from_pretrained("tiny-random", adapter=tmp_path / "a.safetensors")
    other.set_progress_bar_config(disable=True)
    for k, v in other.engine.adapter.state_dict().items():
        torch.testing.assert_close(v, state[k])
    from idflux.engine.pipeline import Pipeline

    engine = Pipeline.from_pretrained("tiny-random", adapter=tmp_path / "a.safetensors")
    assert isinstance(engine, Pipeline)
    for k, v in engine.adapter.state_dict().items():
        torch.testing.assert_close(v, state[k])
    kw = dict(ref_images=[face()], height=32, width=32, num_inference_steps=1, output_type="pt")
    a = pipe("x", generator=torch.Generator().manual_seed(0), **kw).images
    b = other("x", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.equal(a, b), "--adapter must reach the image"


def test_to_moves_and_casts_and_keeps_fp8_storage():
    from idflux.engine.lowvram import Fp8Linear

    p = IDFluxPipeline.from_pretrained("tiny-random", fp8=True)
    p.to(torch.float64)
    assert p.dtype == torch.float64 and next(p.engine.adapter.parameters()).dtype == torch.float64
    fp8 = [m for m in p.transformer.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8)
    assert p.device.type == "cpu" and p.to("cpu") is p
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            p.to("cuda")


def _tiny_adapter_file(path, config: dict):
    from idflux.engine.adapter import IdentityAdapter, tiny_adapter

    a = IdentityAdapter(tiny_adapter())
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path),
              metadata={"format": "idflux-adapter", "config": json.dumps(config)})


def test_load_adapter_bounds_metadata_before_building_anything(tmp_path, monkeypatch):
    import dataclasses

    import idflux.engine.weights as W
    from idflux.engine.adapter import tiny_adapter

    built = []
    real = W.IdentityAdapter

    def guarded(cfg):
        built.append(cfg)
        if cfg.n_blocks > 512:
            raise AssertionError(f"built an adapter of {cfg.n_blocks} blocks from file metadata")
        return real(cfg)

    monkeypatch.setattr(W, "IdentityAdapter", guarded)
    cfg = dataclasses.asdict(tiny_adapter())
    hostile = tmp_path / "hostile.safetensors"
    _tiny_adapter_file(hostile, {**cfg, "n_blocks": 100_000})
    with pytest.raises(ValueError, match=r"n_blocks=100000 must be an integer in \[1, 512\]"):
        W.load_adapter(hostile)
    assert not built
    for bad, needle in [({**cfg, "hidden": -4}, "hidden"), ({**cfg, "heads": 2.5}, "heads"), ({"hidden": 64}, "lacks"),
                        ({**cfg, "extra": 1}, "unknown fields"), ([1, 2], "JSON object")]:
        _tiny_adapter_file(hostile, bad)
        with pytest.raises(ValueError, match=needle):
            W.load_adapter(hostile)
    assert not built
    _tiny_adapter_file(hostile, {**cfg, "n_blocks": 5})  # valid config, tensors of another one
    with pytest.raises(ValueError, match="missing"):
        W.load_adapter(hostile)
    hostile.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # metadata-free safetensors
    with pytest.raises(ValueError, match="not an idflux adapter"):
        W.load_adapter(hostile)


def test_adapter_file_kinds(tmp_path):
    from idflux.engine.adapter import IdentityAdapter, ours_to_released, tiny_adapter
    from idflux.engine.weights import adapter_file_kind, load_any_adapter, save_adapter

    a = IdentityAdapter(tiny_adapter())
    save_adapter(a, tmp_path / "ours.safetensors")
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    save_file({ours_to_released(k): v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "rel.safetensors"))
    assert [adapter_file_kind(tmp_path / f"{n}.safetensors") for n in ("ours", "plain", "rel")] == [
        "idflux", "state_dict", "released"]
    for n in ("ours", "plain", "rel"):
        b = load_any_adapter(tmp_path / f"{n}.safetensors", tiny_adapter())
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        adapter_file_kind(tmp_path / "junk.safetensors")
