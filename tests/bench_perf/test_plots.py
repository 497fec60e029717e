"""Plots drawn from a results file: a fixed colour per provider in every panel, p20-p80 error bars,
log-scale time, and a roofline per device from the rows' FLOPs and bytes."""

import json

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402

from idflux.bench_perf.plots import plot_results, provider_colour  # noqa: E402


def _row(provider, mode, ms, shape, device="Test GPU"):
    return {"op": "region_attention", "provider": provider, "mode": mode, "shape": shape, "dtype": "bf16",
            "ms": ms, "ms_p20": ms * 0.9, "ms_p80": ms * 1.2, "flops": 2e9, "bytes": 4e8, "device_name": device,
            "torch": "x", "triton": "y", "commit": "abc", "peak_gbps": 4800.0, "peak_tflops": 989.0}


def test_plots_fixed_colours_error_bars_log_time_and_roofline(tmp_path, monkeypatch):
    rows = [_row(p, m, ms, s) for m in ("fwd", "fwd+bwd") for s in ({"N": 1}, {"N": 2})
            for p, ms in (("triton", 0.1), ("sdpa_mask", 0.5), ("flex", 0.3))]
    rows = [r for r in rows if not (r["mode"] == "fwd" and r["provider"] == "flex")]  # panels differ in providers
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": rows}))
    bars, scales = [], []
    real_bar, real_scale = Axes.bar, Axes.set_yscale
    monkeypatch.setattr(Axes, "bar", lambda self, *a, **k: (bars.append((id(self), k)), real_bar(self, *a, **k))[1])
    monkeypatch.setattr(Axes, "set_yscale", lambda self, v, **k: (scales.append(v), real_scale(self, v, **k))[1])
    written = plot_results(path, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert "region_attention.png" in names and any(n.startswith("roofline") for n in names), names
    assert all((tmp_path / "plots" / n).stat().st_size > 0 for n in names)
    panels = {ax for ax, _ in bars}
    assert len(panels) == 2 and scales.count("log") >= 2
    for _, kw in bars:
        assert kw["color"] == provider_colour(kw["label"]), kw["label"]
        lo, hi = kw["yerr"]
        assert all(x > 0 for x in lo) and all(x > 0 for x in hi), "p20-p80 error bars"
    colours = {}
    for _, kw in bars:
        colours.setdefault(kw["label"], set()).add(kw["color"])
    assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == 3
