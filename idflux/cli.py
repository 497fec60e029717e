"""The ``idflux`` command line: ``bench``, ``env``, ``generate``, ``export``, ``train``, ``eval``, ``serve``."""

from __future__ import annotations

import argparse
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
    from idflux import __version__

    info = {
        "idflux": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda (torch build)": torch.version.cuda or "none (CPU build)",
        **{name: _package_version(name) for name in ("diffusers", "transformers", "insightface", "gradio")},
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


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cmd_bench(args) -> int:
    from idflux.bench_perf.cli import run_bench  # bench, compare and profile live in idflux.bench_perf.cli

    return run_bench(args)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``idflux generate: error: --steps: must be >= 1, got 0 (see
    idflux generate --help)``) and exit status 2; subcommand parsers inherit it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from idflux import __version__

    parser = Parser(prog="idflux", description="Identity-consistent multi-person FLUX: kernels, engine, training.")
    parser.add_argument("--version", action="version", version=f"idflux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="benchmark the ops against their baselines",
                       description="Time each op (size sweep x providers x fwd/bwd/fwd+bwd) and write rows to JSON and plots.")
    from idflux.bench_perf.cli import add_bench_arguments, add_profile_parser

    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("env", help="versions, device and the backend each op will use",
                       description="Print torch/triton/CUDA versions, the device, and which backend each op takes.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_env)

    from idflux.engine.cli import add_export_parser, add_generate_parser
    from idflux.eval.cli import add_eval_parser
    from idflux.train.cli import add_train_parser

    add_generate_parser(sub)
    add_profile_parser(sub)
    add_export_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    from idflux.serve.app import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "compare"]:  # `idflux bench compare A.json B.json ...`: its own arguments
        from idflux.bench_perf.cli import run_compare

        return run_compare(argv[2:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
