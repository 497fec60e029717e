"""Low VRAM: fp8 storage survives dtype casts, the full-precision transformer never reaches the device
with fp8, and the peak memory is measured."""

import json
import mmap

import pytest
import torch

from idflux.engine.lowvram import FP8, Fp8Linear, peak_memory, store_linears_fp8, track_peak

pytest.importorskip("diffusers")


def test_fp8_storage_survives_a_dtype_cast():
    lin = torch.nn.Linear(32, 16)
    model = torch.nn.Sequential(lin, torch.nn.LayerNorm(16))
    x = torch.randn(4, 32)
    assert store_linears_fp8(model) == 1 and store_linears_fp8(model) == 0, "converting twice converts nothing"
    before = model[0].weight_fp8.clone()
    model.to(torch.bfloat16)  # what Pipeline does to every module of another dtype
    q = model[0]
    assert q.weight_fp8.dtype == FP8 and torch.equal(q.weight_fp8.view(torch.uint8), before.view(torch.uint8))
    assert q.scale.dtype == torch.bfloat16 and q(x.bfloat16()).dtype == torch.bfloat16
    assert isinstance(q, torch.nn.Linear) and q.weight.shape == (16, 32)


def test_fp8_pipeline_never_moves_full_precision_linears_to_the_device(monkeypatch):
    from idflux.engine.adapter import IdentityAdapter, tiny_adapter
    from idflux.engine.loading import tiny_flux_parts
    from idflux.engine.pipeline import Pipeline

    parts = tiny_flux_parts()
    moved = []
    real_to = type(parts.transformer).to

    def spy_to(self, *args, **kwargs):
        if self is parts.transformer and any(isinstance(a, (str, torch.device)) for a in args):
            moved.append(sum(type(m) is torch.nn.Linear for m in self.modules()))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(type(parts.transformer), "to", spy_to)
    Pipeline(parts, IdentityAdapter(tiny_adapter()), fp8=True)
    assert moved and all(n == 0 for n in moved), f"full-precision Linears moved to the device: {moved}"


def test_peak_memory_on_the_cpu_is_json_ready_and_tracks_a_block():
    with track_peak("cpu") as m:
        # fresh anonymous pages, touched: an allocator could hand back memory the process already holds
        buf = mmap.mmap(-1, 64 * 2**20)
        for page in range(0, len(buf), mmap.PAGESIZE):
            buf[page] = 1
        buf.close()
    d = m.as_dict()
    json.dumps(d)
    assert d["device"] == "cpu" and d["kind"] == "rss_high_water" and d["bytes"] > 0
    if m.reset and m.start_bytes:
        assert d["bytes"] - m.start_bytes > 48 * 2**20, d
    assert peak_memory("cpu")["bytes"] >= d["bytes"] - 2**20
