import pytest
import torch

pytest.importorskip("diffusers")

from idflux.bench_perf import harness  # noqa: E402
from idflux.bench_perf.bench_sample import cases  # noqa: E402


def test_sample_bench_rows():
    rows = harness.run_cases(list(cases(torch.device("cpu")))[:2], torch.device("cpu"), budget_s=0.0, log=lambda s: None)
    assert [r["provider"] for r in rows] == ["no_adapter", "adapter"] and all(r["ms"] > 0 for r in rows)
