from itertools import islice

import torch

from idflux.bench_perf import harness
from idflux.bench_perf.bench_adapter import SUMMARY, cases


def test_adapter_bench_rows_and_providers_agree():
    rows = harness.run_cases(islice(cases(torch.device("cpu"), quick=True), 6), torch.device("cpu"), budget_s=0.0, log=lambda s: None)
    assert {r["provider"] for r in rows} == {"ours", "ours+prepare", "released"}
    assert all(r["ms"] > 0 for r in rows)
    assert ("ours", "released") in SUMMARY
