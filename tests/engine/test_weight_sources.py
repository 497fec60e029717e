"""Every FLUX weight source, each from tiny files built here and saved in that exact format: a
diffusers folder, BFL single files (flux1-dev.safetensors + ae.safetensors, text encoders from
folders), ComfyUI fp8 files, a Hub id in a fake local Hugging Face cache; and the one-line error
naming every missing part."""

import argparse
import hashlib
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from idflux.engine.loading import (  # noqa: E402
    MissingWeightsError,
    add_weight_arguments,
    bfl_to_diffusers_rules,
    char_tokenizer,
    load_flux,
    load_parts_from_args,
    resolve_flux_sources,
)
from idflux.engine.lowvram import FP8, Fp8Linear  # noqa: E402

H = 64  # hidden width of the tiny transformer (2 heads x 32)


def tiny_transformer():
    torch.manual_seed(1)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                  guidance_embeds=True, axes_dims_rope=(4, 14, 14)).eval()


def tiny_vae():
    torch.manual_seed(2)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                         sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


def to_bfl(sd):
    """diffusers FLUX names -> BFL's (flux1-dev.safetensors layout), written out by hand."""
    sd = dict(sd)
    out = {}

    def mv(b, d):
        for s in ("weight", "bias"):
            out[f"{b}.{s}"] = sd.pop(f"{d}.{s}")

    for b, d in (("time_in", "time_text_embed.timestep_embedder"), ("vector_in", "time_text_embed.text_embedder"),
                 ("guidance_in", "time_text_embed.guidance_embedder")):
        mv(f"{b}.in_layer", f"{d}.linear_1")
        mv(f"{b}.out_layer", f"{d}.linear_2")
    mv("txt_in", "context_embedder")
    mv("img_in", "x_embedder")
    for i in range(1):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        mv(b + "img_mod.lin", f"transformer_blocks.{i}.norm1.linear")
        mv(b + "txt_mod.lin", f"transformer_blocks.{i}.norm1_context.linear")
        for s in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{s}"] = torch.cat([sd.pop(f"{d}to_{x}.{s}") for x in "qkv"])
            out[f"{b}txt_attn.qkv.{s}"] = torch.cat([sd.pop(f"{d}add_{x}_proj.{s}") for x in "qkv"])
        out[b + "img_attn.norm.query_norm.scale"] = sd.pop(d + "norm_q.weight")
        out[b + "img_attn.norm.key_norm.scale"] = sd.pop(d + "norm_k.weight")
        out[b + "txt_attn.norm.query_norm.scale"] = sd.pop(d + "norm_added_q.weight")
        out[b + "txt_attn.norm.key_norm.scale"] = sd.pop(d + "norm_added_k.weight")
        mv(b + "img_attn.proj", d + "to_out.0")
        mv(b + "txt_attn.proj", d + "to_add_out")
        mv(b + "img_mlp.0", f"transformer_blocks.{i}.ff.net.0.proj")
        mv(b + "img_mlp.2", f"transformer_blocks.{i}.ff.net.2")
        mv(b + "txt_mlp.0", f"transformer_blocks.{i}.ff_context.net.0.proj")
        mv(b + "txt_mlp.2", f"transformer_blocks.{i}.ff_context.net.2")
    for i in range(2):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        mv(b + "modulation.lin", d + "norm.linear")
        for s in ("weight", "bias"):
            out[f"{b}linear1.{s}"] = torch.cat([sd.pop(f"{d}attn.to_{x}.{s}") for x in "qkv"] + [sd.pop(f"{d}proj_mlp.{s}")])
        out[b + "norm.query_norm.scale"] = sd.pop(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = sd.pop(d + "attn.norm_k.weight")
        mv(b + "linear2", d + "proj_out")
    mv("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{s}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    assert not sd, f"unmapped: {list(sd)}"
    return {k: v.contiguous() for k, v in out.items()}


def vae_to_ldm(sd):
    """diffusers AutoencoderKL names -> the LDM/BFL names of ae.safetensors (2 levels, 1 resnet each)."""
    out = {}
    n = 2
    for k, v in sd.items():
        k2 = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for part in ("encoder", "decoder"):
            k2 = k2.replace(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.").replace(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")
            k2 = k2.replace(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")
        for i in range(n):
            k2 = k2.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k2 = k2.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
            k2 = k2.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            k2 = k2.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")
        if ".mid.attn_1." in k2:
            k2 = (k2.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
                  .replace("to_out.0", "proj_out"))
            if v.dim() == 2:
                v = v[:, :, None, None]
        out[k2] = v.contiguous()
    return out


def save_text_encoders(root):
    """CLIP-L and T5 folders as their repos ship them: model and tokenizer in one folder each."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(3)
    clip_tok, t5_tok = char_tokenizer(77), char_tokenizer(64)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                                        pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    clip.save_pretrained(root / "clip")
    clip_tok.save_pretrained(root / "clip")
    t5.save_pretrained(root / "t5")
    t5_tok.save_pretrained(root / "t5")
    return clip, t5


@pytest.fixture(scope="module")
def models():
    return tiny_transformer(), tiny_vae()


def save_diffusers_folder(root, models):
    flux, vae = models
    flux.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    clip, t5 = save_text_encoders(root / "enc")
    for src, enc, tok in (("clip", "text_encoder", "tokenizer"), ("t5", "text_encoder_2", "tokenizer_2")):
        (root / enc).mkdir(parents=True)
        (root / tok).mkdir(parents=True)
        for f in (root / "enc" / src).iterdir():
            dest = enc if f.name in ("config.json", "model.safetensors") else tok
            (root / dest / f.name).write_bytes(f.read_bytes())
    return clip, t5


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def flux_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), guidance=torch.tensor([4.0]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), return_dict=False)


def test_bfl_rules_match_diffusers_converter_at_flux_dev_size():
    """Our row-slice mapping equals diffusers' own BFL converter on a full FLUX.1-dev layout
    (19 double + 38 single blocks, width 3072): rows of random values, one column each."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        ref_model = FluxTransformer2DModel(guidance_embeds=True)
    shapes = {k: v.shape for k, v in ref_model.state_dict().items()}
    rules = bfl_to_diffusers_rules(19, 38, 3072, 4 * 3072)
    assert set(rules) == set(shapes), "the rules name every tensor of FLUX.1-dev's model"
    rows = {}
    for d, (b, sl, _) in rules.items():
        rows[b] = max(rows.get(b, 0), sl[1] if sl else shapes[d][0])
    g = torch.Generator().manual_seed(0)
    bfl = {b: torch.randn(n, 1, generator=g) for b, n in rows.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(theirs) == set(rules)
    for d, (b, sl, swap) in rules.items():
        t = bfl[b][sl[0]:sl[1]] if sl else bfl[b]
        if swap:
            t = torch.cat([t[t.shape[0] // 2:], t[:t.shape[0] // 2]])
        assert t.shape[0] == shapes[d][0], d
        assert torch.equal(t, theirs[d]), d


def test_diffusers_folder(tmp_path, models):
    clip, t5 = save_diffusers_folder(tmp_path, models)
    parts = load_flux(tmp_path, dtype=torch.float32, max_text_tokens=64)
    assert_same_state(parts.transformer, models[0])
    assert_same_state(parts.vae, models[1])
    assert_same_state(parts.clip, clip) and assert_same_state(parts.t5, t5) is None


def test_bfl_single_files_with_text_encoder_folders(tmp_path, models):
    flux, vae = models
    save_file(to_bfl(flux.state_dict()), str(tmp_path / "flux1-dev.safetensors"))
    save_file(vae_to_ldm(vae.state_dict()), str(tmp_path / "ae.safetensors"))
    clip, t5 = save_text_encoders(tmp_path)
    parts = load_flux(tmp_path, clip=tmp_path / "clip", t5=tmp_path / "t5", dtype=torch.float32)
    assert_same_state(parts.transformer, flux)
    assert_same_state(parts.vae, vae)
    assert_same_state(parts.clip, clip)
    assert_same_state(parts.t5, t5)
    assert parts.t5_tokenizer("ab").input_ids == char_tokenizer(64)("ab").input_ids
    with torch.no_grad():
        torch.testing.assert_close(parts.transformer(**flux_inputs())[0], flux(**flux_inputs())[0], rtol=1e-5, atol=1e-6)
    # the same files named one by one, and the older call (transformer_file + a diffusers folder for the rest)
    parts = load_flux(transformer=tmp_path / "flux1-dev.safetensors", ae=tmp_path / "ae.safetensors", clip=tmp_path / "clip",
                      t5=tmp_path / "t5", dtype=torch.bfloat16)
    assert next(parts.transformer.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in parts.transformer.parameters())


def test_old_load_flux_call_with_transformer_file(tmp_path, models):
    save_diffusers_folder(tmp_path / "dev", models)
    save_file(to_bfl(models[0].state_dict()), str(tmp_path / "flux1-dev.safetensors"))
    parts = load_flux(tmp_path / "dev", transformer_file=tmp_path / "flux1-dev.safetensors", dtype=torch.float32)
    assert_same_state(parts.transformer, models[0])


def comfy_fp8(sd, scaled: bool):
    """A ComfyUI-style fp8 file: 2-D weights in float8_e4m3fn (per-tensor .scale_weight when
    ``scaled``, plus the scaled_fp8 marker), the rest bf16, under model.diffusion_model."""
    out = {}
    for k, v in sd.items():
        if v.dim() == 2 and k.endswith(".weight"):
            s = v.abs().max() / 448 if scaled else torch.tensor(1.0)
            out[k] = (v / s).to(FP8)
            if scaled:
                out[k[:-len(".weight")] + ".scale_weight"] = s.reshape(()).float()
        else:
            out[k] = v.to(torch.bfloat16)
    out = {"model.diffusion_model." + k: v for k, v in out.items()}
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    out["vae.encoder.conv_in.weight"] = torch.zeros(1)  # a full checkpoint's other parts are ignored
    return out


@pytest.mark.parametrize("scaled", [False, True])
def test_comfy_fp8_file_loads_straight_into_fp8_storage(tmp_path, models, scaled):
    flux = models[0]
    bfl = to_bfl(flux.state_dict())
    fp8_file = comfy_fp8(bfl, scaled)
    save_file(fp8_file, str(tmp_path / "flux1-dev-fp8.safetensors"))
    save_diffusers_folder(tmp_path / "dev", models)
    parts = load_flux(tmp_path / "dev", transformer=tmp_path / "flux1-dev-fp8.safetensors", dtype=torch.float32, fp8=True)
    t = parts.transformer
    linears = [m for m in t.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Fp8Linear) for m in linears), "every Linear is stored in fp8"
    # the file's fp8 bytes are taken as they are (not dequantized and quantized again)
    q = t.transformer_blocks[0].attn.to_k
    raw = fp8_file["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"][H:2 * H]
    assert torch.equal(q.weight_fp8.view(torch.uint8), raw.view(torch.uint8))
    s = fp8_file["model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight"] if scaled else torch.tensor(1.0)
    assert torch.equal(q.scale, s.expand(H, 1).float())
    # numerically: the same as a full-precision model holding the dequantized weights
    full = load_flux(tmp_path / "dev", transformer=tmp_path / "flux1-dev-fp8.safetensors", dtype=torch.float32).transformer
    assert not any(isinstance(m, Fp8Linear) for m in full.modules())
    torch.testing.assert_close(full.transformer_blocks[0].attn.to_k.weight, q.weight)
    with torch.no_grad():
        a, b, ref = t(**flux_inputs())[0], full(**flux_inputs())[0], flux(**flux_inputs())[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - ref).norm() / ref.norm() < 0.1, "fp8 stays close to the full-precision model"


def test_bf16_file_with_fp8_quantizes_while_loading(tmp_path, models):
    from idflux.engine.loading import load_transformer
    from idflux.engine.lowvram import store_linears_fp8

    flux = models[0]
    save_file(to_bfl(flux.state_dict()), str(tmp_path / "flux1-dev.safetensors"))
    t = load_transformer(tmp_path / "flux1-dev.safetensors", dtype=torch.float32, fp8=True)
    ref = tiny_transformer()
    store_linears_fp8(ref)
    assert_same_state(t, ref)


def fake_hub_cache(cache, repo_id, files: dict):
    """A cache laid out as huggingface_hub lays it out: blobs by hash, snapshot files as relative
    symlinks into blobs, refs/main holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        target = snap / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / blob, target.parent), target)
    return snap


def test_hub_id_resolved_from_the_local_cache(tmp_path, models, monkeypatch):
    src = tmp_path / "src"
    save_diffusers_folder(src, models)
    files = {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*")
             if p.is_file() and not p.relative_to(src).parts[0] == "enc"}
    files["model_index.json"] = json.dumps({"_class_name": "FluxPipeline"}).encode()
    cache = tmp_path / "home" / "hub"
    snap = fake_hub_cache(cache, "black-forest-labs/FLUX.1-dev", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    parts = load_flux("black-forest-labs/FLUX.1-dev", dtype=torch.float32)
    assert_same_state(parts.transformer, models[0])
    assert resolve_flux_sources("black-forest-labs/FLUX.1-dev")["vae"].path == snap / "vae"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError) as err:
        load_flux("black-forest-labs/FLUX.1-dev")
    msg = str(err.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg and str(tmp_path / "empty") in msg


def weight_args(argv):
    p = argparse.ArgumentParser()
    add_weight_arguments(p)
    return p.parse_args(argv)


def test_every_missing_part_named_at_once_in_one_line(tmp_path, models):
    save_file(to_bfl(models[0].state_dict()), str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(MissingWeightsError) as err:
        load_flux(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert set(err.value.missing) == {"vae", "clip", "t5"}
    for needle in ("--ae", "ae.safetensors", "--clip", "openai/clip-vit-large-patch14", "--t5", "tokenizer_2"):
        assert needle in msg, needle
    # nothing given at all: all four, one line, through the CLI's options
    args = weight_args(["--lora", str(tmp_path / "nope.safetensors") + ":0.5"])
    with pytest.raises(MissingWeightsError) as err:
        load_parts_from_args(args, "cpu", torch.float32)
    assert set(err.value.missing) == {"transformer", "vae", "clip", "t5", f"--lora {tmp_path / 'nope.safetensors'}"}
    assert "\n" not in str(err.value) and "--transformer" in str(err.value)
    with pytest.raises(MissingWeightsError, match="--clip .*no such file or folder"):
        load_flux(tmp_path, ae=tmp_path / "ae.safetensors", clip=tmp_path / "no-clip", t5=tmp_path)


def test_weight_arguments_and_loading_from_args(tmp_path, models):
    save_file(to_bfl(models[0].state_dict()), str(tmp_path / "flux1-dev.safetensors"))
    save_file(vae_to_ldm(models[1].state_dict()), str(tmp_path / "ae.safetensors"))
    save_text_encoders(tmp_path)
    args = weight_args(["--transformer", str(tmp_path / "flux1-dev.safetensors"), "--ae", str(tmp_path / "ae.safetensors"),
                        "--clip", str(tmp_path / "clip"), "--t5", str(tmp_path / "t5"), "--fp8", "--offload"])
    assert args.lora == [] and args.fp8 and args.offload and not args.group_offload
    moved = []
    real_to = FluxTransformer2DModel.to

    def spy_to(self, *a, **kw):  # what the transformer holds when it is moved to the device
        moved.append(sum(type(m) is torch.nn.Linear for m in self.modules()))
        return real_to(self, *a, **kw)

    FluxTransformer2DModel.to = spy_to
    try:
        parts = load_parts_from_args(args, "cpu", torch.float32)
    finally:
        FluxTransformer2DModel.to = real_to
    assert moved and all(n == 0 for n in moved), f"full-precision Linears reached the device: {moved}"
    assert any(isinstance(m, Fp8Linear) for m in parts.transformer.modules())
    assert all(isinstance(m, Fp8Linear) for m in parts.t5.modules() if isinstance(m, torch.nn.Linear)), "--fp8: T5 too"
    assert not any(isinstance(m, Fp8Linear) for m in parts.clip.modules())
    ids = parts.t5_tokenizer(["a b"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(parts.t5(ids).last_hidden_state).all()
    assert weight_args(["--flux-transformer", "x.safetensors"]).transformer == "x.safetensors"
    assert weight_args(["--lora", "a.safetensors:0.75", "--lora", "b.safetensors"]).lora == [("a.safetensors", 0.75),
                                                                                             ("b.safetensors", 1.0)]
    with pytest.raises(SystemExit):
        weight_args(["--lora", "a.safetensors:nan"])
