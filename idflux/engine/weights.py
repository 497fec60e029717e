"""Adapter weights: the released merged checkpoint (strict key and shape checks) and our own format."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from idflux.engine.adapter import AdapterConfig, IdentityAdapter, ours_to_released, released_to_ours


def released_state_dict_shapes(adapter: IdentityAdapter) -> dict[str, tuple[int, ...]]:
    """Our adapter's tensors under the released checkpoint's names (works on the meta device)."""
    return {ours_to_released(k): tuple(v.shape) for k, v in adapter.state_dict().items()}


def load_released_adapter(adapter: IdentityAdapter, path: str | os.PathLike) -> dict:
    """Load ``withanyone.safetensors`` (the released merged checkpoint) into ``adapter``.

    Every tensor the adapter needs must be present with the right shape; keys the released file
    carries only for training (``siglip_in_arc.*``) are skipped and reported; any other unknown
    key is an error. Returns {"loaded": n, "skipped": [names]}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter checkpoint {path} not found: download withanyone.safetensors from the Hugging Face repo "
            "WithAnyone/WithAnyone and pass its local path")
    ours = adapter.state_dict()
    found, skipped, unknown, bad_shapes = {}, [], [], []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            try:
                target = released_to_ours(name)
            except KeyError:
                unknown.append(name)
                continue
            if target is None:
                skipped.append(name)
                continue
            if target not in ours:
                unknown.append(name)
                continue
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(ours[target].shape):
                bad_shapes.append(f"{name}: file {shape} vs model {tuple(ours[target].shape)}")
                continue
            found[target] = f.get_tensor(name)
    missing = sorted(ours_to_released(k) for k in ours if k not in found)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unknown:
        problems.append(f"{len(unknown)} unknown (e.g. {unknown[:3]})")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} with wrong shapes (e.g. {bad_shapes[:3]})")
    if problems:
        raise ValueError(f"load_released_adapter: {path} does not match the adapter config {adapter.cfg}: " + "; ".join(problems))
    adapter.load_state_dict(found, strict=True, assign=any(p.is_meta for p in adapter.parameters()))
    return {"loaded": len(found), "skipped": skipped}


def save_adapter(adapter: IdentityAdapter, path: str | os.PathLike) -> None:
    """Save our adapter (weights + config) as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"format": "idflux-adapter", "config": json.dumps(dataclasses.asdict(adapter.cfg))})
    os.replace(tmp, path)


def load_adapter(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> IdentityAdapter:
    """Load an adapter saved by :func:`save_adapter` (its config travels in the file's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "idflux-adapter":
            raise ValueError(f"load_adapter: {path} is not an idflux adapter file (for the released checkpoint use load_released_adapter)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    adapter = IdentityAdapter(AdapterConfig(**json.loads(meta["config"])))
    adapter.load_state_dict(state, strict=True)
    return adapter.to(device=device, dtype=dtype) if dtype else adapter.to(device)
