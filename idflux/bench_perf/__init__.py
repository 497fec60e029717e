"""Benchmarks: the harness, one ``bench_<op>.py`` per op, plots, and the GPU suite script."""
