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


#: Format tag in the metadata of our adapter files.
ADAPTER_FORMAT = "idflux-adapter"

#: Upper bounds on each AdapterConfig field a file may declare: checked before anything is built
#: (the released FLUX.1-dev adapter: hidden 3072, 24 x 64 heads, 57 blocks, 512-d ArcFace,
#: 256 x 768 SigLIP tokens).
CONFIG_BOUNDS = {"hidden": 16384, "heads": 256, "head_dim": 512, "n_blocks": 512, "arc_dim": 8192, "arc_tokens": 1024,
                 "arc_mlp_ratio": 16, "siglip_dim": 8192, "siglip_tokens": 4096}
#: Largest adapter a file may declare, in parameters (the released one has 2.78 B).
MAX_PARAMETERS = 20_000_000_000


def save_adapter(adapter: IdentityAdapter, path: str | os.PathLike, *, state_dict: dict | None = None,
                 metadata: dict | None = None) -> Path:
    """Save our adapter (weights + config) as safetensors, atomically; returns the path.

    ``state_dict`` replaces the adapter's own tensors (e.g. EMA weights of the same shapes);
    ``metadata`` adds string entries to the file's metadata (``format`` and ``config`` are ours).
    The file reads back with :func:`load_adapter` (config from the metadata, no other input).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ours = adapter.state_dict()
    source = ours if state_dict is None else state_dict
    if set(source) != set(ours) or any(tuple(source[k].shape) != tuple(ours[k].shape) for k in ours):
        raise ValueError(f"save_adapter: state_dict does not match the adapter {adapter.cfg} (names or shapes differ)")
    tensors = {k: source[k].detach().contiguous().cpu() for k in ours}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=ADAPTER_FORMAT, config=json.dumps(dataclasses.asdict(adapter.cfg)))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def adapter_config_from_metadata(meta: dict, path: str | os.PathLike = "adapter") -> AdapterConfig:
    """The :class:`AdapterConfig` an adapter file declares, validated and bounded (nothing built).

    Raises ValueError naming the field when the config is missing, not JSON, has unknown or
    missing fields, a non-integer value, a value below 1 or above :data:`CONFIG_BOUNDS`, or
    declares more than :data:`MAX_PARAMETERS` parameters.
    """
    text = meta.get("config")
    if not text:
        raise ValueError(f"load_adapter: {path} has no 'config' entry in its metadata (not written by save_adapter)")
    if len(text) > 10_000:
        raise ValueError(f"load_adapter: {path}: the metadata config is {len(text)} characters long; not an adapter config")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_adapter: {path}: the metadata config is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"load_adapter: {path}: the metadata config must be a JSON object, got {type(raw).__name__}")
    names = [f.name for f in dataclasses.fields(AdapterConfig)]
    unknown, missing = sorted(set(raw) - set(names)), [n for n in names if n not in raw]
    if unknown or missing:
        raise ValueError(f"load_adapter: {path}: the metadata config has unknown fields {unknown} / lacks {missing}; "
                         f"expected exactly {names}")
    for name in names:
        value, bound = raw[name], CONFIG_BOUNDS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise ValueError(f"load_adapter: {path}: config {name}={value!r} must be an integer in [1, {bound}]; "
                             "the file is corrupt or not an idflux adapter")
    cfg = AdapterConfig(**raw)
    n = adapter_parameter_count(cfg)
    if n > MAX_PARAMETERS:
        raise ValueError(f"load_adapter: {path}: config {cfg} declares {n:,} parameters (more than {MAX_PARAMETERS:,}); "
                         "refusing to build it")
    return cfg


def adapter_parameter_count(cfg: AdapterConfig) -> int:
    """Parameters of ``IdentityAdapter(cfg)``, by formula (nothing is built)."""
    width = cfg.arc_mlp_ratio * cfg.hidden
    arc = cfg.arc_dim * width + width + 2 * width + width * cfg.arc_tokens * cfg.hidden + cfg.arc_tokens * cfg.hidden
    sig = cfg.siglip_dim * cfg.hidden + cfg.hidden + 2 * cfg.hidden + cfg.hidden * cfg.hidden + cfg.hidden
    block = 4 * cfg.hidden + cfg.hidden * cfg.inner * 4
    return 2 * arc + sig + 2 * cfg.n_blocks * block


def load_adapter(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> IdentityAdapter:
    """Load an adapter saved by :func:`save_adapter` (its config travels in the file's metadata).

    The metadata is validated and bounded, and every tensor's name and shape checked against the
    declared config, before the adapter is built (on the meta device, then given the file's
    tensors): a corrupt or hostile file raises ValueError and allocates nothing beyond its header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"load_adapter: {path} is not an idflux adapter file (for the released checkpoint use "
                             "load_released_adapter; for a training checkpoint run `idflux export`)")
        cfg = adapter_config_from_metadata(meta, path)
        with torch.device("meta"):
            adapter = IdentityAdapter(cfg)
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        _check_names_and_shapes(path, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, expected)
        state = {k: f.get_tensor(k) for k in expected}
    adapter.load_state_dict(state, strict=True, assign=True)
    return adapter.to(device=device, dtype=dtype) if dtype else adapter.to(device)


def _check_names_and_shapes(path, found: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    bad = [f"{k}: file {found[k]} vs config {expected[k]}" for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unknown:
        problems.append(f"{len(unknown)} unknown (e.g. {unknown[:3]})")
    if bad:
        problems.append(f"{len(bad)} with wrong shapes (e.g. {bad[:3]})")
    if problems:
        raise ValueError(f"load_adapter: {path} does not match its declared config: " + "; ".join(problems))


def adapter_file_kind(path: str | os.PathLike) -> str:
    """What an adapter file holds, from its header only: ``"idflux"`` (:func:`save_adapter`),
    ``"released"`` (``withanyone.safetensors`` names) or ``"state_dict"`` (our tensor names without
    our metadata: an older training checkpoint's ``adapter.safetensors``). ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"adapter file {path} is not a readable safetensors file ({exc})") from None
    if meta.get("format") == ADAPTER_FORMAT:
        return "idflux"
    if keys and all(k.startswith(("arc_embed.", "sig_arc_embed.", "sig_embed.", "arc_blocks.", "sig_blocks.")) for k in keys):
        return "state_dict"
    try:
        if keys and all(released_to_ours(k) is not None or k.startswith("siglip_in_arc.") for k in keys):
            return "released"
    except KeyError:
        pass
    raise ValueError(f"adapter file {path} is neither an idflux adapter, the released withanyone.safetensors nor "
                     f"an adapter state dict (first keys: {keys[:3]})")


def load_any_adapter(path: str | os.PathLike, cfg: AdapterConfig, *, device="cpu",
                     dtype: torch.dtype | None = None) -> IdentityAdapter:
    """An adapter for a backbone that takes ``cfg`` from any of the three kinds of
    :func:`adapter_file_kind`; the file's config must equal ``cfg`` (ValueError naming both)."""
    kind = adapter_file_kind(path)
    if kind == "idflux":
        adapter = load_adapter(path)
        if adapter.cfg != cfg:
            raise ValueError(f"adapter file {path} was made for {adapter.cfg}, but this backbone takes {cfg}; "
                             "pass an adapter trained for this preset")
        return adapter.to(device=device, dtype=dtype) if dtype else adapter.to(device)
    with torch.device("meta"):
        adapter = IdentityAdapter(cfg)
    if kind == "released":
        load_released_adapter(adapter, path)
    else:
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        with safe_open(str(path), framework="pt") as f:
            _check_names_and_shapes(path, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, expected)
            state = {k: f.get_tensor(k) for k in expected}
        adapter.load_state_dict(state, strict=True, assign=True)
    return adapter.to(device=device, dtype=dtype) if dtype else adapter.to(device)
