"""The pytest-benchmark suite: ``pytest tests/bench --benchmark-only``.

Left out of the default test run (``pytest`` / ``make test``): its files are collected only when
``--benchmark-only`` is given (or ``IDFLUX_BENCH_SUITE=1``). ``tests/bench_perf/test_bench_suite.py``
in the default run proves the suite still collects.
"""

import os


def _selected(config) -> bool:
    try:
        only = config.getoption("benchmark_only")
    except ValueError:  # pytest-benchmark not installed
        only = False
    return bool(only) or os.environ.get("IDFLUX_BENCH_SUITE") == "1"


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and collection_path.suffix == ".py" and not _selected(config):
        return True
    return None
