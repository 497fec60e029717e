"""Run folders and checkpoints: atomic writes, resume from the newest valid checkpoint, a lock per run.

Layout of a run folder ``<out>``::

    train.lock                         held while a run uses the folder (JSON: pid, host, started)
    log.jsonl                          one line per optimizer step
    adapter.safetensors                the final adapter (idflux format), written when training ends
    adapter_ema.safetensors            its EMA weights (idflux format), when ema_decay is set
    checkpoints/step_<n>/{adapter.safetensors, adapter_ema.safetensors?, state.pt, config.json}
    checkpoints/latest                 one line naming the newest checkpoint folder

The adapter files are :func:`idflux.engine.weights.save_adapter`'s format (safetensors whose metadata
holds the AdapterConfig), so :func:`idflux.engine.weights.load_adapter` reads them directly.
``state.pt`` holds only tensors and plain containers (optimizer state, step, RNG states as tensors
and ints, the negative queue) and is read with ``torch.load(weights_only=True)``: a crafted one is
refused, never executed. A checkpoint is written into a temporary folder and renamed into place,
then ``latest`` is replaced atomically: a crash or a full disk leaves the previous checkpoint
intact and never a half-written one under its final name.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter.safetensors"
EMA_FILE = "adapter_ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LOCK_FILE = "train.lock"
_LEGACY_EMA_FILE = "ema.safetensors"  # checkpoints written before the idflux adapter format
#: What a run writes into its folder (``--overwrite`` removes these and nothing else; data/ stays).
RUN_OUTPUTS = ("checkpoints", "log.jsonl", "summary.json", "loss.png", "samples.png", ADAPTER_FILE, EMA_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or no checkpoint can be resumed; the message names the file."""


class RunFolderError(RuntimeError):
    """The run folder holds another run (or is in use by one)."""


# ----------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Every RNG a run draws from, as tensors and ints only (what ``weights_only`` loading admits)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (or the three entries of a checkpoint written before it)."""
    if "rng" in state:
        rng = state["rng"]
        n = rng["numpy"]
        np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(rng["torch"]), random.setstate(_tuples(rng["python"]))
    else:
        torch.set_rng_state(state["torch_rng"]), np.random.set_state(state["numpy_rng"]), random.setstate(state["python_rng"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------- writing

class _AdapterWeights:
    """What :func:`idflux.engine.weights.save_adapter` reads from an adapter: its config and tensors
    (lets the EMA weights be written in the same format without a second adapter module)."""

    def __init__(self, cfg, tensors: dict):
        self.cfg, self._tensors = cfg, tensors

    def state_dict(self) -> dict:
        return self._tensors


def save_adapter_file(tensors: dict, adapter_config, path: str | os.PathLike) -> Path:
    """Write adapter tensors in idflux's adapter format (atomically), readable by ``load_adapter``.

    adapter_config: the :class:`idflux.engine.adapter.AdapterConfig` the tensors belong to; None
    writes plain safetensors (no config metadata).
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if adapter_config is None:
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    else:
        from idflux.engine.weights import save_adapter

        save_adapter(_AdapterWeights(adapter_config, tensors), path)
    return path


def _nbytes(tree) -> int:
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0


def save_checkpoint(out: str | Path, step: int, *, weights: dict, state: dict, config: dict, ema: dict | None = None,
                    adapter_config=None) -> Path:
    """Write ``<out>/checkpoints/step_<step>`` atomically and point ``latest`` at it.

    weights / ema: adapter tensors (ema optional); state: tensors and plain containers only (it is
    read back with ``weights_only=True``); config: the run's TrainConfig as a dict; adapter_config:
    the AdapterConfig, stored in the adapter files' metadata. Raises :class:`CheckpointError` when
    the disk lacks room (checked before writing) or a write fails; the previous checkpoint and
    ``latest`` are then untouched and no partial folder is left.
    """
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    previous = _read_latest(root)
    keep = f"; the previous checkpoint {previous} is intact" if previous else ""
    need = _nbytes(weights) + _nbytes(ema or {}) + _nbytes(state) + (1 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(f"checkpoint step {step}: not enough free disk space in {root} ({_mb(free)} free, about "
                              f"{_mb(need)} needed); free some space and resume with --resume{keep}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_adapter_file(weights, adapter_config, tmp / ADAPTER_FILE)
        if ema is not None:
            save_adapter_file(ema, adapter_config, tmp / EMA_FILE)
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    except Exception as exc:  # noqa: BLE001 -- torch.save reports ENOSPC as "inline_container.cc ... unexpected pos"
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        raise CheckpointError(f"checkpoint step {step} could not be written to {tmp} ({type(exc).__name__}: {exc}); "
                              f"{_mb(free)} free on that disk (a full disk?){keep}") from exc
    if final.exists():  # an unusable checkpoint of this step (resume skipped it): kept aside, not deleted
        os.replace(final, root / f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    return final


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------- reading

def _read_latest(root: Path) -> Path | None:
    pointer = root / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    return root / name if name else None


def list_checkpoints(out: str | Path) -> list[Path]:
    """The ``step_<n>`` folders of a run, newest (highest step) first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        head, _, num = p.name.partition("_")
        if head == "step" and num.isdigit() and p.is_dir():
            found.append((int(num), p))
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict | None]:
    """(weights, state, ema or None) of a checkpoint folder.

    Raises :class:`CheckpointError` naming the file that is missing, corrupt, or (``state.pt``)
    holds anything but tensors and plain containers; nothing from the file is executed.
    """
    path = Path(path)

    def tensors(name: str) -> dict:
        f = path / name
        try:
            return load_file(str(f))
        except FileNotFoundError:
            raise CheckpointError(f"{f} is missing") from None
        except Exception as exc:  # noqa: BLE001 -- safetensors reports a damaged header in several ways
            raise CheckpointError(f"{f} is corrupt ({type(exc).__name__}: {exc})") from None

    weights = tensors(ADAPTER_FILE)
    ema_name = next((n for n in (EMA_FILE, _LEGACY_EMA_FILE) if (path / n).is_file()), None)
    ema = tensors(ema_name) if ema_name else None
    state = _load_state(path / STATE_FILE)
    head, _, num = path.name.partition("_")
    if head == "step" and num.isdigit() and state.get("step") != int(num):
        raise CheckpointError(f"{path / STATE_FILE} says step {state.get('step')!r}, its folder says {int(num)}")
    return weights, state, ema


def _load_state(f: Path) -> dict:
    if not f.is_file():
        raise CheckpointError(f"{f} is missing")
    # Checkpoints written before rng_state() hold numpy's RNG key as an ndarray: admitted as numpy
    # arrays only (the same globals idflux.safe_npy admits), still nothing executable.
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    try:
        with torch.serialization.safe_globals([multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]):
            state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1][:300]
        raise CheckpointError(f"{f} was refused: it holds objects other than tensors and plain containers, which are "
                              f"never unpickled ({first})") from None
    except Exception as exc:  # noqa: BLE001 -- truncated zip, wrong magic, ...
        raise CheckpointError(f"{f} is corrupt ({type(exc).__name__}: {str(exc).strip()[:300]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizer" not in state:
        raise CheckpointError(f"{f} is not a training state (no step / optimizer entries)")
    return state


def find_resume_checkpoint(out: str | Path) -> tuple[Path | None, tuple | None, list[str]]:
    """The newest checkpoint of ``out`` that loads: (folder, (weights, state, ema), problems).

    problems: one line per newer checkpoint that was passed over (and why), and a ``latest`` that
    names a missing folder. (None, None, problems) when no checkpoint loads.
    """
    root = Path(out) / "checkpoints"
    problems = []
    latest = _read_latest(root)
    if (root / "latest").exists() and (latest is None or not latest.is_dir()):
        problems.append(f"{root / 'latest'} names {latest.name if latest else 'nothing'}, which does not exist")
    for path in list_checkpoints(out):
        try:
            return path, load_checkpoint(path), problems
        except CheckpointError as exc:
            problems.append(f"{path.name}: {exc}")
    return None, None, problems


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest checkpoint folder of ``out`` that loads (None if there is none)."""
    return find_resume_checkpoint(out)[0]


# -------------------------------------------------------------------------------------- run folder

def run_outputs(out: str | Path) -> list[str]:
    """What of a previous run ``out`` holds (names from :data:`RUN_OUTPUTS`; an empty checkpoints/ does not count)."""
    out = Path(out)
    found = []
    for name in RUN_OUTPUTS:
        p = out / name
        if name == "checkpoints":
            if p.is_dir() and any(p.iterdir()):
                found.append(name)
        elif p.exists():
            found.append(name)
    return found


def prepare_run_folder(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a run unless ``resume`` or ``overwrite``; ``overwrite`` removes
    that run's outputs (:data:`RUN_OUTPUTS`, never a data/ folder)."""
    out = Path(out)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run in the folder, or replace it")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    found = run_outputs(out)
    if not found or resume:
        return
    if not overwrite:
        raise RunFolderError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --out")
    for name in found:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# -------------------------------------------------------------------------------------------- lock

_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


@contextmanager
def run_lock(out: str | Path):
    """Hold ``<out>/train.lock`` (pid, host, start time) while the block runs; re-entrant in one process.

    Another live process holding it: :class:`RunFolderError` naming its pid and host. A lock left
    by a process of this host that no longer runs (a killed run) is stale: it is reported (a
    warning) and taken over. A lock from another host cannot be checked: the error says which
    file to delete if no run uses the folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = (out / LOCK_FILE).resolve()
    if _HELD.get(path):
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic: fails if the lock exists, and never leaves a half-written one
                break
            except FileExistsError:
                held = _read_lock(path)
                if held is None:
                    raise RunFolderError(f"{path} exists but is not a lock idflux wrote; if no run uses {out}, "
                                         "delete it") from None
                if held.get("host") != host:
                    raise RunFolderError(f"{out} is in use by pid {held['pid']} on host {held.get('host')!r} since "
                                         f"{held.get('started')} ({path}); if no run uses it, delete that file") from None
                if held["pid"] != os.getpid() and _alive(held["pid"]):
                    raise RunFolderError(f"{out} is in use by another run: pid {held['pid']} on this host since "
                                         f"{held.get('started')} ({path}); wait for it or use another --out") from None
                warnings.warn(f"{path}: stale lock of pid {held['pid']} (started {held.get('started')}, no longer "
                              "running) taken over", RuntimeWarning, stacklevel=3)
                stale = path.with_name(f".{LOCK_FILE}.stale-{held['pid']}")
                try:
                    os.replace(path, stale)  # one taker wins; a second sees the winner's lock next round
                    stale.unlink()
                except FileNotFoundError:
                    pass
        else:
            raise RunFolderError(f"could not take {path}: other processes keep taking it")
    finally:
        tmp.unlink(missing_ok=True)
    _HELD[path] = 1
    try:
        yield path
    finally:
        _HELD.pop(path, None)
        if (_read_lock(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
