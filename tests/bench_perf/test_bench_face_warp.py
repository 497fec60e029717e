from itertools import islice

import torch

from idflux.bench_perf import bench_face_warp, harness


def test_bench_face_warp_runs_two_cases():
    rows = harness.run_cases(islice(bench_face_warp.cases(torch.device("cpu"), quick=True), 2), torch.device("cpu"),
                             budget_s=0.0, log=lambda s: None)
    assert len(rows) == 2 and all(r["op"] == "face_warp" and r["ms"] > 0 and r["gbps"] > 0 for r in rows), rows
    assert {r["mode"] for r in rows} == {"fwd", "bwd"}
    providers = {p for pair in bench_face_warp.SUMMARY for p in pair}
    assert {"ref", "triton", "triton_nocheck", "triton_scatter_bwd", "grad_write", "grid_sample_bicubic",
            "grid_sample_bilinear", "kornia"} == providers
