"""The ``idflux`` command line: ``bench``, ``env``, ``generate``, ``train``, ``eval``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

OPS = ("region_attention", "cosine_infonce", "face_warp", "adapter", "sample", "train")


def _cmd_env(args) -> int:
    import platform

    import torch

    from idflux.kernels import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda (torch build)": torch.version.cuda or "none (CPU build)",
        "cuda available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "TRITON_INTERPRET": "1" if _backend.INTERPRET else "0",
        "backends": _backend.backend_report(),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for op, desc in value.items():
                    print(f"  {op:<17} {desc}")
            else:
                print(f"{key:<20} {value}")
    return 0


def _cmd_bench(args) -> int:
    import torch

    from idflux.bench_perf import harness

    if args.device == "cuda" and not torch.cuda.is_available():
        print("idflux bench: --device cuda but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    unknown = [op for op in args.ops if op not in OPS]
    if unknown:
        print(f"idflux bench: unknown op(s) {unknown}; choose from {', '.join(OPS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    rows, pairs, goals = [], [], []
    for op in args.ops or OPS:
        module = importlib.import_module(f"idflux.bench_perf.bench_{op}")
        print(f"# {op} on {device}")
        cases = module.cases(device, args.quick)
        if args.op_budget:
            cases = harness.time_limited(cases, args.op_budget, log=print)
        rows += harness.run_cases(cases, device, budget_s=args.budget)
        pairs += module.SUMMARY
        goals += getattr(module, "GOALS", [])
        if args.out:  # after every op: a run cut short (a time limit) keeps what it measured
            harness.write_results(args.out, rows, harness.speedups(rows, pairs), harness.speedups(rows, pairs, key="ms_device"),
                                  harness.goal_report(rows, goals))
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
        print("# goals (the issues' performance goals; eager = ms, device = CUDA-graph replay; same run)")
        for line in harness.goal_lines(report):
            print(line)
    if args.out:
        harness.write_results(args.out, rows, summary, summary_device, report)
        print(f"wrote {args.out}")
        if args.plot:
            from idflux.bench_perf.plots import plot_results

            for path in plot_results(args.out, args.plot):
                print(f"wrote {path}")
    elif args.plot:
        print("idflux bench: --plot needs --out (plots are drawn from the results file)", file=sys.stderr)
        return 2
    if args.profile:
        for path in _profile_ops(args, device):
            print(f"wrote {path}")
    failed = [r for r in rows if r.get("ms") is None]
    return 1 if failed and args.strict else 0


def _profile_ops(args, device) -> list:
    """One torch.profiler trace per op (Perfetto / chrome://tracing / TensorBoard), NVTX ranges on."""
    import importlib as _il
    from itertools import islice
    from pathlib import Path

    import torch

    from idflux.engine.profiling import enable_nvtx

    enable_nvtx(True)
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    written = []
    for op in args.ops or OPS:
        module = _il.import_module(f"idflux.bench_perf.bench_{op}")
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for case in islice(module.cases(device, True), args.profile_cases):
                with torch.profiler.record_function(f"{case.op}/{case.provider}/{case.mode}"):
                    case.fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
        path = out / f"{op}_trace.json"
        prof.export_chrome_trace(str(path))
        written.append(path)
    enable_nvtx(False)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idflux", description="Identity-consistent multi-person FLUX: kernels, engine, training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="benchmark the ops against their baselines",
                       description="Time each op (size sweep x providers x fwd/bwd/fwd+bwd) and write rows to JSON and plots.")
    p.add_argument("ops", nargs="*", metavar="OP", help=f"ops to run (default: all of {', '.join(OPS)})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark on (default cpu)")
    p.add_argument("--out", help="results JSON file (written atomically)")
    p.add_argument("--plot", help="folder for PNG plots drawn from --out")
    p.add_argument("--quick", action="store_true", help="smallest sweep only (smoke test)")
    p.add_argument("--budget", type=float, default=1.0, help="CPU: seconds of repeats per case, at least 3 repeats (default 1.0)")
    p.add_argument("--op-budget", type=float, default=None,
                   help="seconds per op: stop starting new cases of an op after this (rows so far are kept)")
    p.add_argument("--profile", metavar="DIR",
                   help="also write a torch.profiler trace per op (the --quick sweep's first cases) into DIR")
    p.add_argument("--profile-cases", type=int, default=6, help="cases per op traced with --profile (default 6)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any provider failed")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("env", help="versions, device and the backend each op will use",
                       description="Print torch/triton/CUDA versions, the device, and which backend each op takes.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_env)

    from idflux.engine.cli import add_generate_parser
    from idflux.eval.cli import add_eval_parser
    from idflux.train.cli import add_train_parser

    add_generate_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
