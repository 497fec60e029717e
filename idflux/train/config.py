"""Typed training configuration: the four-phase schedule, the presets, validation and config files.

A run's configuration is a preset (:func:`tiny`, :func:`flux_dev`), then a config file's keys
(:func:`load_config_file`: YAML or JSON, any subset of :class:`TrainConfig`'s fields), then command
line overrides; :meth:`TrainConfig.validate` checks every field before any work starts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class Phase:
    """One phase of the schedule."""

    name: str
    steps: int
    """Optimizer steps in this phase."""
    prompt_mode: str = "caption"
    """"fixed" (every sample gets ``fixed_prompt``) or "caption" (the sample's caption, with dropout)."""
    paired_ratio: float = 0.0
    """Probability that a face's reference is another gallery image of the same identity."""
    lr: float = 1e-4
    """Learning rate during the phase (constant)."""


def paper_phases(scale: float = 1.0) -> list[Phase]:
    """The paper's schedule: 20k fixed-prompt reconstruction, 40k with captions, 30k with 50% paired
    references, 10k quality tuning at lr 1e-5 (``scale`` shrinks every phase for smoke runs)."""
    n = lambda k: max(1, int(round(k * scale)))  # noqa: E731
    return [Phase("reconstruction-fixed", n(20_000), "fixed", 0.0, 1e-4),
            Phase("reconstruction-caption", n(40_000), "caption", 0.0, 1e-4),
            Phase("paired", n(30_000), "caption", 0.5, 1e-4),
            Phase("quality", n(10_000), "caption", 0.5, 1e-5)]


@dataclass
class TrainConfig:
    """Everything a run needs; saved next to its checkpoints."""

    preset: str = "tiny"
    """"tiny" (random tiny models, synthetic data, CPU) or "flux-dev" (real weights, GPU)."""
    out: str = "runs/tiny"
    """Run folder: checkpoints, log.jsonl, loss plot, samples."""
    data: str | None = None
    """MultiID-2M root (shards/ + ref/); tiny: None means synthetic data under ``<out>/data``."""
    synthetic_data: bool = False
    """Tiny preset: generate a synthetic set at ``data`` when it has no shards/ (only into a new or empty folder)."""
    phases: list[Phase] = field(default_factory=lambda: paper_phases())
    batch_size: int = 32
    """Global batch (split over processes)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    size: int = 512
    """Training resolution (multiple of 16)."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float | None = None
    """Keep an EMA of the adapter weights when set (e.g. 0.999)."""
    id_weight: float = 0.1
    cl_weight: float = 0.1
    id_gating: str = "all"
    """"all" noise levels (paper) or "released" (x1e-5 when t > 0.6)."""
    num_negatives: int = 4096
    tau: float = 0.1
    caption_dropout: float = 0.1
    fixed_prompt: str = "{people}"
    """Phase-1 prompt; "{people}" becomes the face count in words ("two people", as the paper's 2-person data)."""
    guidance: float = 1.0
    """Guidance embedding during training."""
    grad_checkpointing: bool = True
    shard_backbone: bool = False
    """Under torchrun: shard the frozen FLUX transformer with FSDP2 (per block) instead of replicating it."""
    checkpoint_every: int = 500
    num_workers: int = 0
    """DataLoader worker processes preparing micro-batches ahead of the step (0: in the training process)."""
    seed: int = 0
    device: str = "cuda"
    flux: str | None = None
    """FLUX.1-dev diffusers folder (flux-dev preset)."""
    face_models: str | None = None
    siglip: str | None = None
    adapter_init: str | None = None
    """Optional adapter weights to start from (released or idflux format)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["two people"])

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> Phase:
        """The phase that optimizer step ``step`` (0-based) belongs to."""
        for p in self.phases:
            if step < p.steps:
                return p
            step -= p.steps
        return self.phases[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = False) -> "TrainConfig":
        """A config from :meth:`to_dict`'s form. Unknown keys (a config saved by another version, e.g.
        the removed log_every) are warned about and ignored, or with ``strict`` an error naming them."""
        return _apply(cls(phases=[]), d, strict=strict, where="TrainConfig.from_dict", fill_missing_phases=True)

    def validate(self) -> "TrainConfig":
        """Check every field (type and range); raises :class:`ConfigError` naming the field, its
        command-line flag and the bad value. Returns self."""
        for f in fields(self):
            check = _CHECKS.get(f.name)
            if check is not None:
                problem = check(getattr(self, f.name))
                if problem:
                    raise ConfigError(f"{_label(f.name)} {problem}, got {getattr(self, f.name)!r}")
        for i, ph in enumerate(self.phases):
            for name, check in _PHASE_CHECKS.items():
                problem = check(getattr(ph, name))
                if problem:
                    raise ConfigError(f"phases[{i}].{name} ({ph.name!r}) {problem}, got {getattr(ph, name)!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size (--batch-size) {self.batch_size} must be divisible by grad_accum (--grad-accum) "
                              f"{self.grad_accum}")
        if self.adapter_init is not None and not Path(self.adapter_init).is_file():
            raise ConfigError(f"adapter_init (--adapter-init) {self.adapter_init} is not a file")
        return self


class ConfigError(ValueError):
    """A training option is invalid; the message names the field, its flag and the fix."""


_FLAGS = {"batch_size": "--batch-size", "grad_accum": "--grad-accum", "size": "--size", "ema_decay": "--ema",
          "id_gating": "--id-gating", "num_workers": "--workers", "seed": "--seed", "device": "--device",
          "adapter_init": "--adapter-init", "checkpoint_every": "--checkpoint-every", "preset": "--preset",
          "out": "--out", "data": "--data", "synthetic_data": "--synthetic-data", "shard_backbone": "--shard-backbone",
          "flux": "--flux", "face_models": "--face-models", "siglip": "--siglip"}


def _label(name: str) -> str:
    return f"{name} ({_FLAGS[name]})" if name in _FLAGS else name


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(low: int, high: int | None = None):
    return lambda x: None if _is_int(x) and x >= low and (high is None or x < high) else \
        f"must be an int >= {low}" + (f" and < {high}" if high is not None else "")


def _num(low: float, *, open_low: bool = False, high: float | None = None, open_high: bool = False):
    def check(x):
        ok = _is_num(x) and (x > low if open_low else x >= low) and (high is None or (x < high if open_high else x <= high))
        rng = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}{')' if open_high or high is None else ']'}"
        return None if ok else f"must be a finite number in {rng}"
    return check


def _choice(*options):
    return lambda x: None if x in options else f"must be one of {list(options)}"


def _opt_str(x):
    return None if x is None or (isinstance(x, str) and x) else "must be a non-empty path string or null"


def _device(x):
    if not isinstance(x, str) or not (x == "cpu" or x == "cuda" or (x.startswith("cuda:") and x[5:].isdigit())):
        return "must be 'cpu', 'cuda' or 'cuda:N'"
    return None


_CHECKS = {
    "preset": _choice("tiny", "flux-dev"),
    "out": lambda x: None if isinstance(x, str) and x else "must be a non-empty folder path",
    "data": _opt_str,
    "synthetic_data": lambda x: None if isinstance(x, bool) else "must be true or false",
    "phases": lambda x: None if isinstance(x, list) and x and all(isinstance(p, Phase) for p in x) else "must be a non-empty list of phases",
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "size": lambda x: None if _is_int(x) and x >= 16 and x % 16 == 0 else "must be a multiple of 16, >= 16",
    "weight_decay": _num(0.0),
    "grad_clip": _num(0.0, open_low=True),
    "ema_decay": lambda x: None if x is None else _num(0.0, high=1.0, open_high=True)(x),
    "id_weight": _num(0.0),
    "cl_weight": _num(0.0),
    "id_gating": _choice("all", "released"),
    "num_negatives": _int(0),
    "tau": _num(0.0, open_low=True),
    "caption_dropout": _num(0.0, high=1.0),
    "fixed_prompt": lambda x: None if isinstance(x, str) else "must be a string",
    "guidance": _num(0.0),
    "grad_checkpointing": lambda x: None if isinstance(x, bool) else "must be true or false",
    "shard_backbone": lambda x: None if isinstance(x, bool) else "must be true or false",
    "checkpoint_every": _int(1),
    "num_workers": _int(0),
    "seed": _int(0, 2**32),
    "device": _device,
    "flux": _opt_str,
    "face_models": _opt_str,
    "siglip": _opt_str,
    "adapter_init": _opt_str,
    "sample_prompts": lambda x: None if isinstance(x, list) and all(isinstance(p, str) for p in x) else "must be a list of strings",
}
_PHASE_CHECKS = {
    "name": lambda x: None if isinstance(x, str) and x else "must be a non-empty string",
    "steps": _int(1),
    "prompt_mode": _choice("fixed", "caption"),
    "paired_ratio": _num(0.0, high=1.0),
    "lr": _num(0.0, open_low=True),
}


def _apply(cfg: TrainConfig, d, *, strict: bool, where: str, fill_missing_phases: bool = False) -> TrainConfig:
    """``cfg`` with the keys of ``d`` replacing its fields (``phases``: a list of phase dicts)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of TrainConfig fields, got a {type(d).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown and strict:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; TrainConfig fields are {sorted(known)}")
    if unknown:
        warnings.warn(f"{where}: ignoring unknown fields {unknown}", stacklevel=3)
    for key, value in d.items():
        if key not in known:
            continue
        if key == "phases":
            value = [_phase(p, i, where, strict) for i, p in enumerate(value)] if isinstance(value, list) else value
        setattr(cfg, key, _float_text(key, value))
    if fill_missing_phases and "phases" not in d:
        cfg.phases = paper_phases()
    return cfg


_FLOATS = {"weight_decay", "grad_clip", "ema_decay", "id_weight", "cl_weight", "tau", "caption_dropout", "guidance",
           "paired_ratio", "lr"}


def _float_text(key: str, value):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: a float field takes it as the number it spells."""
    if key in _FLOATS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # validate() names it
    return value


def _phase(p, i: int, where: str, strict: bool) -> Phase:
    if isinstance(p, Phase):
        return p
    if not isinstance(p, dict):
        raise ConfigError(f"{where}: phases[{i}] must be a mapping with name, steps, prompt_mode, paired_ratio, lr")
    known = {f.name for f in fields(Phase)}
    unknown = sorted(set(p) - known)
    if unknown and strict:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in phases[{i}]; Phase fields are {sorted(known)}")
    missing = sorted({"name", "steps"} - set(p))
    if missing:
        raise ConfigError(f"{where}: phases[{i}] lacks {missing}")
    return Phase(**{k: _float_text(k, v) for k, v in p.items() if k in known})


def load_config_file(path) -> dict:
    """The mapping in a YAML or JSON config file (any subset of TrainConfig's fields; ``phases`` a
    list of mappings). Raises :class:`ConfigError` naming the file for a missing file, a parse
    error or a top level that is not a mapping. Read with ``yaml.safe_load`` (no Python objects).

    Example file (YAML)::

        preset: tiny
        num_negatives: 32
        phases:
          - {name: reconstruction, steps: 20, prompt_mode: fixed, lr: 2.0e-3}
          - {name: quality, steps: 10, paired_ratio: 0.5, lr: 2.0e-4}
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of TrainConfig fields, got {type(data).__name__}")
    return data


def resolve(preset: str | None = None, file: dict | None = None, overrides: dict | None = None,
            where: str = "--config") -> TrainConfig:
    """Preset, then a config file's keys, then overrides (each a dict of TrainConfig fields); validated.

    The preset is ``overrides["preset"]``, else ``file["preset"]``, else ``preset``, else "tiny";
    ``out`` defaults to ``runs/<preset>``.
    """
    file, overrides = dict(file or {}), dict(overrides or {})
    name = overrides.get("preset") or file.get("preset") or preset or "tiny"
    if name not in ("tiny", "flux-dev"):
        raise ConfigError(f"preset (--preset) must be one of ['tiny', 'flux-dev'], got {name!r}")
    cfg = tiny() if name == "tiny" else flux_dev()
    cfg.out = f"runs/{name}"
    _apply(cfg, file, strict=True, where=where)
    _apply(cfg, overrides, strict=True, where="command line")
    return cfg.validate()


def tiny(out: str = "runs/tiny", **overrides) -> TrainConfig:
    """CPU smoke preset: tiny random FLUX/adapter/face models, synthetic data, 64^2, a few steps per phase."""
    cfg = TrainConfig(preset="tiny", out=out, phases=[Phase("reconstruction-fixed", 40, "fixed", 0.0, 2e-3),
                                                     Phase("reconstruction-caption", 40, "caption", 0.0, 2e-3),
                                                     Phase("paired", 30, "caption", 0.5, 2e-3),
                                                     Phase("quality", 20, "caption", 0.5, 2e-4)],
                      batch_size=4, size=64, num_negatives=64, grad_checkpointing=False, checkpoint_every=40, device="cpu",
                      sample_prompts=["two people", "a person smiling"])
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def flux_dev(out: str = "runs/flux-dev", **overrides) -> TrainConfig:
    """The paper's recipe on FLUX.1-dev: global batch 32 at 512^2, AdamW 1e-4 / wd 0.01, clip 1.0, bf16,
    gradient checkpointing, 4096 negatives, loss weights 0.1 / 0.1."""
    cfg = TrainConfig(preset="flux-dev", out=out, num_workers=4)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
