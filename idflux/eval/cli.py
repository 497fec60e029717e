"""``idflux eval``: MultiID-Bench metrics of generated folders -> tables, JSON report, trade-off plot.

Registered on the main parser by :func:`add_eval_parser`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from idflux.eval.bench import SUBSETS, cases_from_generated, load_bench, write_cases

_DESCRIPTION = """\
Score generated images on MultiID-Bench: SimGT, SimRef, copy-paste (CP) and blending per face model
(Hungarian matching on cosine), CLIP-I / CLIP-T with --clip; a table per subset (p1 single, p2 two,
p3 three-four persons), a JSON report (--out) and a plot of SimGT against copy-paste per run.
With --write-cases alone it only converts the bench into an `idflux generate --batch` file.

examples:
  idflux eval --bench MultiID-Bench/ --write-cases cases.json
  idflux eval --bench MultiID-Bench/ --generated ours=out/ours --generated base=out/base \\
      --face-models ~/.insightface/models/buffalo_l --clip clip-vit-base-patch16/ --out eval/report.json
"""


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand on ``subparsers`` (from ``parser.add_subparsers``); returns it."""
    p = subparsers.add_parser("eval", help="MultiID-Bench metrics of generated images (tables, JSON, plot)",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", metavar="PATH",
                   help="MultiID-Bench: parquet file/folder, hf2bench folder or cases JSON; without it each "
                        "generated case folder must hold ori.* + ref_<k>.* + meta.json (released layout)")
    p.add_argument("--generated", action="append", default=[], metavar="[NAME=]DIR",
                   help="folder of generated images, <DIR>/<id>/out.png or <DIR>/<id>.png; repeat to compare "
                        "runs (NAME defaults to the folder name)")
    p.add_argument("--face-models", action="append", default=[], metavar="SPEC",
                   help="insightface pack folder or root (e.g. ~/.insightface/models/buffalo_l), or FILE.py:NAME / "
                        "module:NAME giving an idflux.eval.FaceModel; repeat to pool several models as released")
    p.add_argument("--face-pack", metavar="NAME", help="pack under an insightface root (default: the only one, "
                                                       "else buffalo_l, else antelopev2)")
    p.add_argument("--clip", metavar="DIR", help="local transformers CLIP folder (openai/clip-vit-base-patch16 "
                                                 "as released) for CLIP-I / CLIP-T; omitted: no CLIP columns")
    p.add_argument("--out", metavar="REPORT.json", help="JSON report (required with --generated)")
    p.add_argument("--plot", metavar="PNG", help="trade-off plot (default: <out stem>_tradeoff.png)")
    p.add_argument("--write-cases", metavar="CASES.json", help="write the cases for `idflux generate --batch`")
    p.add_argument("--extract-dir", metavar="DIR", help="where images stored inside parquet files are written "
                                                        "(default: bench_files/ beside --out or --write-cases)")
    p.add_argument("--subset", action="append", choices=SUBSETS, help="evaluate only these subsets (repeatable)")
    p.add_argument("--limit", type=int, metavar="N", help="first N cases only (smoke runs)")
    p.add_argument("--iqr", type=float, default=1.5, help="IQR multiplier of the outlier rule (default 1.5)")
    p.add_argument("--device", default="cpu", help="device for CLIP (default cpu; face models run on the CPU)")
    p.set_defaults(func=run_eval)
    return p


def _parse_runs(values: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or "/" in name or Path(value).exists():
            name, folder = Path(value).name or "run", value
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--generated: {path} is not a folder")
        base, k = name, 2
        while name in runs:
            name, k = f"{base}-{k}", k + 1
        runs[name] = path
    return runs


def run_eval(args) -> int:
    """Run ``idflux eval`` from parsed arguments; 0 on success, 1 when a run has no image, 2 on bad input."""
    from idflux.eval.clip import ClipScorer
    from idflux.eval.evaluate import evaluate
    from idflux.eval.faces import load_face_model
    from idflux.eval.report import format_tables, plot_tradeoff, write_report

    def fail(message: str) -> int:
        print(f"idflux eval: {message}", file=sys.stderr)
        return 2

    if not args.bench and not args.generated:
        return fail("pass --bench (and --write-cases to convert it) and/or --generated DIR")
    if args.generated and not args.out:
        return fail("--generated needs --out REPORT.json")
    if args.generated and not args.face_models:
        return fail("--generated needs --face-models (an insightface pack folder, or FILE.py:NAME)")
    if args.limit is not None and args.limit < 1:
        return fail(f"--limit must be >= 1, got {args.limit}")
    try:
        runs = _parse_runs(args.generated)
        if args.bench:
            anchor = Path(args.out or args.write_cases).parent if (args.out or args.write_cases) else Path.cwd()
            extract_dir = Path(args.extract_dir) if args.extract_dir else anchor / "bench_files"
            cases = load_bench(args.bench, extract_dir=extract_dir)
        else:
            cases = cases_from_generated(next(iter(runs.values())))
        if args.subset:
            cases = [c for c in cases if c["subset"] in args.subset]
        if args.limit:
            cases = cases[: args.limit]
        if not cases:
            return fail(f"no case left in {args.bench or args.generated[0]} after --subset / --limit")
        if args.write_cases:
            print(f"wrote {write_cases(cases, args.write_cases)} ({len(cases)} cases)")
        if not runs:
            return 0 if args.write_cases else fail("nothing to do: pass --generated DIR or --write-cases FILE")
        face_models = [load_face_model(spec, args.face_pack) for spec in args.face_models]
        clip = ClipScorer(args.clip, device=args.device) if args.clip else None
        report = evaluate(cases, runs, face_models, clip, iqr=args.iqr, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return fail(str(exc))
    out = write_report(report, args.out)
    for table in format_tables(report).values():
        print(table, end="\n\n")
    plot = plot_tradeoff(report, args.plot or out.with_name(out.stem + "_tradeoff.png"))
    print(f"wrote {out}\nwrote {plot}")
    empty = [run for run, doc in report["runs"].items()
             if all(row["status"] == "missing_image" for row in doc["cases"])]
    if empty:
        print(f"idflux eval: no generated image found for run(s) {', '.join(empty)} (looked for "
              f"<dir>/<id>/out.png or <dir>/<id>.png)", file=sys.stderr)
        return 1
    return 0
