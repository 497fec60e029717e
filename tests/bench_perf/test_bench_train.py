import pytest
import torch

pytest.importorskip("diffusers")

from idflux.bench_perf import harness  # noqa: E402
from idflux.bench_perf.bench_train import cases  # noqa: E402


def test_train_step_bench_rows():
    rows = harness.run_cases(cases(torch.device("cpu"), quick=True), torch.device("cpu"), budget_s=0.0, log=lambda s: None)
    assert [r["provider"] for r in rows] == ["ours", "released"] and all(r["ms"] > 0 for r in rows), rows
