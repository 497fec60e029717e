"""Training data as the trainer reads it: a phase-aware view of MultiIDDataset and the collate step.

Global sample index i (the i-th sample of the run, over all processes) maps to the dataset's
stream position i; a skipped (corrupt) sample is replaced by position i + k * len(dataset) for the
first k that loads, so the substitute is deterministic and the same whatever the process count.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from idflux.train.config import Phase, TrainConfig
from idflux.train.data import MultiIDDataset
from idflux.engine.lowvram import to_device
from idflux.train.model import TrainBatch


class PhasedDataset:
    """MultiIDDataset whose prompt mode and paired-reference ratio follow the current phase."""

    def __init__(self, dataset: MultiIDDataset, fixed_prompt: str, max_retries: int = 8):
        self.dataset, self.fixed_prompt, self.max_retries = dataset, fixed_prompt, max_retries

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, phase: Phase) -> dict:
        ds = self.dataset
        ds.paired_prob = phase.paired_ratio
        ds.fixed_prompt = self.fixed_prompt if phase.prompt_mode == "fixed" else None
        substituted = []
        for k in range(self.max_retries):
            s = ds[index + k * len(ds)]
            if "skipped" not in s:
                if substituted:  # what was skipped on the way (a worker process reports it with the sample)
                    s["substituted"] = substituted
                return s
            substituted.append(s["skipped"])
        raise RuntimeError(f"training data: {self.max_retries} substitutes for sample {index} were all skipped "
                           f"({dict(ds.skipped)}); check the shards")

    @property
    def skipped(self):
        return self.dataset.skipped

    @property
    def worker_safe(self) -> bool:
        """Whether DataLoader workers may prepare samples: not while landmarks come from a face
        detector on the fly (its onnxruntime session, possibly on the GPU, does not survive a
        fork, and its cache would be per worker)."""
        return getattr(self.dataset, "landmark_fn", None) is None


class StepSamples(torch.utils.data.Dataset):
    """Global sample index i -> the sample, in the phase of the optimizer step it belongs to
    (step i // batch_size): what a DataLoader's workers call."""

    def __init__(self, dataset, cfg: TrainConfig):
        self.dataset, self.cfg = dataset, cfg

    def __len__(self) -> int:
        return self.cfg.total_steps * self.cfg.batch_size

    def __getitem__(self, index: int) -> dict:
        return self.dataset.sample(index, self.cfg.phase_at(index // self.cfg.batch_size))


def micro_batch_indices(cfg: TrainConfig, start_step: int, total: int, rank: int, micro: int):
    """The global sample indices of each micro-batch this process runs, steps start_step..total-1 in
    order: step s, micro-batch m takes [s * batch + m * (batch / accum) + rank * micro, ... + micro)."""
    for step in range(start_step, total):
        for m in range(cfg.grad_accum):
            first = step * cfg.batch_size + m * (cfg.batch_size // cfg.grad_accum) + rank * micro
            yield list(range(first, first + micro))


def micro_batches(dataset, cfg: TrainConfig, start_step: int, total: int, rank: int, micro: int):
    """Iterator of (indices, samples) per micro-batch, in order. With ``cfg.num_workers`` > 0 a
    DataLoader prepares them in worker processes, ahead of the step; each sample is a function of
    its index alone, so the run is the same with any number of workers. Skips a worker met are
    added to ``dataset.skipped`` here."""
    batches = micro_batch_indices(cfg, start_step, total, rank, micro)
    workers = cfg.num_workers
    if workers and not getattr(dataset, "worker_safe", True):
        warnings.warn(f"training data: landmarks are detected on the fly, which stays in the training process; "
                      f"num_workers={workers} ignored (store landmarks in the shards to load in workers)", stacklevel=2)
        workers = 0
    if not workers:
        for indices in batches:
            yield indices, [dataset.sample(i, cfg.phase_at(i // cfg.batch_size)) for i in indices]
        return
    batches = list(batches)
    loader = torch.utils.data.DataLoader(StepSamples(dataset, cfg), batch_sampler=batches, num_workers=workers,
                                         collate_fn=list, prefetch_factor=2)
    for indices, samples in zip(batches, loader):
        for s in samples:
            for kind in s.pop("substituted", ()):
                dataset.skipped[kind] += 1
        yield indices, samples


class DataError(FileNotFoundError):
    """The training data folder is missing or unusable; the message names it and the fix."""


def data_root(cfg: TrainConfig) -> Path:
    """``cfg.data``, or for the tiny preset the default synthetic-data folder ``<out>/data``."""
    if cfg.data:
        return Path(cfg.data)
    if cfg.preset != "tiny":
        raise DataError(f"the {cfg.preset} preset needs --data: a MultiID-2M folder (shards/*.tar + ref/)")
    return Path(cfg.out) / "data"


def prepare_data(cfg: TrainConfig) -> Path:
    """Make sure the run's data exists; return its root.

    Synthetic data (tiny preset) is generated only where asked: into the default folder
    ``<out>/data`` (no ``--data``), or into ``--data`` with ``--synthetic-data``; and only into a
    folder that does not exist or is empty (never next to a user's files or shards). It is written
    into a temporary folder beside the target and renamed into place, so a reader sees all of it or
    none. Under torchrun call it on rank 0 only (:func:`idflux.train.distributed.on_rank0`).
    """
    root = data_root(cfg)
    if (root / "shards").is_dir():
        return root
    asked = cfg.data is None or cfg.synthetic_data
    where = "--data" if cfg.data else "the default data folder"
    if cfg.preset != "tiny" or not asked:
        hint = (" (the tiny preset generates synthetic data there with --synthetic-data, or under <out>/data "
                "without --data)" if cfg.preset == "tiny" else "")
        tars = sorted(root.glob("*.tar"))[:1] if root.is_dir() else []
        if tars:
            hint = f"; it holds {tars[0].name}: pass the folder above those shards, named shards/" + hint
        raise DataError(f"training data {where} {root} has no shards/ folder (MultiID-2M layout: shards/*.tar + ref/)"
                        + hint)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"synthetic data is generated only into a new or empty folder; {where} {root} exists and is not "
                        "empty (and has no shards/): choose another folder")
    from idflux.train.synthetic import write_multiid

    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_multiid(tmp, n_identities=12, n_samples=96, size=max(96, cfg.size), seed=cfg.seed, shard_size=32,
                      refs_per_identity=3, max_faces=3)
        if root.is_dir():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_dataset(cfg: TrainConfig) -> PhasedDataset:
    """The run's data: ``cfg.data`` (MultiID-2M layout) or, for the tiny preset, synthetic data
    (see :func:`prepare_data`: generated on rank 0 while the other ranks wait, then read by all)."""
    from idflux.train import distributed as D

    root = Path(D.on_rank0(lambda: str(prepare_data(cfg))))
    ref_size = 64 if cfg.preset == "tiny" else 512
    landmark_fn = None
    if cfg.preset != "tiny" and cfg.face_models:  # real shards carry no landmarks: detect them (cached per sample)
        from idflux.engine.faces import FaceDetector
        from idflux.train.data import landmarks_from_detector

        landmark_fn = landmarks_from_detector(FaceDetector(cfg.face_models))
    ds = MultiIDDataset(root, size=cfg.size, caption_dropout=cfg.caption_dropout, seed=cfg.seed, ref_size=ref_size,
                        min_face=0 if cfg.preset == "tiny" else 100, landmark_fn=landmark_fn)
    return PhasedDataset(ds, cfg.fixed_prompt)


def collate(samples: list[dict], device) -> TrainBatch:
    """Samples -> one TrainBatch on ``device`` (faces flattened with their image index, in image
    order); copies to a GPU go through pinned memory, so they do not wait for the running step."""
    images = to_device(torch.stack([s["image"] for s in samples]), device)
    image_index = torch.cat([torch.full((len(s["boxes"]),), i, dtype=torch.long) for i, s in enumerate(samples)])
    return TrainBatch(
        images=images,
        prompts=[s["prompt"] for s in samples],
        boxes=[[tuple(float(c) for c in b) for b in s["boxes"]] for s in samples],
        landmarks=to_device(torch.cat([torch.as_tensor(s["landmarks"], dtype=torch.float32) for s in samples]), device),
        image_index=to_device(image_index, device),
        ids=torch.cat([torch.as_tensor(s["ids"], dtype=torch.long) for s in samples]),
        gt_embeddings=torch.cat([torch.as_tensor(s["gt_embeddings"], dtype=torch.float32) for s in samples]),
        ref_images=[r for s in samples for r in (s["ref_images"].numpy() if torch.is_tensor(s["ref_images"]) else s["ref_images"])],
    )
