"""Benchmark harness: cases x providers x modes -> timed rows -> JSON file -> plots.

Each ``bench_<op>.py`` exposes ``cases(device, quick) -> Iterator[Case]`` (a generator, so the
tensors of one case are freed before the next is built) and ``SUMMARY``: the pairs
``(provider, baseline)`` whose speed ratio the run reports. The harness times each case
(``triton.testing.do_bench`` on CUDA, ``torch.utils.benchmark.Timer.blocked_autorange`` with a fixed
thread count on CPU), records median and 20/80 percentiles and their spread, peak memory (CUDA),
the work (FLOPs, bytes), useful TFLOP/s and GB/s, the percentage of the device's bound reached
(:data:`DEVICE_PEAKS`), the host's load and CPU count at each case's start and end, and the run's
device, versions and commit (also from a copy without ``.git``: :func:`git_commit`).

Two times on CUDA. ``ms`` is what a Python caller sees (do_bench: launches, host-side work and any
host sync included). ``ms_device`` (cases marked ``graph=True``: no host sync inside) replays the
call captured in a CUDA graph, so host overhead is gone and only device time remains: the number
to hold against a bandwidth or FLOP bound, and the one a caller that captures its step gets.
Speed-ups are reported for both (``speedups`` and ``speedups_device``).

``GOALS`` (optional, per bench module): the issues' performance goals as :class:`Goal` entries;
``goal_report`` holds every measured case of a goal against its threshold, for both times, so a
run says in its own output which goals it met.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

MODES = ("fwd", "bwd", "fwd+bwd")

# The bwd mode replays one graph's backward (retain_graph=True); torch.compile'd providers
# (FlexAttention, the compiled references) refuse that while their buffers are donated.
import torch._functorch.config  # noqa: E402

torch._functorch.config.donated_buffer = False


@dataclass
class Case:
    """One timed configuration.

    op: op name (``region_attention``...). provider: implementation label. mode: one of MODES.
    shape: the sizes that define the case (JSON-able). dtype: ``"fp32"``, ``"bf16"``...
    fn: the callable timed (no arguments). flops / bytes: useful work and the bytes the op must
    move for this mode (None when not meaningful). note: free text kept in the row.
    """

    op: str
    provider: str
    mode: str
    shape: dict
    dtype: str
    fn: Callable[[], object]
    flops: float | None = None
    bytes: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    graph: bool = False  # capturable in a CUDA graph (no host sync): also time device-only on CUDA


def mode_fns(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """Callables for fwd, bwd and fwd+bwd of ``forward`` with respect to ``inputs``.

    fwd runs under ``no_grad``; bwd reuses one graph (``retain_graph``) with a fixed random upstream
    gradient, so only the backward is timed; fwd+bwd builds the graph each call.
    """
    inputs = list(inputs)
    with torch.enable_grad():
        out = forward()
    grad_out = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            return forward()

    def bwd():
        return torch.autograd.grad(out, inputs, grad_out, retain_graph=True, allow_unused=True)

    def fwd_bwd():
        with torch.enable_grad():
            o = forward()
        return torch.autograd.grad(o, inputs, grad_out, allow_unused=True)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def with_setting(module: str, name: str, value, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the module-level knob ``module.name`` set to ``value`` (restored after each call):
    a provider for the other strategy of an op (read when the op runs, e.g. in its backward)."""
    import importlib

    mod = importlib.import_module(module)  # the module, even where a package exports a function of that name

    def run():
        saved = getattr(mod, name)
        setattr(mod, name, value)
        try:
            return fn()
        finally:
            setattr(mod, name, saved)
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, min_reps: int = 3, budget_s: float = 1.0,
            threads: int | None = None) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, its own warm-up). CPU: ``torch.utils.benchmark``'s
    ``Timer.blocked_autorange`` with ``threads`` torch threads (default: the current setting), at least
    ``min_reps`` blocks and ``budget_s`` seconds; each block's time per call is one sample.
    """
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=budget_s)
    samples = list(measurement.times)
    while len(samples) < min_reps:
        samples += timer.timeit(measurement.number_per_run).times
    samples = sorted(t * 1e3 for t in samples)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


def graph_time_fn(fn: Callable[[], object], device: torch.device, *, target_ms: float = 10.0,
                  max_calls: int = 200, replays: int = 7) -> tuple[float, float, float]:
    """(median, p20, p80) ms per call of ``fn`` replayed from a CUDA graph: device time only.

    ``fn`` must not sync with the host. It is warmed up eagerly (caches, compiles, autotuning), then
    enough back-to-back calls to fill ``target_ms`` are captured in one graph, which is replayed
    ``replays`` times; each replay's time divided by its call count is one sample.
    """
    if device.type != "cuda":
        raise ValueError("graph_time_fn: CUDA graphs need a CUDA device")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    calls = max(1, min(max_calls, int(target_ms / estimate)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        samples.append(start.elapsed_time(end) / calls)
    del graph
    samples.sort()
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak extra device memory of one call, in MiB (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


COMMIT_ENV = "IDFLUX_COMMIT"
COMMIT_FILE = "COMMIT"  # written beside the carried wheels (.whl/COMMIT) or at the repository root


def source_hash(root: str | os.PathLike | None = None) -> str:
    """sha256 (12 hex digits) over the package's ``*.py`` and ``*.sh`` files, paths included: what
    identifies an installed or copied tree that has no ``.git``."""
    import hashlib

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def git_commit() -> str:
    """The commit the run measures: ``$IDFLUX_COMMIT`` (passed in by the GPU suite), else ``git
    rev-parse`` of this checkout (``-dirty`` if tracked files changed), else a ``COMMIT`` file at the
    repository root or in ``.whl/`` (written here before a copy without ``.git`` is carried), else
    ``<version>+src.<hash of the package source>`` for an installed copy."""
    env = os.environ.get(COMMIT_ENV, "").strip()
    if env:
        return env
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    for f in (root / COMMIT_FILE, root / ".whl" / COMMIT_FILE):
        if f.is_file() and f.read_text().strip():
            return f.read_text().strip().splitlines()[0]
    try:
        from importlib.metadata import version

        ver = version("idflux")
    except Exception:  # noqa: BLE001 - not installed: the source hash alone
        ver = "0"
    return f"{ver}+src.{source_hash()}"


def host_load() -> dict:
    """The host's 1-minute load average and CPU count (recorded at a case's start and end)."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"load": load, "cpus": os.cpu_count()}


# Spread flag: a row whose p80/p20 exceeds this is marked NOISY in the printed table.
SPREAD_LIMIT = float(os.environ.get("IDFLUX_BENCH_SPREAD", "1.25"))

# Datasheet peaks (dense, no sparsity) and memory bandwidth of known devices: the bound a row is
# held against. Matched by substring of the device name, first match wins; overridden by
# $IDFLUX_PEAK_GBPS / $IDFLUX_PEAK_TFLOPS or ``idflux bench --peak-gbps/--peak-tflops``.
# fp32 is the plain (non-tensor-core) rate; bf16/fp16 the tensor-core rate.
DEVICE_PEAKS = {
    "H200": {"gbps": 4800.0, "tflops": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}},
    "H100 PCIe": {"gbps": 2000.0, "tflops": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}},
    "H100": {"gbps": 3350.0, "tflops": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}},
    "A100": {"gbps": 2039.0, "tflops": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}},
    "L40S": {"gbps": 864.0, "tflops": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}},
    "RTX 4090": {"gbps": 1008.0, "tflops": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}},
}
_PEAK_OVERRIDE: dict = {}


def set_peaks(gbps: float | None = None, tflops: float | None = None) -> None:
    """Override the bandwidth (GB/s) and compute (TFLOP/s) bound for this process (None: keep)."""
    for key, value in (("gbps", gbps), ("tflops", tflops)):
        if value is not None:
            if value <= 0:
                raise ValueError(f"set_peaks: {key} must be > 0, got {value}")
            _PEAK_OVERRIDE[key] = float(value)


def device_peaks(device_name: str, dtype: str) -> dict:
    """``{"gbps", "tflops", "source"}`` for a device name and dtype: an override (flag or env) or the
    table of known devices; values unknown are None (a CPU, an unlisted GPU)."""
    gbps = tflops = None
    source = None
    for key, spec in DEVICE_PEAKS.items():
        if key.lower() in device_name.lower():
            gbps, tflops, source = spec["gbps"], spec["tflops"].get(dtype), f"table:{key}"
            break
    for key, env in (("gbps", "IDFLUX_PEAK_GBPS"), ("tflops", "IDFLUX_PEAK_TFLOPS")):
        value = _PEAK_OVERRIDE.get(key) or (float(os.environ[env]) if os.environ.get(env) else None)
        if value:
            if key == "gbps":
                gbps = value
            else:
                tflops = value
            source = "override"
    return {"gbps": gbps, "tflops": tflops, "source": source}


def bound_fields(row: dict) -> dict:
    """The row's bound: the larger of bytes / bandwidth and FLOPs / peak (ms), which one limits,
    and the percentage of it reached by the eager time (``pct_bound``) and the CUDA-graph device
    time (``pct_bound_device``). Empty where neither the work nor the device's peaks are known."""
    peaks = device_peaks(row.get("device_name", ""), row.get("dtype", ""))
    terms = {}
    if row.get("bytes") and peaks["gbps"]:
        terms["memory"] = row["bytes"] / (peaks["gbps"] * 1e9) * 1e3
    if row.get("flops") and peaks["tflops"]:
        terms["compute"] = row["flops"] / (peaks["tflops"] * 1e12) * 1e3
    if not terms:
        return {}
    kind = max(terms, key=terms.get)
    out = {"bound_ms": terms[kind], "bound_kind": kind, "peak_gbps": peaks["gbps"], "peak_tflops": peaks["tflops"],
           "peaks_from": peaks["source"]}
    for key, suffix in (("ms", ""), ("ms_device", "_device")):
        if row.get(key):
            out["pct_bound" + suffix] = 100.0 * terms[kind] / row[key]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} ({os.cpu_count()} cpus)"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def time_limited(cases: Iterable[Case], seconds: float, *, log: Callable[[str], None] = print) -> Iterator[Case]:
    """Yield cases until ``seconds`` have passed since the first one was requested."""
    start = time.perf_counter()
    for case in cases:
        if time.perf_counter() - start > seconds:
            log(f"# time budget of {seconds:.0f} s reached: remaining cases of {case.op} skipped")
            return
        yield case


def run_cases(cases: Iterable[Case], device: torch.device, *, budget_s: float = 1.0, log: Callable[[str], None] = print,
              threads: int | None = None) -> list[dict]:
    """Time every case; a case that fails records its error instead of stopping the run.

    Each row records, beside the times: the work (``flops``, ``bytes``) and the device bound it
    reached (:func:`bound_fields`), the first call's time (``warm_s``: Triton compiles, autotuning,
    lazy init; never part of the timed samples), torch's thread count (``threads``), the host's
    load average and CPU count at the case's start and end (``load_start``, ``load_end``), and the
    spread ``p80 / p20`` of its samples (``noisy`` when above :data:`SPREAD_LIMIT`).
    """
    env = environment(device)
    threads = threads or torch.get_num_threads()
    rows = []
    cases = iter(cases)
    while True:
        try:
            case = next(cases)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - a sweep that cannot build its next case ends as an error row
            rows.append({"op": "?", "provider": "setup", "mode": "-", "shape": {}, "dtype": "-", **env, "ms": None,
                         "error": f"{type(exc).__name__}: {exc}"})
            log(format_row(rows[-1]))
            break
        row = {
            "op": case.op, "provider": case.provider, "mode": case.mode, "shape": case.shape, "dtype": case.dtype,
            **env, "threads": threads, "flops": case.flops, "bytes": case.bytes, "note": case.note, **case.extra,
        }
        start = host_load()
        row["load_start"] = start["load"]
        try:
            t0 = time.perf_counter()
            case.fn()
            _sync(device)
            row["warm_s"] = time.perf_counter() - t0
            ms, p20, p80 = time_fn(case.fn, device, budget_s=budget_s, threads=threads)
            row.update(ms=ms, ms_p20=p20, ms_p80=p80, peak_mem_mb=peak_memory_mb(case.fn, device))
            row["tflops"] = case.flops / (ms * 1e-3) / 1e12 if case.flops else None
            row["gbps"] = case.bytes / (ms * 1e-3) / 1e9 if case.bytes else None
            row["spread"] = p80 / p20 if p20 > 0 else None
            row["noisy"] = bool(row["spread"] and row["spread"] > SPREAD_LIMIT)
        except Exception as exc:  # noqa: BLE001 - a broken provider is a row, not a crash
            row.update(ms=None, error=f"{type(exc).__name__}: {exc}")
        if case.graph and device.type == "cuda" and row.get("ms"):
            try:
                md, d20, d80 = graph_time_fn(case.fn, device)
                row.update(ms_device=md, ms_device_p20=d20, ms_device_p80=d80)
                row["gbps_device"] = case.bytes / (md * 1e-3) / 1e9 if case.bytes else None
                row["spread_device"] = d80 / d20 if d20 > 0 else None
            except Exception as exc:  # noqa: BLE001 - recorded; the eager time stands
                row["graph_error"] = f"{type(exc).__name__}: {exc}"
        row["load_end"] = host_load()["load"]
        row.update(bound_fields(row))
        rows.append(row)
        log(format_row(row))
        case.fn = None  # drop references to the case's tensors before the next is built
    return rows


def load_warning(rows: list[dict]) -> str | None:
    """A line to print when the host was busy during the run (load above half its CPUs)."""
    loads = [r.get(k) for r in rows for k in ("load_start", "load_end") if r.get(k) is not None]
    cpus = next((r.get("cpus") for r in rows if r.get("cpus")), None)
    if loads and cpus and max(loads) > 0.5 * cpus:
        return (f"# warning: host load average up to {max(loads):.2f} on {cpus} CPUs during this run: "
                "CPU times are inflated and noisy (see each row's load_start/load_end and spread)")
    return None


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_row(row: dict) -> str:
    if row.get("ms") is None:
        return f"{row['op']:<17} {row['provider']:<24} {row['mode']:<8} {row['dtype']:<5} {shape_label(row['shape'])}  ERROR {row.get('error')}"
    extra = ""
    if row.get("tflops"):
        extra += f" {row['tflops']:8.3f} TFLOP/s"
    if row.get("gbps"):
        extra += f" {row['gbps']:8.1f} GB/s"
    if row.get("peak_mem_mb") is not None:
        extra += f" {row['peak_mem_mb']:9.1f} MiB"
    if row.get("ms_device") is not None:
        extra += f" | device {row['ms_device']:.4f} ms (CUDA graph)"
    if row.get("pct_bound_device") is not None or row.get("pct_bound") is not None:
        pct = row.get("pct_bound_device") if row.get("pct_bound_device") is not None else row["pct_bound"]
        extra += f" | {pct:.1f}% of {row['bound_kind']} bound"
    if row.get("spread"):
        extra += f" x{row['spread']:.2f}" + (" NOISY" if row.get("noisy") else "")
    return (f"{row['op']:<17} {row['provider']:<24} {row['mode']:<8} {row['dtype']:<5} {shape_label(row['shape'])}"
            f"  {row['ms']:10.3f} ms [{row['ms_p20']:.3f}, {row['ms_p80']:.3f}]{extra}")


def speedups(rows: list[dict], pairs: Sequence[tuple[str, str]], key: str = "ms") -> list[dict]:
    """Ratio baseline / provider of ``key`` ("ms", or "ms_device" for CUDA-graph device times) for
    every (provider, baseline) pair measured on the same case."""
    index = {}
    for r in rows:
        if r.get(key):
            index[(r["op"], r["provider"], r["mode"], json.dumps(r["shape"], sort_keys=True), r["dtype"])] = r[key]
    out = []
    pairs = list(dict.fromkeys(pairs))  # ops may name the same pair
    for (op, prov, mode, shape, dtype), ms in index.items():
        for p, base in pairs:
            if prov != p:
                continue
            b = index.get((op, base, mode, shape, dtype))
            if b:
                out.append({"op": op, "provider": p, "baseline": base, "mode": mode, "shape": json.loads(shape),
                            "dtype": dtype, "speedup": b / ms})
    return out


@dataclass(frozen=True)
class Goal:
    """A performance goal: ``provider`` against ``baseline`` on the cases of ``op`` in ``mode`` whose
    shape (or the row's ``dtype`` / ``device``) match ``where`` (a value, or a tuple of allowed
    values, per key); the baseline row is the same case in ``baseline_mode`` (default ``mode``).

    metric: ``"speedup"`` (baseline time / provider time >= ``bound``), ``"slowdown"`` (provider
    time / baseline time <= ``bound``), ``"bandwidth"`` (provider GB/s / baseline GB/s >= ``bound``,
    the baseline being a copy of the bytes) or ``"memory"`` (baseline peak / provider peak >=
    ``bound``). issue: the issue number that sets it; text: the goal in words.
    """

    issue: int
    text: str
    op: str
    provider: str
    baseline: str
    mode: str
    metric: str
    bound: float
    where: tuple = ()  # ((key, value or tuple of values), ...): hashable, frozen
    baseline_mode: str | None = None

    def matches(self, row: dict) -> bool:
        if (row["op"], row["mode"]) != (self.op, self.mode):
            return False
        for key, want in self.where:
            have = row.get(key) if key in ("dtype", "device") else row["shape"].get(key)
            if have not in (want if isinstance(want, tuple) else (want,)):
                return False
        return True


_GOAL_METRICS = ("speedup", "slowdown", "bandwidth", "memory")


def _goal_value(goal: Goal, prov: dict, base: dict, key: str) -> float | None:
    """The goal's ratio on one case from ``key`` times ("ms" or "ms_device"); None if unmeasured."""
    if goal.metric == "memory":  # one peak per row, measured on the eager calls
        a, b = prov.get("peak_mem_mb"), base.get("peak_mem_mb")
        return b / max(a, 1e-3) if key == "ms" and a is not None and b is not None else None
    tp, tb = prov.get(key), base.get(key)
    if not tp or not tb:
        return None
    if goal.metric == "speedup":
        return tb / tp
    if goal.metric == "slowdown":
        return tp / tb
    # bandwidth: bytes / time of each; the rows' GB/s come from eager times, so rescale to ``key``
    gp, gb = prov.get("gbps"), base.get("gbps")
    if not gp or not gb:
        return None
    return (gp * prov["ms"] / tp) / (gb * base["ms"] / tb)


def goal_report(rows: list[dict], goals: Sequence[Goal]) -> list[dict]:
    """One entry per goal and matching case: the ratio from eager times (``value``) and from
    CUDA-graph device times (``value_device``, where both rows have one), and whether each meets
    the bound (``met``, ``met_device``; None when unmeasured)."""
    for g in goals:
        if g.metric not in _GOAL_METRICS:
            raise ValueError(f"Goal.metric must be one of {_GOAL_METRICS}, got {g.metric!r}")
    index = {(r["op"], r["provider"], r["mode"], json.dumps(r["shape"], sort_keys=True), r["dtype"]): r
             for r in rows if r.get("ms") is not None}
    out = []
    for g in dict.fromkeys(goals):
        for (op, prov, mode, shape, dtype), row in index.items():
            if prov != g.provider or not g.matches(row):
                continue
            base = index.get((op, g.baseline, g.baseline_mode or mode, shape, dtype))
            if base is None:
                continue
            entry = {"issue": g.issue, "goal": g.text, "op": op, "provider": prov, "baseline": g.baseline, "mode": mode,
                     "baseline_mode": g.baseline_mode or mode,
                     "shape": json.loads(shape), "dtype": dtype, "metric": g.metric, "bound": g.bound}
            entry["pct_bound"], entry["pct_bound_device"] = row.get("pct_bound"), row.get("pct_bound_device")
            entry["bound_kind"] = row.get("bound_kind")
            for key, suffix in (("ms", ""), ("ms_device", "_device")):
                value = _goal_value(g, row, base, key)
                entry["value" + suffix] = value
                entry["met" + suffix] = None if value is None else (value <= g.bound if g.metric == "slowdown" else value >= g.bound)
            out.append(entry)
    return out


def goal_lines(report: list[dict]) -> list[str]:
    """The report as printable lines: goal, case, eager ratio and device ratio with met / NOT MET."""
    def verdict(value, met):
        return "-" if value is None else f"{value:.2f}x {'met' if met else 'NOT MET'}"
    def pct(e):
        eager, device = e.get("pct_bound"), e.get("pct_bound_device")
        if eager is None and device is None:
            return ""
        parts = [f"eager {eager:.1f}%" if eager is not None else None, f"device {device:.1f}%" if device is not None else None]
        return f"  [{', '.join(p for p in parts if p)} of the {e.get('bound_kind')} bound]"
    lines = []
    for e in report:
        sign = "<=" if e["metric"] == "slowdown" else ">="
        lines.append(f"#{e['issue']} {e['op']:<16} {e['provider']} vs {e['baseline']} {e['mode']} {e['dtype']} "
                     f"{shape_label(e['shape'])}: {e['metric']} {sign} {e['bound']:g}  eager {verdict(e['value'], e['met'])}"
                     f"  device {verdict(e['value_device'], e['met_device'])}{pct(e)}")
    return lines


def goal_markdown(report: list[dict]) -> str:
    """The goal table as Markdown (written beside the JSON after every op of a goal run)."""
    def cell(value, met):
        return "-" if value is None else f"{value:.2f}x {'met' if met else '**NOT MET**'}"

    def pct(value):
        return "-" if value is None else f"{value:.1f}%"
    out = ["| issue | op | ours vs baseline | mode | dtype | shape | goal | eager | device (CUDA graph) | % of bound eager | % of bound device |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report:
        sign = "<=" if e["metric"] == "slowdown" else ">="
        out.append(f"| {e['issue']} | {e['op']} | {e['provider']} vs {e['baseline']} | {e['mode']} | {e['dtype']} | "
                   f"{shape_label(e['shape'])} | {e['metric']} {sign} {e['bound']:g} | {cell(e['value'], e['met'])} | "
                   f"{cell(e['value_device'], e['met_device'])} | {pct(e.get('pct_bound'))} | {pct(e.get('pct_bound_device'))} |")
    return "\n".join(out) + "\n"


def write_results(path: str | os.PathLike, rows: list[dict], summary: list[dict],
                  summary_device: list[dict] | None = None, goals: list[dict] | None = None) -> None:
    """Write rows, speed-ups and goal verdicts as JSON, atomically (a crash never leaves a
    half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows, "speedups": summary}
    if summary_device:
        doc["speedups_device"] = summary_device
    if goals:
        doc["goals"] = goals
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def load_results(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
