"""``idflux train`` / ``python -m idflux.train``: run a preset, then write the loss plot and a sample grid."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from idflux.train import config as C


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train the identity adapter (tiny preset: synthetic data on the CPU)",
                       description="Train the identity adapter with the four-phase schedule; writes checkpoints, "
                                   "log.jsonl, loss.png and samples.png into --out.")
    _arguments(p)
    p.set_defaults(func=run_train)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of TrainConfig fields (any subset, phases included); "
                                                    "the options below override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration (YAML, usable as --config) and exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, value in YAML (e.g. --set id_weight=0.2 --set 'sample_prompts=[a, b]'); repeatable")
    p.add_argument("--preset", choices=("tiny", "flux-dev"), help="default: the config file's, else tiny")
    p.add_argument("--data", help="MultiID-2M root (shards/ + ref/); tiny without --data: synthetic data under <out>/data")
    p.add_argument("--synthetic-data", action="store_true",
                   help="tiny: generate a synthetic set at --data when it has no shards/ (only into a new or empty folder)")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue from the run folder's newest valid checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused without it)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step per process")
    p.add_argument("--size", type=int, help="training resolution (multiple of 16)")
    p.add_argument("--lr", type=float, help="learning rate of every phase (per phase: --config or --set phases=...)")
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    p.add_argument("--ema", type=float, help="keep an EMA of the adapter with this decay, in [0, 1)")
    p.add_argument("--id-gating", choices=("all", "released"), help="identity-loss timestep gating")
    p.add_argument("--flux", help="FLUX.1-dev diffusers folder (flux-dev)")
    p.add_argument("--face-models", help="antelopev2 folder with glintr100.onnx (flux-dev)")
    p.add_argument("--siglip", help="SigLIP folder (flux-dev)")
    p.add_argument("--adapter-init", help="start from these adapter weights (idflux adapter file or withanyone.safetensors)")
    p.add_argument("--shard-backbone", action="store_true",
                   help="under torchrun: shard the frozen FLUX transformer with FSDP2 instead of replicating it")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the preset's)")
    p.add_argument("--seed", type=int, help="0 <= seed < 2^32")
    p.add_argument("--workers", type=int, help="DataLoader worker processes preparing batches ahead (default: the preset's; 0 = none)")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace (DIR/train_trace.json, Perfetto) with ranges "
                                                   "per block, adapter block and kernel, and DIR/train_top.txt; keep --max-steps small")


_FIELDS = (("data", "data"), ("batch_size", "batch_size"), ("grad_accum", "grad_accum"), ("size", "size"),
           ("checkpoint_every", "checkpoint_every"), ("ema", "ema_decay"), ("id_gating", "id_gating"), ("flux", "flux"),
           ("face_models", "face_models"), ("siglip", "siglip"), ("adapter_init", "adapter_init"), ("device", "device"),
           ("seed", "seed"), ("workers", "num_workers"), ("out", "out"), ("preset", "preset"))


def config_from_args(args) -> C.TrainConfig:
    """The run's TrainConfig: preset, then ``--config``, then ``--set``, then the flags; validated
    (:class:`idflux.train.config.ConfigError` names a bad field or key)."""
    import yaml

    file = C.load_config_file(args.config) if getattr(args, "config", None) else {}
    overrides = {}
    for item in getattr(args, "set", None) or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise C.ConfigError(f"--set {item!r}: expected KEY=VALUE (a TrainConfig field and a YAML value)")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise C.ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    for arg, field in _FIELDS:
        value = getattr(args, arg, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "shard_backbone", False):
        overrides["shard_backbone"] = True
    if getattr(args, "synthetic_data", False):
        overrides["synthetic_data"] = True
    lr = getattr(args, "lr", None)
    cfg = C.resolve(file=file, overrides=overrides, where=f"--config {getattr(args, 'config', None) or ''}".strip())
    if lr is not None:
        for phase in cfg.phases:
            phase.lr = lr
        cfg.validate()
    max_steps = getattr(args, "max_steps", None)
    if max_steps is not None and max_steps < 1:
        raise C.ConfigError(f"max_steps (--max-steps) must be an int >= 1, got {max_steps}")
    return cfg


def run_train(args) -> int:
    if getattr(args, "profile", None):  # the whole command under torch.profiler (idflux.engine.profiling)
        from idflux.engine.profiling import run_profiled

        return run_profiled(run_train, args, "train")
    import os
    import sys

    from idflux.train.checkpoint import CheckpointError, RunFolderError, run_lock
    from idflux.train.data_pipeline import DataError
    from idflux.train.trainer import plot_losses, train

    try:
        cfg = config_from_args(args)
    except C.ConfigError as exc:
        print(f"idflux train: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", False):
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        # The lock covers the plot and the sample grid too (train() takes it again, re-entrantly).
        with run_lock(cfg.out) if rank0 else contextlib.nullcontext():
            result = train(cfg, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps)
            if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
                return 0
            out = Path(cfg.out)
            plot = plot_losses(result["log"], out / "loss.png")
            grid = sample_grid(result["model"], cfg, out / "samples.png", dataset=result["dataset"])
            skipped = dict(getattr(result.get("dataset"), "skipped", {}) or {})
            summary = {"step": result["step"], "checkpoint": str(result["checkpoint"]), "adapter": str(result["adapter"]),
                       "loss_plot": str(plot), "samples": str(grid), "skipped_samples": skipped}
            if getattr(result["model"], "tiny_world", None) is not None:  # trained tiny world: held-out sheet + metrics
                from idflux.train.tiny_world_eval import demo_report

                summary["tiny_world"] = demo_report(result["model"], out)
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    except (C.ConfigError, CheckpointError, RunFolderError, DataError) as exc:
        print(f"idflux train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, C.ConfigError) else 1
    print(json.dumps(summary, indent=1))
    return 0


@torch.no_grad()
def sample_grid(model, cfg: C.TrainConfig, path, dataset=None) -> Path:
    """One row per sample prompt: the references of a training sample, then the image generated with
    the trained adapter in that sample's boxes."""
    from PIL import Image

    from idflux.engine.pipeline import GenerateSettings, Pipeline, to_pil
    from idflux.train.data_pipeline import build_dataset, collate

    device = next(model.adapter.parameters()).device
    ds = dataset if dataset is not None else build_dataset(cfg)  # the run's own data, not indexed again
    sample = ds.sample(0, cfg.phases[-1])
    batch = collate([sample], device)
    dtype = next(model.transformer.parameters()).dtype
    arc, sig, _ = model.identity_inputs(batch, device, dtype)
    pipe = Pipeline(model.parts, model.adapter, device=device, dtype=dtype)
    size = cfg.size
    tiles = []
    for i, prompt in enumerate(cfg.sample_prompts):
        s = GenerateSettings(prompt=prompt, boxes=[list(b) for b in batch.boxes[0]], size=size, steps=8 if cfg.preset == "tiny" else 25,
                             guidance=4.0, seed=cfg.seed + i)
        image = pipe.generate(s, arc[0], None if sig is None else sig[0], progress=False)
        refs = [Image.fromarray(r).resize((size, size)) for r in batch.ref_images]
        tiles.append(refs + [to_pil(image)])
    cols = max(len(r) for r in tiles)
    grid = Image.new("RGB", (cols * size, len(tiles) * size))
    for y, row in enumerate(tiles):
        for x, tile in enumerate(row):
            grid.paste(tile, (x * size, y * size))
    path = Path(path)
    grid.save(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idflux.train", description="Train the identity adapter.")
    _arguments(parser)
    return run_train(parser.parse_args(argv))
