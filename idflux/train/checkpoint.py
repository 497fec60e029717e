"""Checkpoints written atomically: trainable weights in safetensors, the rest in a small state file.

Layout: ``<out>/checkpoints/step_<n>/{adapter.safetensors, ema.safetensors?, state.pt, config.json}``
written into a temporary folder first and renamed into place, then ``<out>/checkpoints/latest``
(a one-line file naming the folder) replaced atomically. A crash mid-write leaves the previous
checkpoint intact and never a half-written one under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(out: str | Path, step: int, *, weights: dict, state: dict, config: dict, ema: dict | None = None) -> Path:
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "adapter.safetensors"))
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict | None]:
    """(weights, state, ema or None) of a checkpoint folder."""
    path = Path(path)
    if not (path / "adapter.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no adapter.safetensors)")
    weights = load_file(str(path / "adapter.safetensors"))
    ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    state = torch.load(path / "state.pt", weights_only=False)
    return weights, state, ema
