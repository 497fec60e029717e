import json

import torch

from idflux.bench_perf import harness


def test_mode_fns_time_and_rows(tmp_path):
    x = torch.randn(64, 64, requires_grad=True)
    fns = harness.mode_fns(lambda: (x @ x).sum(), [x])
    assert set(fns) == set(harness.MODES)
    grads = fns["fwd+bwd"]()
    torch.testing.assert_close(grads[0], (x @ x).new_ones(64, 64) @ x.T + x.T @ x.new_ones(64, 64))
    cases = [harness.Case("toy", p, m, {"n": 64}, "fp32", f, flops=2 * 64**3) for p in ("a", "b") for m, f in fns.items()]
    rows = harness.run_cases(cases, torch.device("cpu"), budget_s=0.0, log=lambda s: None)
    assert len(rows) == 6 and all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    summary = harness.speedups(rows, [("a", "b")])
    assert len(summary) == 3 and all(s["speedup"] > 0 for s in summary)
    path = tmp_path / "r.json"
    harness.write_results(path, rows, summary)
    assert json.loads(path.read_text())["rows"][0]["op"] == "toy"


def test_failing_case_becomes_an_error_row():
    def boom():
        raise RuntimeError("nope")

    rows = harness.run_cases([harness.Case("toy", "x", "fwd", {}, "fp32", boom)], torch.device("cpu"), log=lambda s: None)
    assert rows[0]["ms"] is None and "nope" in rows[0]["error"]


def test_time_limited_stops_starting_cases():
    import time

    def slow():
        for i in range(10):
            yield harness.Case("toy", "p", "fwd", {"i": i}, "fp32", lambda: None)
            time.sleep(0.05)

    seen = list(harness.time_limited(slow(), 0.12, log=lambda s: None))
    assert 1 < len(seen) < 10


def test_sweep_that_fails_to_build_ends_with_an_error_row():
    def broken():
        yield harness.Case("toy", "p", "fwd", {}, "fp32", lambda: None)
        raise ImportError("no diffusers here")

    rows = harness.run_cases(broken(), torch.device("cpu"), budget_s=0.0, log=lambda s: None)
    assert rows[0]["ms"] > 0 and rows[1]["provider"] == "setup" and "no diffusers" in rows[1]["error"]


def test_device_speedups_use_graph_times_and_skip_rows_without_them():
    from idflux.bench_perf import harness

    base = {"op": "x", "mode": "fwd", "shape": {"n": 1}, "dtype": "fp32"}
    rows = [
        {**base, "provider": "ours", "ms": 2.0, "ms_device": 0.1},
        {**base, "provider": "theirs", "ms": 4.0, "ms_device": 0.5},
        {**base, "provider": "eager_only", "ms": 1.0},
    ]
    eager = harness.speedups(rows, [("ours", "theirs"), ("eager_only", "theirs")])
    device = harness.speedups(rows, [("ours", "theirs"), ("eager_only", "theirs")], key="ms_device")
    assert {(s["provider"], round(s["speedup"], 6)) for s in eager} == {("ours", 2.0), ("eager_only", 4.0)}
    assert [(s["provider"], round(s["speedup"], 6)) for s in device] == [("ours", 5.0)]


def test_graph_timing_needs_cuda():
    import pytest
    import torch

    from idflux.bench_perf import harness

    with pytest.raises(ValueError, match="CUDA"):
        harness.graph_time_fn(lambda: None, torch.device("cpu"))


def test_cpu_rows_have_no_device_time():
    import torch

    from idflux.bench_perf import harness

    case = harness.Case("x", "p", "fwd", {"n": 1}, "fp32", lambda: torch.ones(3).sum(), graph=True)
    (row,) = harness.run_cases([case], torch.device("cpu"), budget_s=0.01, log=lambda s: None)
    assert row["ms"] > 0 and "ms_device" not in row and "graph_error" not in row
