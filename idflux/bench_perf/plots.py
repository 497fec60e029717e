"""Plots drawn from a results file.

- ``<op>.png``: one panel per mode, one bar per provider and case, log-scale time with p20-p80
  error bars; a provider keeps its colour in every panel and every plot (:func:`provider_colour`).
- ``roofline_<device>.png``: per device, each row's achieved FLOP/s against its arithmetic
  intensity (FLOPs / bytes it must move), with the device's compute roof and bandwidth roof from
  the rows' peaks (the table of known devices or an override; a CPU has none unless given).
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from pathlib import Path

from idflux.bench_perf.harness import load_results, shape_label

# Fixed colours for the providers the benchmarks name; any other gets one from its name's hash.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
            "#756bb1", "#636363"]
PROVIDER_COLOURS = {
    "triton": "#d62728", "triton_packed": "#ff7f0e", "triton_nocheck": "#e377c2", "triton+plan": "#8c564b",
    "triton_atomic_bwd": "#bcbd22", "triton_scatter_bwd": "#bcbd22", "ref": "#2ca02c", "ours": "#d62728",
    "ours+prepare": "#ff7f0e", "sdpa_mask": "#1f77b4", "sdpa_mask+build": "#17becf", "flex": "#9467bd",
    "gather_sdpa": "#7f7f7f", "copy": "#000000", "mask_build": "#c7c7c7", "xformers": "#393b79",
    "xformers_blockdiag": "#6b6ecf", "gathered_ce": "#1f77b4", "compile_ref": "#9467bd", "grid_sample_bicubic": "#1f77b4",
    "grid_sample_bilinear": "#17becf", "kornia": "#9467bd", "grad_write": "#000000", "released": "#1f77b4",
    "released+loops": "#17becf", "adapter": "#d62728", "no_adapter": "#1f77b4",
}


def provider_colour(provider: str) -> str:
    """The provider's colour: fixed for known names, stable (hash of the name) for others."""
    return PROVIDER_COLOURS.get(provider) or _PALETTE[zlib.crc32(provider.encode()) % len(_PALETTE)]


def _wrap(label: str, width: int = 22) -> str:
    words, lines, cur = label.split(" "), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)


def plot_results(results_path, out_dir) -> list[Path]:
    """One PNG per op and one roofline per device; returns the paths written."""
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
        providers = list(dict.fromkeys(r["provider"] for r in rows))  # one legend for all panels
        labels_all = list(dict.fromkeys(f"{shape_label(r['shape'])} {r['dtype']}" for r in rows))
        fig, axes = plt.subplots(len(modes), 1, figsize=(max(11, 1.6 * len(labels_all) * max(1, len(providers)) / 4),
                                                         3.8 * len(modes) + 0.8), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            sel = [r for r in rows if r["mode"] == mode]
            labels = list(dict.fromkeys(f"{shape_label(r['shape'])} {r['dtype']}" for r in sel))
            here = [p for p in providers if any(r["provider"] == p for r in sel)]
            width = 0.8 / max(len(here), 1)
            for i, prov in enumerate(here):
                xs, ys, lo, hi = [], [], [], []
                for r in sel:
                    if r["provider"] == prov:
                        xs.append(labels.index(f"{shape_label(r['shape'])} {r['dtype']}") + i * width)
                        ys.append(r["ms"])
                        lo.append(max(r["ms"] - r.get("ms_p20", r["ms"]), 0.0))
                        hi.append(max(r.get("ms_p80", r["ms"]) - r["ms"], 0.0))
                ax.bar(xs, ys, width=width, color=provider_colour(prov), label=prov, yerr=[lo, hi], capsize=2,
                       error_kw={"elinewidth": 0.8})
            ax.set_yscale("log")
            ax.set_ylabel("ms (median, p20-p80)")
            ax.set_title(f"{op} — {mode}", fontsize=10)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
            ax.set_xticklabels([_wrap(lbl) for lbl in labels], fontsize=7)
            ax.grid(axis="y", which="both", alpha=0.25)
        handles = [plt.Rectangle((0, 0), 1, 1, color=provider_colour(p)) for p in providers]
        fig.legend(handles, providers, loc="upper center", ncol=min(len(providers), 6), fontsize=8, frameon=False)
        env = rows[0]
        fig.suptitle(f"{env['device_name']} · torch {env['torch']} · triton {env['triton']} · {env['commit']}",
                     fontsize=8, y=0.005, va="bottom")
        fig.tight_layout(rect=(0, 0.03, 1, 0.95))
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    written += plot_roofline(doc, out_dir)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "device"


def plot_roofline(doc: dict, out_dir) -> list[Path]:
    """One roofline per device in ``doc`` (rows with FLOPs and bytes); device time where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    by_device: dict[str, list[dict]] = defaultdict(list)
    for row in doc["rows"]:
        if row.get("ms") and row.get("flops") and row.get("bytes"):
            by_device[row.get("device_name", "?")].append(row)
    written = []
    for device, rows in by_device.items():
        fig, ax = plt.subplots(figsize=(9, 6))
        seen = set()
        xs_all, ys_all = [], []
        for r in rows:
            ms = r.get("ms_device") or r["ms"]
            x, y = r["flops"] / r["bytes"], r["flops"] / (ms * 1e-3)
            xs_all.append(x)
            ys_all.append(y)
            label = r["provider"] if r["provider"] not in seen else None
            seen.add(r["provider"])
            ax.scatter([x], [y], color=provider_colour(r["provider"]), label=label, s=22,
                       marker={"fwd": "o", "bwd": "s", "fwd+bwd": "^"}.get(r["mode"], "o"))
        lo_x, hi_x = min(xs_all) / 3, max(xs_all) * 3
        roofs = {}
        for r in rows:
            if r.get("peak_gbps") and r.get("peak_tflops"):
                roofs[r["dtype"]] = (r["peak_gbps"], r["peak_tflops"])
        for dtype, (gbps, tflops) in sorted(roofs.items()):
            ridge = tflops * 1e12 / (gbps * 1e9)
            hi_x = max(hi_x, ridge * 3)
            xs = [lo_x, ridge, hi_x]
            ax.plot(xs, [min(gbps * 1e9 * x, tflops * 1e12) for x in xs], linestyle="--", linewidth=1,
                    label=f"roof {dtype}: {tflops:g} TFLOP/s, {gbps:g} GB/s")
        if not roofs:
            ax.text(0.02, 0.02, "no peaks known for this device: pass --peak-gbps/--peak-tflops for its roofs",
                    transform=ax.transAxes, fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte it must move)")
        ax.set_ylabel("achieved FLOP/s (CUDA-graph device time where measured)")
        ax.set_title(f"roofline — {device}  (o fwd, s bwd, ^ fwd+bwd)", fontsize=9)
        ax.grid(which="both", alpha=0.2)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out_dir / f"roofline_{_slug(device)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
