"""The benchmark side of the command line: ``idflux bench``, ``idflux bench compare`` and
``idflux profile`` (wired into :mod:`idflux.cli`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# The goal cases in the order of the issues' goals: issue 16 (region_attention, the adapter, the
# sampling step), then issue 17 (cosine_infonce, face_warp, the training step).
GOAL_OPS = ("region_attention", "adapter", "sample", "cosine_infonce", "face_warp", "train")


def _ops():
    from idflux.cli import OPS

    return OPS


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    ops = _ops()
    p.add_argument("ops", nargs="*", metavar="OP", help=f"ops to run (default: all of {', '.join(ops)}); "
                                                        "`idflux bench compare A.json B.json` compares two runs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark on (default cpu)")
    p.add_argument("--out", help="results JSON file (written atomically, after every op)")
    p.add_argument("--plot", help="folder for PNG plots drawn from --out (one per op, a roofline per device)")
    p.add_argument("--quick", action="store_true", help="smallest sweep only (smoke test)")
    p.add_argument("--goals", action="store_true",
                   help="only the cases the issues' goals are judged on, in the goals' order "
                        f"({', '.join(GOAL_OPS)}); the goal table (<out>.goals.md) is rewritten after every op")
    p.add_argument("--budget", type=float, default=1.0,
                   help="CPU: minimum seconds of timed blocks per case (torch.utils.benchmark), at least 3 blocks (default 1.0)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads while timing (default: torch's setting)")
    p.add_argument("--op-budget", type=float, default=None,
                   help="seconds per op: stop starting new cases of an op after this (rows so far are kept)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="device memory bandwidth (GB/s) for the %%-of-bound columns (default: table of known devices, "
                        "or $IDFLUX_PEAK_GBPS)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for the rows' dtype (default: table of known devices, or $IDFLUX_PEAK_TFLOPS)")
    p.add_argument("--profile", metavar="DIR",
                   help="also write a torch.profiler trace per op (the --quick sweep's first cases) into DIR")
    p.add_argument("--profile-cases", type=int, default=6, help="cases per op traced with --profile (default 6)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any provider failed")


def _err(msg: str) -> int:
    print(f"idflux bench: {msg}", file=sys.stderr)
    return 2


def _check_out_path(flag: str, value: str, *, folder: bool) -> str | None:
    """A problem with an output path (None if it can be written), checked before any work."""
    path = Path(value)
    if folder:
        if path.exists() and not path.is_dir():
            return f"{flag} {value} is a file; give a folder for the plots"
        probe = path
    else:
        if path.is_dir():
            return f"{flag} {value} is a folder; give a file name such as {path / 'bench.json'}"
        probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{flag} {value}: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{flag} {value}: the folder {probe} is not writable"
    return None


def validate_bench_args(args) -> str | None:
    """Every problem with the arguments that would otherwise surface after the benchmark ran."""
    import torch

    ops = _ops()
    unknown = [op for op in args.ops if op not in ops]
    if unknown:
        return f"unknown op(s) {unknown}; choose from {', '.join(ops)} (or `idflux bench compare A.json B.json`)"
    if args.plot and not args.out:
        return "--plot needs --out (plots are drawn from the results file)"
    for flag, value, folder in (("--out", args.out, False), ("--plot", args.plot, True), ("--profile", args.profile, True)):
        if value:
            problem = _check_out_path(flag, value, folder=folder)
            if problem:
                return problem
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but torch sees no CUDA device; use --device cpu"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if args.budget < 0:
        return f"--budget must be >= 0 seconds, got {args.budget}"
    for flag, value in (("--peak-gbps", args.peak_gbps), ("--peak-tflops", args.peak_tflops)):
        if value is not None and value <= 0:
            return f"{flag} must be > 0, got {value}"
    return None


def goals_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".goals.md")


def run_bench(args) -> int:
    import torch

    from idflux.bench_perf import harness

    problem = validate_bench_args(args)
    if problem:
        return _err(problem)
    harness.set_peaks(args.peak_gbps, args.peak_tflops)
    device = torch.device(args.device)
    if args.goals:
        ops = [op for op in GOAL_OPS if not args.ops or op in args.ops]
    else:
        ops = list(args.ops or _ops())
    rows, pairs, goals = [], [], []
    for op in ops:
        module = importlib.import_module(f"idflux.bench_perf.bench_{op}")
        print(f"# {op} on {device}" + (" (goal cases)" if args.goals else ""), flush=True)
        cases = module.goal_cases(device) if args.goals else module.cases(device, args.quick)
        if args.op_budget:
            cases = harness.time_limited(cases, args.op_budget, log=print)
        rows += harness.run_cases(cases, device, budget_s=args.budget, threads=args.threads)
        pairs += module.SUMMARY
        goals += getattr(module, "GOALS", [])
        if args.out:  # after every op: a run cut short (a time limit) keeps what it measured
            report = harness.goal_report(rows, goals)
            harness.write_results(args.out, rows, harness.speedups(rows, pairs), harness.speedups(rows, pairs, key="ms_device"),
                                  report)
            if args.goals:
                goals_path(args.out).write_text(harness.goal_markdown(report))
    summary = harness.speedups(rows, pairs)
    summary_device = harness.speedups(rows, pairs, key="ms_device")
    for title, table in (("eager calls", summary), ("device time, CUDA-graph replay", summary_device)):
        if table:
            print(f"# speed-ups, {title} (baseline ms / provider ms, same run)")
            for s in table:
                print(f"{s['op']:<17} {s['provider']:<10} vs {s['baseline']:<16} {s['mode']:<8} "
                      f"{harness.shape_label(s['shape'])}  {s['speedup']:7.2f}x")
    report = harness.goal_report(rows, goals)
    if report:
        print("# goals (the issues' performance goals; eager = ms, device = CUDA-graph replay; same run; % of the device bound)")
        for line in harness.goal_lines(report):
            print(line)
    noisy = [r for r in rows if r.get("noisy")]
    if noisy:
        print(f"# {len(noisy)} of {len(rows)} rows NOISY (p80/p20 > {harness.SPREAD_LIMIT:g}): rerun them on a quieter machine "
              "before drawing conclusions")
    warning = harness.load_warning(rows)
    if warning:
        print(warning)
    if args.out:
        harness.write_results(args.out, rows, summary, summary_device, report)
        print(f"wrote {args.out}")
        if args.goals:
            goals_path(args.out).write_text(harness.goal_markdown(report))
            print(f"wrote {goals_path(args.out)}")
        if args.plot:
            from idflux.bench_perf.plots import plot_results

            for path in plot_results(args.out, args.plot):
                print(f"wrote {path}")
    if args.profile:
        for path in profile_ops(ops, device, args.profile, cases=args.profile_cases):
            print(f"wrote {path}")
    failed = [r for r in rows if r.get("ms") is None]
    return 1 if failed and args.strict else 0


# -- compare ------------------------------------------------------------------------------------------

def compare_parser() -> argparse.ArgumentParser:
    from idflux.bench_perf.compare import METRICS

    p = argparse.ArgumentParser(prog="idflux bench compare",
                                description="Compare benchmark runs row by row (op, provider, mode, shape, dtype): "
                                            "ratio = first file's time / other file's time, with the range the rows' "
                                            "20/80 percentiles allow.")
    p.add_argument("files", nargs="+", metavar="RESULTS.json", help="results files of idflux bench --out; the first is the baseline")
    p.add_argument("--metric", choices=METRICS, default="auto",
                   help="auto: CUDA-graph device time where both rows have it, else eager; eager-vs-graph: each "
                        "file's eager time against its own device time (default auto)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the ratios into this PNG")
    p.add_argument("--fail-below", type=float, metavar="R",
                   help="exit 1 if any matched ratio is below R (e.g. 0.9: a row more than ~10%% slower), for a regression job")
    p.add_argument("--op", action="append", default=[], help="only rows of this op (repeat)")
    return p


def run_compare(argv) -> int:
    from idflux.bench_perf import compare

    args = compare_parser().parse_args(argv)
    for f in args.files:
        if not Path(f).is_file():
            print(f"idflux bench compare: {f} not found (a results file of `idflux bench --out`)", file=sys.stderr)
            return 2
    if args.metric != "eager-vs-graph" and len(args.files) < 2:
        print("idflux bench compare: give two results files or more (the first is the baseline), "
              "or one with --metric eager-vs-graph", file=sys.stderr)
        return 2
    if args.plot:
        problem = _check_out_path("--plot", args.plot, folder=False)
        if problem or Path(args.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
            print(f"idflux bench compare: {problem or f'--plot {args.plot}: end the file name with .png, .svg or .pdf'}",
                  file=sys.stderr)
            return 2
    if args.fail_below is not None and args.fail_below <= 0:
        print(f"idflux bench compare: --fail-below must be > 0, got {args.fail_below}", file=sys.stderr)
        return 2
    try:
        docs = compare.load_labelled(args.files)
    except (ValueError, KeyError, OSError) as exc:
        print(f"idflux bench compare: cannot read the results ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    entries = compare.compare_docs(docs, args.metric)
    if args.op:
        entries = [e for e in entries if e["op"] in args.op]
    if not entries:
        print("idflux bench compare: no row matched between the files (same op, provider, mode, shape and dtype)",
              file=sys.stderr)
        return 2
    print(compare.format_table(entries, docs[0][0]), end="")
    for line in compare.unmatched(docs)[:20]:
        print(f"# {line}")
    for label, doc in docs:
        rows = doc.get("rows") or [{}]
        r = rows[0]
        print(f"# {label}: {r.get('device_name')} · torch {r.get('torch')} · commit {r.get('commit')} · {doc.get('created')}")
    if args.plot:
        print(f"wrote {compare.plot_compare(entries, args.plot)}")
    if args.fail_below is not None:
        worse = [e for e in entries if e["ratio"] < args.fail_below]
        if worse:
            print(f"# FAIL: {len(worse)} row(s) below {args.fail_below:g}x:", file=sys.stderr)
            for e in worse:
                print(f"#   {e['op']} {e['provider']} {e['mode']} {e['dtype']} {e['ratio']:.3f}x", file=sys.stderr)
            return 1
    return 0


# -- profile ------------------------------------------------------------------------------------------

def profile_ops(ops, device, out_dir, *, cases: int = 6, providers=None, top: int = 15, quick: bool = True) -> list[Path]:
    """A torch.profiler trace and top-kernels table per op: the first ``cases`` of its sweep (each
    case once, after one warm-up call outside the trace), each inside a range named
    ``idflux.<op>[<provider>] <mode>``."""
    from itertools import islice

    import torch

    from idflux.engine.profiling import profile_session

    written = []
    for op in ops:
        module = importlib.import_module(f"idflux.bench_perf.bench_{op}")
        chosen = (c for c in module.cases(device, quick) if providers is None or c.provider in providers)
        selected = list(islice(chosen, cases))
        for case in selected:  # compile and warm up outside the trace
            case.fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile_session(out_dir, op, cuda=device.type == "cuda", top=top) as result:
            for case in selected:
                with torch.profiler.record_function(f"idflux.{case.op}[{case.provider}] {case.mode}"):
                    case.fn()
        print(result.table, end="")
        written += [result.trace, result.table_path]
    return written


def proton_profile(op: str, device, out_dir, *, provider=None) -> Path:
    """A Triton proton profile (``<out_dir>/<op>_proton.hatchet``) of one case of ``op`` on CUDA."""
    import torch

    try:
        import triton.profiler as proton
    except ImportError as exc:
        raise RuntimeError(f"--proton needs triton's proton profiler (triton.profiler): {exc}") from None
    module = importlib.import_module(f"idflux.bench_perf.bench_{op}")
    case = next(c for c in module.cases(device, True) if provider is None or c.provider == provider)
    case.fn()
    torch.cuda.synchronize()
    path = Path(out_dir) / f"{op}_proton"
    proton.start(str(path), hook="triton")
    for _ in range(10):
        case.fn()
    torch.cuda.synchronize()
    proton.finalize()
    return path.with_suffix(".hatchet")


_PROFILE_EPILOG = """\
examples:
  idflux profile region_attention --device cpu              # profiles/region_attention_trace.json + _top.txt
  idflux profile cosine_infonce --device cuda --provider triton_nocheck --proton
  idflux profile generate --preset tiny --prompt "two people" --ref a.png --ref b.png --out o.png
  idflux profile train --preset tiny --max-steps 2 --out runs/prof
The trace opens in https://ui.perfetto.dev or chrome://tracing. generate/train take their own
options after the target (the same as `idflux generate/train --profile DIR`).
"""


def add_profile_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="torch.profiler trace (Perfetto) + top kernels of an op, generate or train",
                       description="Write a torch.profiler Chrome trace with named ranges for our kernels and the "
                                   "adapter blocks, and a table of the top kernels by device time (CPU time on a CPU).",
                       epilog=_PROFILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="profiles", help="folder for the trace and the table (default profiles/)")
    p.add_argument("target", metavar="OP|generate|train", help=f"an op of idflux bench ({', '.join(_ops())}), generate or train")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="for an op: --device, --cases, --provider, --top, --full, --proton; "
                                                          "for generate/train: their own options")
    p.set_defaults(func=run_profile)
    return p


def _op_profile_parser(op: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"idflux profile {op}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dir", default=None, help="folder for the trace (overrides the one before the target)")
    p.add_argument("--cases", type=int, default=6, help="cases of the sweep to trace (default 6)")
    p.add_argument("--provider", action="append", default=None, help="only these providers (repeat)")
    p.add_argument("--top", type=int, default=15, help="rows of the top-kernels table (default 15)")
    p.add_argument("--full", action="store_true", help="the op's full sweep's first cases (default: the --quick sweep)")
    p.add_argument("--proton", action="store_true", help="CUDA: also a Triton proton profile of one case")
    return p


def run_profile(args) -> int:
    import torch

    target, rest = args.target, list(args.rest)
    if target in ("generate", "train"):
        from idflux.cli import main

        if "--profile" not in rest:
            rest += ["--profile", str(Path(args.dir))]
        return main([target, *rest])
    if target not in _ops():
        print(f"idflux profile: unknown target {target!r}; choose an op ({', '.join(_ops())}), generate or train",
              file=sys.stderr)
        return 2
    opts = _op_profile_parser(target).parse_args(rest)
    out_dir = opts.dir or args.dir
    problem = _check_out_path("--dir", out_dir, folder=True)
    if problem:
        print(f"idflux profile: {problem}", file=sys.stderr)
        return 2
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("idflux profile: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    if opts.proton and opts.device != "cuda":
        print("idflux profile: --proton profiles Triton kernels on CUDA; use --device cuda or drop --proton", file=sys.stderr)
        return 2
    if opts.cases < 1:
        print(f"idflux profile: --cases must be >= 1, got {opts.cases}", file=sys.stderr)
        return 2
    device = torch.device(opts.device)
    written = profile_ops([target], device, out_dir, cases=opts.cases, providers=opts.provider, top=opts.top,
                          quick=not opts.full)
    if opts.proton:
        written.append(proton_profile(target, device, out_dir, provider=(opts.provider or [None])[0]))
    for path in written:
        print(f"wrote {path}")
    print("open the trace in https://ui.perfetto.dev or chrome://tracing")
    return 0
