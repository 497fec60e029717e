"""bench compare (table, --fail-below), the xformers row without xformers, the profile trace, suite order."""

import json
import sys

import torch

from idflux.bench_perf import harness


def _doc(ms):
    rows = [{"op": "x", "provider": "p", "mode": "fwd", "shape": {"n": 1}, "dtype": "fp32", "ms": ms, "ms_p20": ms * 0.9,
             "ms_p80": ms * 1.1, "device_name": "cpu", "torch": "t", "commit": "c"}]
    return {"created": "now", "rows": rows}


def test_compare_table_and_fail_below(tmp_path, capsys):
    from idflux.cli import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc(2.0)))
    b.write_text(json.dumps(_doc(4.0)))
    assert main(["bench", "compare", str(a), str(b)]) == 0
    assert "0.500x" in capsys.readouterr().out
    assert main(["bench", "compare", str(a), str(b), "--fail-below", "0.9"]) == 1
    assert main(["bench", "compare", str(a), str(a), "--fail-below", "0.9"]) == 0


def test_bench_plot_without_out_fails_before_work(capsys):
    from idflux.cli import main

    assert main(["bench", "region_attention", "--plot", "/tmp/p"]) == 2
    assert "--plot needs --out" in capsys.readouterr().err


def test_missing_xformers_gives_an_error_row(monkeypatch):
    from idflux.bench_perf import bench_region_attention as b

    monkeypatch.setitem(sys.modules, "xformers", None)
    q = k = v = torch.randn(1, 2, 8, 4)
    fwds = b.xformers_fwds(q, k, v, None, None, 1, 8)
    case = harness.Case("region_attention", "xformers", "fwd", {}, "fp32", fwds["xformers"][0])
    (row,) = harness.run_cases([case], torch.device("cpu"), budget_s=0.0, log=lambda s: None)
    assert row["ms"] is None and "xformers unavailable" in row["error"]


def test_profile_session_trace_names_the_range(tmp_path):
    from idflux.engine.profiling import nvtx_range, profile_session, trace_names

    with profile_session(tmp_path, "t") as result:
        with nvtx_range("kernel.region_attention"):
            torch.randn(8, 8) @ torch.randn(8, 8)
    assert "kernel.region_attention" in trace_names(result.trace) and "top" in result.table


def test_suite_lists_goals_in_issue_order():
    from idflux.bench_perf.suite import goal_plan

    ops = [g["op"] for g in goal_plan()]
    order = ["region_attention", "adapter", "sample", "cosine_infonce", "face_warp", "train"]
    assert [o for o in dict.fromkeys(ops)] == order
