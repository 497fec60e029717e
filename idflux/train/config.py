"""Typed training configuration: the four-phase schedule and the presets."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields


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
    """MultiID-2M root (shards/ + ref/); tiny: generated there when missing."""
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
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["phases"] = [Phase(**p) for p in d.get("phases", [])]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:  # a config saved by another version (e.g. the removed, never-read log_every)
            warnings.warn(f"TrainConfig.from_dict: ignoring unknown fields {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})


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
