from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from idflux.engine.adapter import IdentityAdapter, RegionLayout, flux_dev_adapter, ours_to_released, released_to_ours, tiny_adapter
from idflux.engine.regions import boxes_to_membership
from idflux.engine.weights import load_adapter, load_released_adapter, released_state_dict_shapes, save_adapter
from idflux.kernels._backend import INTERPRET

FIXTURE = Path(__file__).parents[1] / "data" / "withanyone_adapter_keys.tsv"


def released_fixture():
    rows = [line.split("\t") for line in FIXTURE.read_text().splitlines() if line and not line.startswith("#")]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in rows}


def test_full_size_adapter_matches_released_names_and_shapes_on_meta():
    with torch.device("meta"):
        adapter = IdentityAdapter(flux_dev_adapter())
    ours = released_state_dict_shapes(adapter)
    want = released_fixture()
    assert len(want) == 816
    assert set(ours) == set(want), f"missing {sorted(set(want) - set(ours))[:5]}, extra {sorted(set(ours) - set(want))[:5]}"
    assert {k: v for k, v in ours.items() if want[k] != v} == {}
    assert sum(p.numel() for p in adapter.parameters()) == sum(torch.Size(s).numel() for s in want.values())


def test_name_mapping_round_trip():
    for name in released_fixture():
        assert ours_to_released(released_to_ours(name)) == name
    assert released_to_ours("siglip_in_arc.0.weight") is None
    with pytest.raises(KeyError):
        released_to_ours("double_blocks.0.img_attn.qkv.weight")


def make_inputs(cfg, B=2, size=64, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    boxes = [[(0, 0, 40, 40), (20, 10, 64, 50)], [(16, 16, 48, 64), (0, 0, 1, 1)]]
    membership = boxes_to_membership(boxes, size, size)
    N = membership.shape[1]
    img = torch.randn(B, N, cfg.hidden, generator=g, dtype=dtype)
    arc = torch.randn(B, 2, cfg.arc_dim, generator=g, dtype=dtype)
    sig = torch.randn(B, 2, cfg.siglip_tokens, cfg.siglip_dim, generator=g, dtype=dtype)
    return img, arc, sig, membership


def randomize(adapter):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return adapter


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_in_box_path_equals_dense_mask_formulation(backend):
    if backend == "triton" and not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    cfg = tiny_adapter()
    dtype = torch.float64 if backend == "torch" else torch.float32
    adapter = randomize(IdentityAdapter(cfg)).to(dtype)
    img, arc, sig, membership = make_inputs(cfg, dtype=dtype)
    layout = RegionLayout.from_membership(membership, n_refs=2)
    ctx = adapter.prepare(arc, sig, layout, id_weight=0.7, siglip_weight=1.3, backend=backend)
    img_p = img.clone().requires_grad_()
    img_d = img.clone().requires_grad_()
    for i in range(cfg.n_blocks):
        out_p = adapter.apply(i, img_p, ctx)
        out_d = adapter.apply_dense(i, img_d, arc, sig, membership, id_weight=0.7, siglip_weight=1.3)
        tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out_p, out_d, **tol, msg=f"block {i}")
    outside = membership == 0
    assert torch.equal(out_p[outside], img[outside]), "tokens outside every box must be untouched"
    g = torch.randn_like(out_p)
    gp = torch.autograd.grad(out_p, [img_p, *adapter.parameters()], g, allow_unused=True)
    gd = torch.autograd.grad(out_d, [img_d, *adapter.parameters()], g, allow_unused=True)
    for (name, _), a, b in zip([("img", None), *adapter.named_parameters()], gp, gd):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0), name
            continue
        torch.testing.assert_close(a, b, atol=1e-9 if dtype == torch.float64 else 1e-4, rtol=1e-4, msg=name)


def test_zero_output_weights_leave_image_unchanged():
    cfg = tiny_adapter()
    adapter = randomize(IdentityAdapter(cfg)).double()
    for blk in [*adapter.arc_blocks, *adapter.sig_blocks]:
        torch.nn.init.zeros_(blk.to_out.weight)
    img, arc, sig, membership = make_inputs(cfg)
    ctx = adapter.prepare(arc, sig, RegionLayout.from_membership(membership, 2), backend="torch")
    assert torch.equal(adapter.apply(0, img, ctx), img)


def fake_released_file(adapter, path, extra=None, drop=None, reshape=None):
    tensors = {ours_to_released(k): v.clone() for k, v in adapter.state_dict().items()}
    tensors["siglip_in_arc.0.weight"] = torch.zeros(3, 3)  # training-only key: skipped by name
    if drop:
        tensors.pop(drop)
    if reshape:
        tensors[reshape] = torch.zeros(1, 1)
    tensors.update(extra or {})
    save_file(tensors, str(path))


def test_load_released_checkpoint_strict(tmp_path):
    src = randomize(IdentityAdapter(tiny_adapter()))
    fake_released_file(src, tmp_path / "ok.safetensors")
    dst = IdentityAdapter(tiny_adapter())
    info = load_released_adapter(dst, tmp_path / "ok.safetensors")
    assert info["skipped"] == ["siglip_in_arc.0.weight"]
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    fake_released_file(src, tmp_path / "missing.safetensors", drop="ipa_sig.1.to_q.weight")
    with pytest.raises(ValueError, match=r"1 missing.*ipa_sig.1.to_q.weight"):
        load_released_adapter(dst, tmp_path / "missing.safetensors")
    fake_released_file(src, tmp_path / "unknown.safetensors", extra={"double_blocks.0.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="1 unknown"):
        load_released_adapter(dst, tmp_path / "unknown.safetensors")
    fake_released_file(src, tmp_path / "shape.safetensors", reshape="ipa_arc.0.to_kv.weight")
    with pytest.raises(ValueError, match="wrong shapes.*ipa_arc.0.to_kv.weight"):
        load_released_adapter(dst, tmp_path / "shape.safetensors")
    with pytest.raises(FileNotFoundError, match="WithAnyone/WithAnyone"):
        load_released_adapter(dst, tmp_path / "absent.safetensors")


def test_save_load_our_adapter(tmp_path):
    src = randomize(IdentityAdapter(tiny_adapter()))
    save_adapter(src, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors.tmp").exists()
    dst = load_adapter(tmp_path / "a.safetensors")
    assert dst.cfg == src.cfg
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    fake_released_file(src, tmp_path / "released.safetensors")
    with pytest.raises(ValueError, match="not an idflux adapter"):
        load_adapter(tmp_path / "released.safetensors")


def _triton_fp32_case():
    """(cfg, randomised fp32 tiny adapter, make_inputs) for the Triton-path sync tests."""
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    cfg = tiny_adapter()
    return cfg, randomize(IdentityAdapter(cfg)).float(), make_inputs(cfg, dtype=torch.float32)


def test_denoising_steps_never_sync_with_the_host():
    """Per generation, RegionLayout and the first region_attention call of each layout read values
    back once; every adapter application after that (all blocks, both branches, every step,
    forward and backward) runs without a host sync, so the step can be captured in a CUDA graph."""
    from sync_probe import assert_no_host_sync

    cfg, adapter, (img, arc, sig, membership) = _triton_fp32_case()
    layout = RegionLayout.from_membership(membership, n_refs=2)
    ctx = adapter.prepare(arc, sig, layout, backend="triton")
    x = img.clone().requires_grad_()
    adapter.apply(0, x, ctx)  # first sight of the layout

    def steps():
        out = x
        for _ in range(2):
            for i in range(cfg.n_blocks):
                out = adapter.apply(i, out, ctx)
        torch.autograd.grad(out.sum(), [x, *adapter.parameters()], allow_unused=True)

    assert_no_host_sync(steps)


def test_a_layout_built_on_the_host_needs_no_read_back_at_all():
    """Training builds each step's layout on the host (RegionLayout.to): prepare checks the host
    copies, so even the first application of the step's new layout runs without a host sync, and
    the host can queue the step ahead of the GPU."""
    from sync_probe import assert_no_host_sync

    cfg, adapter, (img, arc, sig, membership) = _triton_fp32_case()
    host = RegionLayout.from_membership(membership, n_refs=2)
    assert host.to(membership.device) is host, "already there: no copy"
    # the device copy as RegionLayout.to makes it (on this machine the "device" is the CPU)
    layout = RegionLayout(*(t.clone() for t in (host.membership, host.b_idx, host.t_idx, host.packed_membership)),
                          host.n_refs, host.rows.clone(), host=host)
    ctx = adapter.prepare(arc, sig, layout, backend="triton")
    x = img.clone().requires_grad_()
    assert_no_host_sync(lambda: torch.autograd.grad(adapter.apply(0, x, ctx).sum(), [x]))
    ref_ctx = adapter.prepare(arc, sig, host, backend="triton")
    torch.testing.assert_close(adapter.apply(0, img, ctx), adapter.apply(0, img, ref_ctx))


def test_adapter_block_compiles_without_graph_breaks():
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    cfg = tiny_adapter()
    adapter = randomize(IdentityAdapter(cfg)).float()
    img, arc, sig, membership = make_inputs(cfg, dtype=torch.float32)
    ctx = adapter.prepare(arc, sig, RegionLayout.from_membership(membership, n_refs=2), backend="triton")
    eager = adapter.apply(1, img, ctx)  # validates the layout (a compiled graph skips value checks)
    compiled = torch.compile(lambda x: adapter.apply(1, x, ctx), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(img), eager, atol=1e-5, rtol=1e-5)


def test_region_layout_groups_tokens_by_image_and_pattern():
    membership = boxes_to_membership([[(0, 0, 40, 40), (24, 24, 64, 64)], [(16, 0, 48, 32), (0, 0, 16, 16)]], 64, 64)
    layout = RegionLayout.from_membership(membership, 2)
    b, t, pm = layout.b_idx, layout.t_idx, layout.packed_membership
    assert sorted(zip(b.tolist(), t.tolist())) == sorted(map(tuple, (membership != 0).nonzero().tolist()))
    assert torch.equal(pm, membership[b, t])
    keys = list(zip(b.tolist(), pm.tolist(), t.tolist()))
    assert keys == sorted(keys), "tokens must be ordered by image, then pattern, then grid position"
    assert torch.equal(layout.rows, b * membership.shape[1] + t)
    assert {3} <= set(pm[b == 0].tolist()), "the overlap of image 0's boxes is its own group"


def test_fused_residual_equals_module_calls_and_respects_hooks():
    """apply() merges the SigLIP branch's to_out into one addmm; with a hooked to_out (LoRA, sharding,
    profilers wrap modules this way) it calls the module, and both give the same residual."""
    cfg = tiny_adapter()
    torch.manual_seed(0)
    adapter = IdentityAdapter(cfg).double()
    membership = boxes_to_membership([[(0, 0, 32, 32), (16, 16, 64, 64)]], 64, 64)
    layout = RegionLayout.from_membership(membership, 2)
    arc, sig = torch.randn(1, 2, cfg.arc_dim, dtype=torch.float64), torch.randn(1, 2, cfg.siglip_tokens, cfg.siglip_dim, dtype=torch.float64)
    ctx = adapter.prepare(arc, sig, layout, id_weight=0.7, siglip_weight=1.3, backend="torch")
    img = torch.randn(1, membership.shape[1], cfg.hidden, dtype=torch.float64)
    fused = adapter.apply(0, img, ctx)
    x = img[0, layout.t_idx]
    blk_a, blk_s = adapter.arc_blocks[0], adapter.sig_blocks[0]
    want = img.clone()
    want[0, layout.t_idx] += 0.7 * blk_a(x, ctx["arc"][0], layout, ctx["arc_offsets"], backend="torch") \
        + 1.3 * blk_s(x, ctx["sig"][0], layout, ctx["sig_offsets"], backend="torch")
    torch.testing.assert_close(fused, want)
    calls = []
    handle = blk_s.to_out.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    hooked = adapter.apply(0, img, ctx)
    handle.remove()
    assert calls == [1], "a hooked to_out runs as a module"
    want[0, layout.t_idx] += 1.3 * blk_s(x, ctx["sig"][0], layout, ctx["sig_offsets"], backend="torch")
    torch.testing.assert_close(hooked, want)
