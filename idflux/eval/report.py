"""Evaluation report output: the paper-style table per subset, the JSON file and the trade-off plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from idflux.eval.bench import SUBSET_TITLES

#: (report key, column header) in the paper's order; arrows say which way is better.
COLUMNS = (("SimGT", "SimGT↑"), ("SimRef", "SimRef"), ("CP", "CP↓"), ("blending", "Bld↓"),
           ("CLIP-I", "CLIP-I↑"), ("CLIP-T", "CLIP-T↑"))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_tables(report: dict) -> dict[str, str]:
    """One text table per subset: a row per run (mean after IQR outlier removal), like the paper's tables."""
    columns = [c for c in COLUMNS if report.get("clip") or not c[0].startswith("CLIP")]
    run_width = max([len("run")] + [len(r) for r in report["runs"]])
    tables = {}
    for subset in report["subsets"]:
        header = (f"MultiID-Bench {subset} ({SUBSET_TITLES[subset]}) - face models: {', '.join(report['face_models'])}"
                  f"; means after IQR({report['iqr']}) outlier removal")
        lines = [header, f"{'run':<{run_width}}  {'cases':>9}  " + "  ".join(f"{h:>7}" for _, h in columns)
                 + f"  {'no-face':>7}  {'miss':>6}"]
        for run, doc in report["runs"].items():
            s = doc["summary"][subset]
            cells = "  ".join(f"{_fmt(s['metrics'][key]['mean']):>7}" for key, _ in columns)
            lines.append(f"{run:<{run_width}}  {str(s['evaluated']) + '/' + str(s['cases']):>9}  {cells}"
                         f"  {s['no_face']:>7}  {s['missing_faces']:>6.1f}")
        tables[subset] = "\n".join(lines)
    return tables


def write_report(report: dict, path) -> Path:
    """Write the report (with its tables) as JSON, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(report, tables=format_tables(report))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_tradeoff(report: dict, path) -> Path:
    """SimGT against copy-paste, one panel per subset, one point per run (the paper's trade-off figure).

    Upper left is best: faithful to the GT identity without copying the reference.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = report["subsets"]
    fig, axes = plt.subplots(1, len(subsets), figsize=(4.6 * len(subsets), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, subset in zip(axes[0], subsets):
        for i, (run, doc) in enumerate(report["runs"].items()):
            metrics = doc["summary"][subset]["metrics"]
            x, y = metrics["CP"]["mean"], metrics["SimGT"]["mean"]
            if x is None or y is None:
                continue
            colour = colours[i % len(colours)]
            ax.scatter([x], [y], s=60, color=colour, label=run, zorder=3)
            ax.annotate(run, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=colour)
        ax.set_title(f"{subset} ({SUBSET_TITLES[subset]})", fontsize=10)
        ax.set_xlabel("copy-paste M_CP (lower: less copying)")
        ax.set_ylabel("SimGT (higher: closer to the GT identity)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"MultiID-Bench fidelity vs copy-paste - {', '.join(report['face_models'])}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
