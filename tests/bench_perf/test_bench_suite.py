"""The pytest-benchmark suite (tests/bench) is out of the default run but still collects."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _collect(*extra):
    env = {**os.environ, "IDFLUX_BENCH_SUITE": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *extra,
                           "tests/bench"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_bench_suite_collects_with_benchmark_only_and_not_by_default():
    pytest.importorskip("pytest_benchmark")
    out = _collect("--benchmark-only")
    assert out.returncode == 0, out.stdout + out.stderr
    ids = [line for line in out.stdout.splitlines() if "::test_" in line]
    ops = {"region_attention", "cosine_infonce", "face_warp", "adapter"}
    assert len(ids) == 8 and all(any(op in i for i in ids) for op in ops), out.stdout
    default = _collect()
    assert not [line for line in default.stdout.splitlines() if "::test_" in line], default.stdout
