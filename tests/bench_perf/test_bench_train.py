import pytest
import torch

pytest.importorskip("diffusers")

from idflux.bench_perf import harness  # noqa: E402
from idflux.bench_perf.bench_train import _ReleasedAdapter, cases  # noqa: E402


def test_train_step_bench_rows():
    rows = harness.run_cases(cases(torch.device("cpu"), quick=True), torch.device("cpu"), budget_s=0.0, log=lambda s: None)
    assert [r["provider"] for r in rows] == ["ours", "released", "released+loops"] and all(r["ms"] > 0 for r in rows), rows


@pytest.mark.parametrize("loops", [False, True])
def test_released_formulations_compute_what_ours_computes(loops):
    from idflux.engine.adapter import IdentityAdapter, RegionLayout, tiny_adapter
    from idflux.engine.regions import boxes_to_membership

    g = torch.Generator().manual_seed(0)
    cfg = tiny_adapter()
    ours = IdentityAdapter(cfg).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    membership = boxes_to_membership([[(0, 0, 40, 40), (20, 10, 64, 50)], [(16, 16, 48, 64), (0, 0, 1, 1)]], 64, 64)
    layout = RegionLayout.from_membership(membership, 2)
    img = torch.randn(2, membership.shape[1], cfg.hidden, generator=g, dtype=torch.float64)
    arc = torch.randn(2, 2, cfg.arc_dim, generator=g, dtype=torch.float64)
    sig = torch.randn(2, 2, cfg.siglip_tokens, cfg.siglip_dim, generator=g, dtype=torch.float64)
    released = _ReleasedAdapter(ours, loops=loops)
    ctx_ours, ctx_rel = ours.prepare(arc, sig, layout, backend="torch"), released.prepare(arc, sig, layout)
    for i in range(cfg.n_blocks):
        torch.testing.assert_close(released.apply(i, img, ctx_rel), ours.apply(i, img, ctx_ours), msg=f"block {i}")
