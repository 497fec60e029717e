"""pytest-benchmark rows for the CPU paths of the three ops and one adapter block (fwd and fwd+bwd),
at small shapes: ``pytest tests/bench --benchmark-only`` (add ``--benchmark-autosave`` /
``--benchmark-compare`` to keep and compare histories). Each benchmark also checks its result."""

import pytest
import torch

from idflux.bench_perf.bench_region_attention import quadrant_boxes
from idflux.engine.regions import boxes_to_membership

pytest.importorskip("pytest_benchmark")


def _region_inputs():
    g = torch.Generator().manual_seed(0)
    membership = boxes_to_membership([quadrant_boxes(256, 4, 0.3)], 256, 256)
    offsets = (torch.arange(5) * 8).view(1, -1)
    q = torch.randn(1, 4, membership.shape[1], 32, generator=g, requires_grad=True)
    k = torch.randn(1, 4, 32, 32, generator=g, requires_grad=True)
    v = torch.randn(1, 4, 32, 32, generator=g, requires_grad=True)
    return q, k, v, membership, offsets


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_region_attention_ref(benchmark, mode):
    from idflux.kernels import region_attention

    q, k, v, membership, offsets = _region_inputs()

    def run():
        with torch.set_grad_enabled(mode != "fwd"):
            out = region_attention(q, k, v, membership, offsets, backend="torch")
            if mode != "fwd":
                out.sum().backward()
        return out

    out = benchmark(run)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_cosine_infonce_ref(benchmark, mode):
    from idflux.kernels import cosine_infonce

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 128, generator=g, requires_grad=True)
    pos, bank = torch.randn(16, 128, generator=g), torch.randn(1024, 128, generator=g)
    idx = torch.randint(0, 1024, (16, 256), generator=g)

    def run():
        with torch.set_grad_enabled(mode != "fwd"):
            loss = cosine_infonce(emb, pos, bank, neg_index=idx, backend="torch")
            if mode != "fwd":
                loss.backward()
        return loss

    assert torch.isfinite(benchmark(run))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_face_warp_ref(benchmark, mode):
    from idflux.bench_perf.bench_face_warp import CROP, FACES_PER_IMAGE, random_faces
    from idflux.kernels import face_warp

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(1, 3, 256, 256, generator=g) * 2 - 1).requires_grad_()
    lmk, index = random_faces(1, 256, 256, FACES_PER_IMAGE, g)

    def run():
        with torch.set_grad_enabled(mode != "fwd"):
            out = face_warp(images, lmk, index, size=CROP, interpolation="bicubic", backend="torch")
            if mode != "fwd":
                out.sum().backward()
        return out

    out = benchmark(run)
    assert out.shape == (lmk.shape[0], 3, CROP, CROP)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_adapter_block(benchmark, mode):
    from idflux.engine.adapter import IdentityAdapter, RegionLayout, tiny_adapter

    cfg = tiny_adapter()
    adapter = IdentityAdapter(cfg)
    membership = boxes_to_membership([quadrant_boxes(256, 2, 0.3)], 256, 256)
    layout = RegionLayout.from_membership(membership, 2)
    img = torch.randn(1, membership.shape[1], cfg.hidden, requires_grad=True)
    arc = torch.randn(1, 2, cfg.arc_dim)
    sig = torch.randn(1, 2, cfg.siglip_tokens, cfg.siglip_dim)
    with torch.no_grad():
        ctx = adapter.prepare(arc, sig, layout, backend="torch")

    def run():
        with torch.set_grad_enabled(mode != "fwd"):
            out = adapter.apply(0, img, ctx)
            if mode != "fwd":
                out.sum().backward()
        return out

    out = benchmark(run)
    assert out.shape == img.shape
