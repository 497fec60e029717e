"""bench_cosine_infonce: the first CPU cases run through the harness and give positive times."""

from itertools import islice

import torch

from idflux.bench_perf import harness
from idflux.bench_perf.bench_cosine_infonce import SUMMARY, cases


def test_bench_cosine_infonce_runs_two_cases():
    device = torch.device("cpu")
    rows = harness.run_cases(islice(cases(device, quick=True), 2), device, budget_s=0.05, log=lambda s: None)
    assert len(rows) == 2
    for row in rows:
        assert row.get("error") is None, f"{row['provider']} {row['mode']}: {row.get('error')}"
        assert row["op"] == "cosine_infonce" and row["ms"] > 0, f"time of {row['provider']} {row['mode']}"
        assert row["ms_p20"] <= row["ms"] <= row["ms_p80"], f"quantiles of {row['provider']} {row['mode']}"
    assert {r["mode"] for r in rows} == {"fwd", "bwd"}
    assert rows[0]["gbps"] > 0 and rows[0]["tflops"] > 0, "fwd row records its work"
    assert all(p in ("ref", "triton", "triton_nocheck") and b in ("gathered_ce", "compile_ref") for p, b in SUMMARY)


def test_bench_cosine_infonce_full_cpu_sweep_builds_cases_without_cuda_providers():
    device = torch.device("cpu")
    seen = {(c.provider, c.mode) for c in cases(device, quick=True)}
    assert seen == {(p, m) for p in ("ref", "gathered_ce") for m in harness.MODES}, seen


def test_gathered_ce_baseline_computes_the_same_loss():
    from idflux.bench_perf.bench_cosine_infonce import gathered_ce
    from idflux.kernels.cosine_infonce_ref import cosine_infonce_ref

    g, pos, bank = torch.randn(5, 32), torch.randn(5, 32), torch.randn(40, 32)
    idx = torch.randint(0, 40, (5, 17))
    torch.testing.assert_close(gathered_ce(g, pos, bank, idx, tau=0.1),
                               cosine_infonce_ref(g, pos, bank, neg_index=idx, tau=0.1), msg="gathered_ce loss")
