"""pytest plugin for the GPU suite: keep only the tests that need CUDA.

``pytest -p idflux.bench_perf.cuda_tests tests/...`` deselects every test that would run the same
on a CPU machine: a test is kept when its name says ``cuda``/``gpu``, or one of its ``skipif``
marks skips it for want of CUDA (its reason names CUDA). The CPU machines run the rest.
"""

from __future__ import annotations


def needs_cuda(item) -> bool:
    name = item.nodeid.lower()
    if "cuda" in name.split("::")[-1] or "gpu" in name.split("::")[-1]:
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", "")).lower()
        if "cuda" in reason and ("need" in reason or "requires" in reason or "no cuda" in reason):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (keep if needs_cuda(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
