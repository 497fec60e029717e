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


def _row(provider, mode="fwd+bwd", *, ms, ms_device=None, gbps=None, mem=None, shape=None, dtype="bf16", device="cuda"):
    return {"op": "x", "provider": provider, "mode": mode, "shape": shape or {"n": 1}, "dtype": dtype, "device": device,
            "ms": ms, "ms_device": ms_device, "gbps": gbps, "peak_mem_mb": mem}


def test_goal_report_judges_each_metric_on_both_times():
    G = harness.Goal
    rows = [
        _row("ours", ms=2.0, ms_device=0.1, gbps=10.0, mem=1.0),
        _row("released", ms=4.0, ms_device=1.5, mem=300.0),
        _row("copy", "fwd", ms=1.0, ms_device=0.5, gbps=100.0),
        _row("ours", ms=1.0, shape={"n": 2}),  # no baseline on this case: not reported
    ]
    goals = [
        G(1, "2x", "x", "ours", "released", "fwd+bwd", "speedup", 2.0),
        G(1, "20x", "x", "ours", "released", "fwd+bwd", "speedup", 20.0),
        G(1, "slow", "x", "ours", "released", "fwd+bwd", "slowdown", 0.4),
        G(1, "mem", "x", "ours", "released", "fwd+bwd", "memory", 100.0),
        G(1, "bw", "x", "ours", "copy", "fwd+bwd", "bandwidth", 0.7, baseline_mode="fwd"),
        G(1, "fp32 only", "x", "ours", "released", "fwd+bwd", "speedup", 1.0, (("dtype", "fp32"),)),
    ]
    report = {e["goal"]: e for e in harness.goal_report(rows, goals)}
    assert set(report) == {"2x", "20x", "slow", "mem", "bw"}, "the dtype filter drops the last goal"
    assert (report["2x"]["value"], report["2x"]["met"]) == (2.0, True)
    assert report["2x"]["value_device"] == 15.0 and report["2x"]["met_device"] is True
    assert report["20x"]["met"] is False and report["20x"]["met_device"] is False
    assert report["slow"]["value"] == 0.5 and report["slow"]["met"] is False
    assert abs(report["slow"]["value_device"] - 0.1 / 1.5) < 1e-12 and report["slow"]["met_device"] is True
    assert report["mem"]["value"] == 300.0 and report["mem"]["met"] and report["mem"]["value_device"] is None
    # bandwidth: 10 GB/s at 2 ms is 20 MB; over 0.1 ms device time 200 GB/s, against the copy's 200 GB/s at 0.5 ms
    assert abs(report["bw"]["value"] - 0.1) < 1e-12 and report["bw"]["met"] is False
    assert abs(report["bw"]["value_device"] - 1.0) < 1e-12 and report["bw"]["met_device"] is True
    lines = harness.goal_lines(list(report.values()))
    assert any("NOT MET" in line for line in lines) and all(line.startswith("#1 ") for line in lines)


def test_goal_with_an_unknown_metric_is_a_clear_error():
    import pytest

    bad = harness.Goal(1, "?", "x", "ours", "released", "fwd", "fastness", 1.0)
    with pytest.raises(ValueError, match="Goal.metric"):
        harness.goal_report([], [bad])


def test_every_bench_module_states_its_issue_goals_on_its_own_providers():
    import importlib
    import inspect

    from idflux.cli import OPS

    issues = set()
    for op in OPS:
        module = importlib.import_module(f"idflux.bench_perf.bench_{op}")
        source = inspect.getsource(module)
        for goal in module.GOALS:
            assert goal.op == module.OP and goal.metric in ("speedup", "slowdown", "bandwidth", "memory")
            for name in (goal.provider, goal.baseline):
                assert f'"{name}"' in source, f"{op}: goal names provider {name!r} that the module never yields"
            issues.add(goal.issue)
    assert issues == {3, 4, 5, 6, 7, 16}


def test_goal_report_on_the_committed_cpu_run():
    """The adapter goal, judged on the committed CPU results (rows measured in one run)."""
    from pathlib import Path

    from idflux.bench_perf import bench_adapter

    path = Path(__file__).resolve().parents[2] / "idflux/bench_perf/results/cpu_x86_64_2cpu_2026-12-01.json"
    rows = harness.load_results(path)["rows"]
    report = harness.goal_report(rows, bench_adapter.GOALS)
    assert {e["mode"] for e in report} == {"fwd", "fwd+bwd"}
    by_mode = {e["mode"]: e for e in report}
    for mode, e in by_mode.items():
        ours = next(r for r in rows if r["op"] == "adapter" and r["provider"] == "ours" and r["mode"] == mode)
        released = next(r for r in rows if r["op"] == "adapter" and r["provider"] == "released" and r["mode"] == mode)
        assert abs(e["value"] - released["ms"] / ours["ms"]) < 1e-9 and e["met"] == (e["value"] >= 3.0)
