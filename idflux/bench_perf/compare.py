"""``idflux bench compare A.json B.json [...]``: ratios of two or more runs, row by row.

Rows are matched by their key (op, provider, mode, shape, dtype): the device and commit may differ,
which is the point (two commits, two machines). The first file is the baseline; for every other
file and every matched row, ``ratio = baseline time / other time`` (> 1: the other run is faster),
with the range the two rows' 20/80 percentiles allow (``lo``, ``hi``: baseline p20 / other p80 and
baseline p80 / other p20). A ratio whose range contains 1 is within the runs' spread (``~``).
``metric``: ``ms`` (eager), ``ms_device`` (CUDA-graph replay), ``auto`` (device time where both
rows have it, else eager) or ``eager-vs-graph`` (each file's own eager time against its own device
time; one file is enough).
"""

from __future__ import annotations

import json
from pathlib import Path

from idflux.bench_perf.harness import load_results, shape_label

METRICS = ("auto", "ms", "ms_device", "eager-vs-graph")


def row_key(row: dict) -> tuple:
    return (row["op"], row["provider"], row["mode"], json.dumps(row["shape"], sort_keys=True), row["dtype"])


def _times(row: dict, key: str):
    t = row.get(key)
    if not t:
        return None
    return t, row.get(f"{key}_p20") or t, row.get(f"{key}_p80") or t


def _entry(base: dict, other: dict, key_a: str, key_b: str, label: str) -> dict | None:
    a, b = _times(base, key_a), _times(other, key_b)
    if a is None or b is None:
        return None
    return {"op": base["op"], "provider": base["provider"], "mode": base["mode"], "shape": base["shape"],
            "dtype": base["dtype"], "against": label, "metric": key_a if key_a == key_b else f"{key_a}/{key_b}",
            "base_ms": a[0], "base_p20": a[1], "base_p80": a[2], "other_ms": b[0], "other_p20": b[1], "other_p80": b[2],
            "ratio": a[0] / b[0], "lo": a[1] / b[2], "hi": a[2] / b[1],
            "within_spread": a[1] / b[2] <= 1.0 <= a[2] / b[1]}


def compare_docs(docs: list[tuple[str, dict]], metric: str = "auto") -> list[dict]:
    """Entries for every other document's rows matched against the first's (see the module doc)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    out = []
    if metric == "eager-vs-graph":
        for label, doc in docs:
            for row in doc["rows"]:
                e = _entry(row, row, "ms", "ms_device", f"{label} (graph)")
                if e:
                    out.append(e)
        return out
    if len(docs) < 2:
        raise ValueError("compare needs two results files or more (or --metric eager-vs-graph)")
    (base_label, base_doc), others = docs[0], docs[1:]
    base = {row_key(r): r for r in base_doc["rows"] if r.get("ms")}
    for label, doc in others:
        for row in doc["rows"]:
            b = base.get(row_key(row))
            if b is None or not row.get("ms"):
                continue
            key = metric
            if metric == "auto":
                key = "ms_device" if b.get("ms_device") and row.get("ms_device") else "ms"
            e = _entry(b, row, key, key, label)
            if e:
                out.append(e)
    return out


def unmatched(docs: list[tuple[str, dict]]) -> list[str]:
    """Keys present in one file and not in the first (rows that cannot be compared)."""
    if len(docs) < 2:
        return []
    base = {row_key(r) for r in docs[0][1]["rows"]}
    missing = []
    for label, doc in docs[1:]:
        keys = {row_key(r) for r in doc["rows"]}
        missing += [f"{label}: only here: {k[0]} {k[1]} {k[2]} {k[4]} {shape_label(json.loads(k[3]))}" for k in keys - base]
        missing += [f"{label}: missing: {k[0]} {k[1]} {k[2]} {k[4]} {shape_label(json.loads(k[3]))}" for k in base - keys]
    return missing


def format_table(entries: list[dict], base_label: str) -> str:
    """A fixed-width table: one line per matched row, ratio with its spread range, ``~`` within it."""
    lines = [f"# ratio = {base_label} time / other time (> 1: the other is faster); [lo, hi] from the 20/80 percentiles; "
             "~ = within the runs' spread",
             f"{'op':<17} {'provider':<20} {'mode':<8} {'dtype':<5} {'base ms':>10} {'other ms':>10} {'ratio':>8}  "
             f"{'[lo, hi]':<17} {'metric':<10} against / shape"]
    for e in entries:
        mark = "~" if e["within_spread"] else ("+" if e["ratio"] > 1 else "-")
        lines.append(f"{e['op']:<17} {e['provider']:<20} {e['mode']:<8} {e['dtype']:<5} {e['base_ms']:10.4f} "
                     f"{e['other_ms']:10.4f} {e['ratio']:7.3f}x {mark} [{e['lo']:.2f}, {e['hi']:.2f}]".ljust(104)
                     + f" {e['metric']:<10} {e['against']} / {shape_label(e['shape'])}")
    return "\n".join(lines) + "\n"


def load_labelled(paths) -> list[tuple[str, dict]]:
    """(label, document) per file; a label is the file name (with its folder where names repeat)."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    return [(str(p) if names.count(p.name) > 1 else p.name, load_results(p)) for p in paths]


def plot_compare(entries: list[dict], path) -> Path:
    """Horizontal bars of the ratios (log scale), one colour per provider, error bars from [lo, hi],
    a line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idflux.bench_perf.plots import provider_colour

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(entries), 1)
    fig, ax = plt.subplots(figsize=(11, 0.32 * n + 1.6))
    ys = list(range(len(entries)))
    ratios = [e["ratio"] for e in entries]
    err = [[e["ratio"] - e["lo"] for e in entries], [e["hi"] - e["ratio"] for e in entries]]
    ax.barh(ys, ratios, color=[provider_colour(e["provider"]) for e in entries], xerr=err, capsize=2,
            error_kw={"elinewidth": 0.8})
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{e['op']} {e['provider']} {e['mode']} {e['dtype']} {shape_label(e['shape'])} ({e['against']})"
                        for e in entries], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("ratio: baseline time / other time (> 1: faster)")
    ax.set_title("idflux bench compare", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
