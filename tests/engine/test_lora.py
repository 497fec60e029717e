"""LoRA on the FLUX backbone (diffusers/peft and kohya files built here), on full-precision and fp8
Linears: the output follows W + s * (alpha / r) * B @ A, scale 0 is the backbone exactly, unloading
restores it."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from diffusers import FluxTransformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from idflux.engine.lora import load_lora, lora_names, set_lora_scale, unload_lora  # noqa: E402
from idflux.engine.lowvram import Fp8Linear, store_linears_fp8  # noqa: E402

H, R = 64, 4


def tiny_transformer(fp8=False):
    torch.manual_seed(1)
    t = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                               axes_dims_rope=(4, 14, 14)).eval().requires_grad_(False)
    if fp8:
        store_linears_fp8(t)
    return t


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), guidance=torch.tensor([4.0]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), return_dict=False)


@torch.no_grad()
def run(t):
    return t(**inputs())[0]


def peft_lora(path, alpha=8.0):
    """diffusers/peft naming: to_q of the double block and proj_out of the single block, with alphas."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for mod, (out_f, in_f) in {"transformer_blocks.0.attn.to_q": (H, H), "single_transformer_blocks.0.proj_out": (H, 5 * H)}.items():
        sd[f"transformer.{mod}.lora_A.weight"] = torch.randn(R, in_f, generator=g) * 0.3
        sd[f"transformer.{mod}.lora_B.weight"] = torch.randn(out_f, R, generator=g) * 0.3
        sd[f"transformer.{mod}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return sd


def kohya_lora(path, alpha=2.0):
    """kohya/sd-scripts naming on BFL modules: the fused qkv of the double block (split by diffusers)."""
    g = torch.Generator().manual_seed(6)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(R, H, generator=g) * 0.3,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * H, R, generator=g) * 0.3,
          "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha)}
    save_file(sd, str(path))
    return sd


def base_weight(linear):
    return linear.weight.detach().float()  # Fp8Linear: the dequantized weight


@pytest.mark.parametrize("fp8", [False, True])
def test_peft_lora_matches_manual_reference_and_scales(tmp_path, fp8):
    t = tiny_transformer(fp8)
    base = run(t)
    to_q = t.transformer_blocks[0].attn.to_q
    w0, b0 = base_weight(to_q), to_q.bias.detach().clone()
    sd = peft_lora(tmp_path / "style.safetensors")
    name = load_lora(t, tmp_path / "style.safetensors", scale=0.7)
    assert lora_names(t) == [name]
    lora_q = t.transformer_blocks[0].attn.to_q
    if fp8:
        assert isinstance(lora_q.base_layer, Fp8Linear), "the LoRA layer wraps the fp8 Linear"
        assert lora_q.base_layer.weight_u8.dtype == torch.uint8
    A, B = sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    x = torch.randn(3, H)
    with torch.no_grad():
        want = F.linear(x, w0 + 0.7 * (8.0 / R) * B @ A, b0)
        torch.testing.assert_close(lora_q(x), want, rtol=1e-4, atol=1e-5)
    with_lora = run(t)
    assert not torch.allclose(with_lora, base, atol=1e-4), "the LoRA changes the output"
    set_lora_scale(t, 0.35, name)
    half = run(t)
    assert not torch.allclose(half, with_lora, atol=1e-4), "the output follows the scale"
    set_lora_scale(t, 0.0)
    assert torch.equal(run(t), base), "scale 0 is the backbone exactly"
    unload_lora(t)
    assert lora_names(t) == [] and torch.equal(run(t), base)
    assert isinstance(t.transformer_blocks[0].attn.to_q, Fp8Linear if fp8 else torch.nn.Linear)


def test_whole_model_matches_merged_weights(tmp_path):
    t = tiny_transformer()
    sd = peft_lora(tmp_path / "a.safetensors", alpha=4.0)
    load_lora(t, tmp_path / "a.safetensors", scale=0.5)
    merged = tiny_transformer()
    for mod in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        lin = merged.get_submodule(mod)
        lin.weight += 0.5 * (4.0 / R) * sd[f"transformer.{mod}.lora_B.weight"] @ sd[f"transformer.{mod}.lora_A.weight"]
    torch.testing.assert_close(run(t), run(merged), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_kohya_lora_on_the_fused_qkv(tmp_path, fp8):
    t = tiny_transformer(fp8)
    sd = kohya_lora(tmp_path / "kohya.safetensors", alpha=2.0)
    ref = {n: (base_weight(t.transformer_blocks[0].attn.get_submodule(n)), t.transformer_blocks[0].attn.get_submodule(n).bias.clone())
           for n in ("to_q", "to_k", "to_v")}
    load_lora(t, tmp_path / "kohya.safetensors", scale=1.5, adapter_name="kohya")
    down, up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    x = torch.randn(2, H)
    for j, n in enumerate(("to_q", "to_k", "to_v")):
        w, b = ref[n]
        want = F.linear(x, w + 1.5 * (2.0 / R) * up[j * H:(j + 1) * H] @ down, b)
        with torch.no_grad():
            torch.testing.assert_close(t.transformer_blocks[0].attn.get_submodule(n)(x), want, rtol=1e-4, atol=1e-5, msg=n)


def test_two_loras_and_bad_input(tmp_path):
    t = tiny_transformer()
    peft_lora(tmp_path / "a.safetensors")
    kohya_lora(tmp_path / "b.safetensors")
    a = load_lora(t, tmp_path / "a.safetensors")
    b = load_lora(t, tmp_path / "b.safetensors", scale=0.5)
    assert lora_names(t) == [a, b] and a != b
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(t, tmp_path / "a.safetensors", adapter_name=a)
    with pytest.raises(ValueError, match="no adapter named"):
        set_lora_scale(t, 1.0, "nope")
    with pytest.raises(ValueError, match="finite"):
        set_lora_scale(t, float("nan"))
    with pytest.raises(FileNotFoundError, match="--lora"):
        load_lora(t, tmp_path / "missing.safetensors")
    (tmp_path / "x.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_lora(t, tmp_path / "x.bin")
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no FLUX transformer LoRA"):
        load_lora(t, tmp_path / "other.safetensors")
