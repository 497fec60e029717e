import math

import pytest
import torch

pytest.importorskip("diffusers")  # absent on the GPU-suite machine; required on CPU runs (test_environment)

from idflux.engine.adapter import IdentityAdapter, RegionLayout, tiny_adapter
from idflux.engine.flux import flux_forward, image_ids, pack_latents, tiny_flux_transformer, unpack_latents
from idflux.engine.regions import boxes_to_membership
from idflux.engine.sampling import euler_sample, flux_mu, sampling_mu, schedule, time_shift


def test_time_shift_values_at_512_and_1024():
    assert sampling_mu(512, 512) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)      # 0.63
    assert sampling_mu(1024, 1024) == pytest.approx(1.15)
    assert sampling_mu(1024, 1024, released_parity=True) == pytest.approx(0.5 + 0.65 * (64 - 256) / 3840)  # ~0.4675
    mu = sampling_mu(1024, 1024)
    t = torch.tensor([1.0, 0.5, 0.0])
    want = [1.0, math.exp(mu) / (math.exp(mu) + 1.0), 0.0]
    assert time_shift(mu, t).tolist() == pytest.approx(want)
    s = schedule(25, mu)
    assert s[0] == 1.0 and s[-1] == 0.0 and (s[1:] < s[:-1]).all()
    assert flux_mu(256) == pytest.approx(0.5)


def test_euler_integrates_a_linear_flow_exactly():
    x1 = torch.randn(2, 5)
    x0 = torch.randn(2, 5)
    out = euler_sample(lambda x, t: x1 - x0, x1, schedule(7, 0.8), progress=False)  # x_t = (1-t) x0 + t x1
    torch.testing.assert_close(out, x0)


def test_pack_unpack_round_trip_and_ids():
    lat = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(lat)
    assert tokens.shape == (2, 12, 16)
    torch.testing.assert_close(unpack_latents(tokens, 6, 8), lat)
    ids = image_ids(3, 4)
    assert ids[5].tolist() == [0, 1, 1]


def test_flux_forward_matches_diffusers_without_adapter_and_adapter_changes_only_boxes():
    flux = tiny_flux_transformer().eval()
    B, grid = 2, 4
    x = torch.randn(B, grid * grid, 16)
    txt = torch.randn(B, 5, 32)
    pooled = torch.randn(B, 16)
    t = torch.full((B,), 0.7)
    g = torch.full((B,), 4.0)
    ids, tids = image_ids(grid, grid), torch.zeros(5, 3)
    with torch.no_grad():
        ours = flux_forward(flux, x, txt, pooled, t, ids, tids, g)
        theirs = flux(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t, img_ids=ids,
                      txt_ids=tids, guidance=g, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs)
    adapter = IdentityAdapter(tiny_adapter())
    for blk in [*adapter.arc_blocks, *adapter.sig_blocks]:
        torch.nn.init.zeros_(blk.to_out.weight)
    membership = boxes_to_membership([[(0, 0, 32, 32)], [(16, 16, 64, 64)]], 64, 64)
    cfg = adapter.cfg
    ctx = adapter.prepare(torch.randn(B, 1, cfg.arc_dim), torch.randn(B, 1, cfg.siglip_tokens, cfg.siglip_dim),
                          RegionLayout.from_membership(membership, 1), backend="torch")
    with torch.no_grad():
        zero_out = flux_forward(flux, x, txt, pooled, t, ids, tids, g, adapter=adapter, adapter_ctx=ctx)
    torch.testing.assert_close(zero_out, theirs, msg="adapter with zero to_out must leave FLUX unchanged")


def test_denoising_step_with_the_adapter_never_syncs_with_the_host():
    """After the layout's first call, a whole FLUX evaluation with the adapter (Triton region
    attention, interpreted here) issues no device->host sync: it can be captured in a CUDA graph."""
    from idflux.kernels._backend import INTERPRET

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    from sync_probe import host_syncs

    flux = tiny_flux_transformer().eval()
    B, grid = 2, 4
    x, txt, pooled = torch.randn(B, grid * grid, 16), torch.randn(B, 5, 32), torch.randn(B, 16)
    t, g = torch.full((B,), 0.7), torch.full((B,), 4.0)
    ids, tids = image_ids(grid, grid), torch.zeros(5, 3)
    adapter = IdentityAdapter(tiny_adapter())
    cfg = adapter.cfg
    layout = RegionLayout.from_membership(boxes_to_membership([[(0, 0, 32, 32)], [(16, 16, 64, 64)]], 64, 64), 1)
    ctx = adapter.prepare(torch.randn(B, 1, cfg.arc_dim), torch.randn(B, 1, cfg.siglip_tokens, cfg.siglip_dim), layout,
                          backend="triton")
    step = lambda: flux_forward(flux, x, txt, pooled, t, ids, tids, g, adapter=adapter, adapter_ctx=ctx)  # noqa: E731
    with torch.no_grad():
        step()  # first sight of the layout
        assert host_syncs(step) == []


def test_released_shift_floor_divides_the_token_count_off_the_128_grid():
    # 720^2: (90 * 90) / 256 = 31.64 tokens, the released inference floor-divides to 31
    assert sampling_mu(720, 720, released_parity=True) == pytest.approx(flux_mu(31))
    assert sampling_mu(720, 720, released_parity=True) != pytest.approx(flux_mu(8100 / 256))
    assert sampling_mu(720, 1280, released_parity=True) == pytest.approx(flux_mu(90 * 160 // 256))  # 56, not 56.25
    assert sampling_mu(720, 1280) == pytest.approx(flux_mu(45 * 80))
    with pytest.raises(ValueError, match="multiples of 16"):
        sampling_mu(720, 1000)


def test_non_square_boxes_map_to_the_right_tokens():
    from idflux.engine.regions import parse_boxes

    H, W = 32, 64  # 2 x 4 tokens
    boxes = parse_boxes([(32, 0, 64, 32), (0, 0, 0.25, 1.0)], 2, H, W)
    assert boxes == [(32, 0, 64, 32), (0, 0, 0.25, 1.0)]  # not all within 0..1: every box in pixels
    membership = boxes_to_membership([parse_boxes([(32, 0, 64, 16)], 1, H, W)], H, W).view(2, 4)
    assert membership.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    normalised = boxes_to_membership([parse_boxes([(0, 0.5, 0.25, 1.0)], 1, H, W)], H, W).view(2, 4)
    assert normalised.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    whole = boxes_to_membership([parse_boxes(None, 3, H, W)], H, W)
    assert (whole == 0b111).all(), "boxes=None: every reference on every token"
    with pytest.raises(ValueError, match="non-finite"):
        parse_boxes([(0, 0, float("inf"), float("inf"))], 1, H, W)
