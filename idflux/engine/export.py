"""Training checkpoint -> adapter file: what ``idflux export`` runs.

A checkpoint folder (``<run>/checkpoints/step_<n>/``, or the run folder itself once training has
ended) holds the adapter's weights (``adapter.safetensors``) and, when the run kept one, their EMA
(``adapter_ema.safetensors``; ``ema.safetensors`` in older runs), in the adapter format or, from
older runs, as plain state dicts; ``config.json`` names the preset, which
fixes the adapter's sizes. The export writes one file in the idflux adapter format
(:func:`idflux.engine.weights.save_adapter`: weights + config in the metadata) that
``idflux generate --adapter`` and ``IDFluxPipeline.from_pretrained(adapter=...)`` load. Nothing is
unpickled: ``state.pt`` is never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from idflux.engine.adapter import AdapterConfig, flux_dev_adapter, tiny_adapter

_PRESETS = {"tiny": tiny_adapter, "flux-dev": flux_dev_adapter}
#: Where a checkpoint keeps its EMA weights (the current name first, then the older one).
EMA_FILES = ("adapter_ema.safetensors", "ema.safetensors")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path``: a folder holding adapter.safetensors (a checkpoint, or a
    finished run's folder), else a run folder's ``checkpoints/latest``, else its newest ``step_*``.
    FileNotFoundError names what was looked for."""
    path = Path(path)
    if (path / "adapter.safetensors").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name and "/" not in name and (root / name / "adapter.safetensors").is_file():
            return root / name
    steps = sorted((p for p in root.glob("step_*") if (p / "adapter.safetensors").is_file()), key=lambda p: p.name)
    if steps:
        return steps[-1]
    raise FileNotFoundError(f"{path} is neither a checkpoint folder (with adapter.safetensors) nor a run folder with "
                            "checkpoints/step_*/adapter.safetensors; pass the --out folder of `idflux train` or one "
                            "of its checkpoints")


def checkpoint_adapter_config(checkpoint: Path) -> AdapterConfig | None:
    """The adapter sizes of a checkpoint's run, from its config.json preset (None when absent)."""
    config = checkpoint / "config.json"
    if not config.is_file():
        return None
    try:
        preset = json.loads(config.read_text()).get("preset")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{config} is not a training config JSON ({exc})") from None
    if preset not in _PRESETS:
        raise ValueError(f"{config}: unknown preset {preset!r}; expected one of {sorted(_PRESETS)}")
    return _PRESETS[preset]()


def export_adapter(checkpoint: str | os.PathLike, out: str | os.PathLike, *, ema: bool | None = None) -> dict:
    """Write the adapter of a training checkpoint (or run folder) to ``out`` in the idflux format.

    ema: True takes the EMA weights (an error if the run kept none), False the raw weights, None
    (default) the EMA weights when the checkpoint has them. Returns a summary
    {"checkpoint", "weights": "ema" | "raw", "step", "out", "config"}.
    """
    from idflux.engine.weights import adapter_file_kind, load_adapter, load_any_adapter, save_adapter

    ckpt = resolve_checkpoint(checkpoint)
    ema_file = next((ckpt / n for n in EMA_FILES if (ckpt / n).is_file()), ckpt / EMA_FILES[0])
    if ema and not ema_file.is_file():
        raise FileNotFoundError(f"{ckpt} has no {' or '.join(EMA_FILES)} (the run kept no EMA: train with --ema DECAY); "
                                "export without --ema for the raw weights")
    use_ema = ema_file.is_file() if ema is None else bool(ema)
    source = ema_file if use_ema else ckpt / "adapter.safetensors"
    kind = adapter_file_kind(source)
    if kind == "idflux":
        adapter = load_adapter(source)
    elif kind == "state_dict":
        cfg = checkpoint_adapter_config(ckpt)
        if cfg is None:
            raise ValueError(f"{ckpt} has no config.json, so the adapter sizes of {source.name} are unknown")
        adapter = load_any_adapter(source, cfg)
    else:
        raise ValueError(f"{source} holds released-format weights, not a training checkpoint's; use it directly "
                         "with --adapter")
    match = re.fullmatch(r"step_(\d+)", ckpt.name)
    step = int(match.group(1)) if match else None
    weights = "ema" if use_ema else "raw"
    save_adapter(adapter, out, metadata={"source_checkpoint": str(ckpt), "weights": weights,
                                         "step": "" if step is None else str(step)})
    return {"checkpoint": str(ckpt), "weights": weights, "step": step, "out": str(out),
            "config": dataclasses.asdict(adapter.cfg)}
