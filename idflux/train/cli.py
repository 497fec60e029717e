"""``idflux train`` / ``python -m idflux.train``: run a preset, then write the loss plot and a sample grid."""

from __future__ import annotations

import argparse
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
    p.add_argument("--preset", choices=("tiny", "flux-dev"), default="tiny")
    p.add_argument("--data", help="MultiID-2M root (shards/ + ref/); tiny: synthetic data is generated when absent")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step per process")
    p.add_argument("--size", type=int, help="training resolution (multiple of 16)")
    p.add_argument("--ema", type=float, help="keep an EMA of the adapter with this decay")
    p.add_argument("--id-gating", choices=("all", "released"), help="identity-loss timestep gating")
    p.add_argument("--flux", help="FLUX.1-dev diffusers folder (flux-dev)")
    p.add_argument("--face-models", help="antelopev2 folder with glintr100.onnx (flux-dev)")
    p.add_argument("--siglip", help="SigLIP folder (flux-dev)")
    p.add_argument("--adapter-init", help="start from these adapter weights")
    p.add_argument("--shard-backbone", action="store_true",
                   help="under torchrun: shard the frozen FLUX transformer with FSDP2 instead of replicating it")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes preparing batches ahead (default: the preset's; 0 = none)")


def config_from_args(args) -> C.TrainConfig:
    out = args.out or f"runs/{args.preset}"
    cfg = C.tiny(out=out) if args.preset == "tiny" else C.flux_dev(out=out)
    for arg, field in (("data", "data"), ("batch_size", "batch_size"), ("grad_accum", "grad_accum"), ("size", "size"),
                       ("ema", "ema_decay"), ("id_gating", "id_gating"), ("flux", "flux"), ("face_models", "face_models"),
                       ("siglip", "siglip"), ("adapter_init", "adapter_init"), ("device", "device"), ("seed", "seed"),
                       ("workers", "num_workers")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, field, value)
    if getattr(args, "shard_backbone", False):
        cfg.shard_backbone = True
    return cfg


def run_train(args) -> int:
    from idflux.train.trainer import plot_losses, train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume, max_steps=args.max_steps)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    out = Path(cfg.out)
    plot = plot_losses(result["log"], out / "loss.png")
    grid = sample_grid(result["model"], cfg, out / "samples.png", dataset=result["dataset"])
    skipped = dict(getattr(result.get("dataset"), "skipped", {}) or {})
    summary = {"step": result["step"], "checkpoint": str(result["checkpoint"]), "loss_plot": str(plot), "samples": str(grid),
               "skipped_samples": skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
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
