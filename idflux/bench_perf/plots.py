"""Plots drawn from a results file: one PNG per op, one panel per mode, bars per provider."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from idflux.bench_perf.harness import load_results, shape_label


def plot_results(results_path, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = load_results(results_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_op: dict[str, list[dict]] = defaultdict(list)
    for row in doc["rows"]:
        if row.get("ms"):
            by_op[row["op"]].append(row)
    written = []
    for op, rows in by_op.items():
        modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
        fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.6 * len(modes)), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            sel = [r for r in rows if r["mode"] == mode]
            labels = list(dict.fromkeys(f"{shape_label(r['shape'])} {r['dtype']}" for r in sel))
            providers = list(dict.fromkeys(r["provider"] for r in sel))
            width = 0.8 / max(len(providers), 1)
            for i, prov in enumerate(providers):
                xs, ys = [], []
                for r in sel:
                    if r["provider"] == prov:
                        xs.append(labels.index(f"{shape_label(r['shape'])} {r['dtype']}") + i * width)
                        ys.append(r["ms"])
                ax.bar(xs, ys, width=width, label=prov)
            ax.set_yscale("log")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{op} — {mode}")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
            ax.set_xticklabels([lbl.replace(" ", "\n", 3) for lbl in labels], fontsize=7)
            ax.legend(fontsize=7, ncol=4)
        env = rows[0]
        fig.suptitle(f"{env['device_name']} · torch {env['torch']} · triton {env['triton']} · {env['commit']}", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
