"""What the GPU suite records and selects: the commit (every fallback), the % of the device's
bound, and the plugin that keeps only the CUDA tests."""

import os
import subprocess
import sys
import types

import pytest

from idflux.bench_perf import cuda_tests, harness


def test_commit_from_the_environment_first(monkeypatch):
    monkeypatch.setenv(harness.COMMIT_ENV, "abc1234")
    assert harness.git_commit() == "abc1234"


def test_commit_fallbacks_without_git(monkeypatch, tmp_path):
    """No $IDFLUX_COMMIT and no git: a COMMIT file at the root or in .whl/, else version + source hash."""
    monkeypatch.delenv(harness.COMMIT_ENV, raising=False)

    def no_git(*a, **k):
        raise OSError("git: not found")

    monkeypatch.setattr(harness.subprocess, "run", no_git)
    root = tmp_path / "repo"
    (root / "idflux" / "bench_perf").mkdir(parents=True)
    monkeypatch.setattr(harness, "__file__", str(root / "idflux" / "bench_perf" / "harness.py"))
    (root / "idflux" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(harness, "source_hash", lambda root=None: "0123456789ab")
    got = harness.git_commit()
    assert got.endswith("+src.0123456789ab"), got
    (root / ".whl").mkdir()
    (root / ".whl" / "COMMIT").write_text("feedbee\nsecond line\n")
    assert harness.git_commit() == "feedbee"
    (root / "COMMIT").write_text("c0ffee1\n")
    assert harness.git_commit() == "c0ffee1", "the root COMMIT file comes before .whl/COMMIT"


def test_commit_from_git_marks_a_dirty_tree(monkeypatch):
    monkeypatch.delenv(harness.COMMIT_ENV, raising=False)
    calls = []

    def fake_run(cmd, **k):
        calls.append(cmd)
        if "rev-parse" in cmd:
            return types.SimpleNamespace(returncode=0, stdout="1a2b3c4\n")
        return types.SimpleNamespace(returncode=0, stdout=" M idflux/x.py\n")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    assert harness.git_commit() == "1a2b3c4-dirty"
    assert any("--untracked-files=no" in c for c in calls[1])


def test_source_hash_follows_the_source(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    first = harness.source_hash(tmp_path)
    assert first == harness.source_hash(tmp_path) and len(first) == 12
    (tmp_path / "a.py").write_text("x = 2\n")
    assert harness.source_hash(tmp_path) != first
    (tmp_path / "notes.txt").write_text("ignored")
    assert harness.source_hash(tmp_path) == harness.source_hash(tmp_path)


def test_percent_of_bound(monkeypatch):
    monkeypatch.delenv("IDFLUX_PEAK_GBPS", raising=False)
    monkeypatch.delenv("IDFLUX_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(harness, "_PEAK_OVERRIDE", {})
    # 4.8 GB at 4800 GB/s = 1 ms; 989 GFLOP at 989 TFLOP/s = 1 ms: the larger term limits
    row = {"device_name": "NVIDIA H200", "dtype": "bf16", "bytes": 9.6e9, "flops": 989e9, "ms": 4.0, "ms_device": 2.5}
    out = harness.bound_fields(row)
    assert out["bound_kind"] == "memory" and out["bound_ms"] == pytest.approx(2.0)
    assert out["pct_bound"] == pytest.approx(50.0) and out["pct_bound_device"] == pytest.approx(80.0)
    assert out["peaks_from"] == "table:H200"
    row = {**row, "bytes": 1e6, "flops": 989e9 * 3}
    out = harness.bound_fields(row)
    assert out["bound_kind"] == "compute" and out["bound_ms"] == pytest.approx(3.0)
    # "H100 PCIe" is matched before "H100"; an unknown device or no work: no bound at all
    assert harness.device_peaks("NVIDIA H100 PCIe", "bf16")["gbps"] == 2000.0
    assert harness.device_peaks("NVIDIA H100 80GB HBM3", "bf16")["gbps"] == 3350.0
    assert harness.bound_fields({"device_name": "Intel Xeon", "dtype": "fp32", "bytes": 1e9, "ms": 1.0}) == {}
    assert harness.bound_fields({"device_name": "NVIDIA H200", "dtype": "bf16", "ms": 1.0}) == {}
    # an override wins over the table
    monkeypatch.setenv("IDFLUX_PEAK_GBPS", "1000")
    out = harness.bound_fields({"device_name": "NVIDIA H200", "dtype": "bf16", "bytes": 1e9, "ms": 2.0})
    assert out["peaks_from"] == "override" and out["pct_bound"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="gbps must be > 0"):
        harness.set_peaks(gbps=0)


class _Item:
    def __init__(self, nodeid, reasons=()):
        self.nodeid = nodeid
        self._marks = [types.SimpleNamespace(kwargs={"reason": r}) for r in reasons]

    def iter_markers(self, name):
        assert name == "skipif"
        return iter(self._marks)


@pytest.mark.parametrize("nodeid, reasons, keep", [
    ("tests/kernels/test_x.py::test_triton_cuda_matches", (), True),
    ("tests/engine/test_graphs.py::test_gpu_replay", (), True),
    ("tests/cuda_dir/test_x.py::test_plain", (), False),  # only the test's own name counts
    ("tests/kernels/test_x.py::test_a", ("needs CUDA",), True),
    ("tests/kernels/test_x.py::test_b", ("no CUDA device and TRITON_INTERPRET is off",), True),
    ("tests/kernels/test_x.py::test_c", ("requires a CUDA GPU",), True),
    ("tests/kernels/test_x.py::test_d", ("needs TRITON_INTERPRET=1",), False),
    ("tests/kernels/test_x.py::test_e", ("CUDA present (kernels run for real)",), False),
    ("tests/test_cli.py::test_help", (), False),
])
def test_cuda_test_filter(nodeid, reasons, keep):
    assert cuda_tests.needs_cuda(_Item(nodeid, reasons)) is keep


def test_cuda_test_filter_deselects_the_rest():
    items = [_Item("a.py::test_cuda_x"), _Item("a.py::test_cpu_y"), _Item("a.py::test_z", ("needs CUDA",))]
    deselected = []
    config = types.SimpleNamespace(hook=types.SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
    cuda_tests.pytest_collection_modifyitems(config, items)
    assert [i.nodeid for i in items] == ["a.py::test_cuda_x", "a.py::test_z"]
    assert [i.nodeid for i in deselected] == ["a.py::test_cpu_y"]


def test_suite_run_id_prints_a_commit():
    out = subprocess.run([sys.executable, "-m", "idflux.bench_perf.suite", "--run-id"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, harness.COMMIT_ENV: "deadbee"})
    assert out.returncode == 0 and out.stdout.strip() == "deadbee", (out.stdout, out.stderr[-500:])
