"""Identity adapters of the tiny world, trained through the real four-phase trainer.

:func:`world_config` is the training configuration of the tiny world (the ``tiny`` preset at the
world's 192-pixel size, on :func:`write_world_data`'s synthetic MultiID-2M data of the world's
training identities); :func:`stage_adapters` trains the three arms of the trade-off table on the
frozen world, each with :func:`idflux.train.trainer.train` (the same loop, losses and phases as
``idflux train``):

- ``flow``: flow matching only (id_weight 0, cl_weight 0);
- ``id``: + the GT-aligned ID loss on the pixel recogniser;
- ``id_cl``: + the ID loss + InfoNCE against the recogniser's embeddings of the gallery pixels;
- ``shipped``: the id_cl recipe trained longer (360 steps), shipped as ``adapter.safetensors`` (the
  default of ``idflux generate --preset tiny``).
"""

from __future__ import annotations

import time
from pathlib import Path

from idflux.train import config as C
from idflux.train.tiny_world import WORLD, _files, _log, _machine, _record

#: The arms of the trade-off table: name -> (id_weight, cl_weight).
ARMS = {"flow": (0.0, 0.0), "id": (0.3, 0.0), "id_cl": (0.3, 0.1)}
#: Synthetic training data of the adapters (MultiID-2M layout), per data root.
DATA_SAMPLES = 2000


def write_world_data(root, n_samples: int = DATA_SAMPLES, n_identities: int | None = None) -> Path:
    """The world's adapter-training data under ``root`` (MultiID-2M layout; the world's training
    identities (the first ``n_identities`` of them, default all), square 192-pixel scenes of 1-4
    people, 2 gallery images each); skipped when written before with the same arguments."""
    from idflux.train.synthetic import write_multiid

    root = Path(root)
    n_identities = n_identities or WORLD["n_train_ids"]
    stamp = f"{n_samples} {n_identities}\n"
    if (root / "shards").is_dir() and (root / "DONE").is_file() and (root / "DONE").read_text() == stamp:
        return root
    if (root / "DONE").is_file():  # ours, written with other arguments: replace it
        import shutil

        shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"tiny-world data folder {root} exists and is not one this module wrote; "
                              "pass another folder or empty it")
    write_multiid(root, n_identities=n_identities, n_samples=n_samples, size=WORLD["size"], seed=WORLD["train_seed"],
                  shard_size=250, refs_per_identity=2, max_faces=WORLD["max_faces"], aspect=(1.0, 1.0),
                  face_scale=WORLD["face_scale"])
    (root / "DONE").write_text(stamp)
    return root


def world_phases(steps: int, lr: float = 1e-3) -> list[C.Phase]:
    """The paper's four phases in its proportions (20/40/30/10%), ``steps`` in all."""
    n1, n2, n3 = round(0.2 * steps), round(0.4 * steps), round(0.3 * steps)
    return [C.Phase("reconstruction-fixed", max(n1, 1), "fixed", 0.0, lr),
            C.Phase("reconstruction-caption", max(n2, 1), "caption", 0.0, lr),
            C.Phase("paired", max(n3, 1), "caption", 0.5, lr),
            C.Phase("quality", max(steps - n1 - n2 - n3, 1), "caption", 0.5, lr / 10)]


def world_config(out, data, world=None, *, steps: int = 600, batch_size: int = 8, id_weight: float = 0.3,
                 cl_weight: float = 0.1, seed: int = 0) -> C.TrainConfig:
    """The tiny preset on the trained world (``world``: its folder, default the shipped one)."""
    return C.tiny(out=str(out), data=str(data), flux=str(world) if world else None, size=WORLD["size"], batch_size=batch_size,
                  phases=world_phases(steps), id_weight=id_weight, cl_weight=cl_weight, num_negatives=256,
                  checkpoint_every=max(steps // 4, 1), seed=seed,
                  sample_prompts=["a photo of two people in a park", "two people"])


def stage_adapters(root: Path, steps: int = 150, batch_size: int = 4, seed: int = 15, work: Path | None = None,
                   shipped_steps: int = 360) -> dict:
    """Train the three arms for ``steps`` each on the world in ``root`` (the trade-off table), then the
    shipped adapter: the id_cl recipe trained for ``shipped_steps`` (``adapters/shipped.safetensors``,
    copied to ``adapter.safetensors``). An arm whose file exists is kept (a killed stage resumes)."""
    import copy
    import json

    import torch

    from idflux.engine.weights import save_adapter
    from idflux.train.trainer import read_log, train

    t0 = time.time()
    from idflux.train import tiny_world

    work = Path(work) if work else Path("runs") / ("tiny_world_adapters" if root == tiny_world.ASSETS else f"tiny_world_adapters_{root.name}")
    data = write_world_data(work / "data", tiny_world._n(DATA_SAMPLES))
    _log(f"adapters: data ready ({time.time() - t0:.0f} s)")
    arms = {}
    folder = root / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    specs = [(name, idw, clw, steps) for name, (idw, clw) in ARMS.items()] + [("shipped", *ARMS["id_cl"], shipped_steps)]
    for name, idw, clw, n_steps in specs:
        ta = time.time()
        cfg = world_config(work / name, data, root, steps=n_steps, batch_size=batch_size, id_weight=idw, cl_weight=clw,
                           seed=seed)
        # The shipped adapter is adapter.safetensors (fp32); the trade-off arms are stored in fp16 (25 MB budget).
        done = root / "adapter.safetensors" if name == "shipped" else folder / f"{name}.safetensors"
        if done.is_file() and (folder / f"{name}.json").is_file():
            arms[name] = json.loads((folder / f"{name}.json").read_text())
            _log(f"adapters: arm {name} done already")
            continue
        ckpts = Path(cfg.out) / "checkpoints"
        resume = ckpts.is_dir() and any(ckpts.iterdir())
        result = train(cfg, resume=resume, overwrite=not resume and Path(cfg.out).exists())
        net = result["model"].adapter
        save_adapter(net if name == "shipped" else copy.deepcopy(net).to(torch.float16), done)
        rows = read_log(result["log"])
        tail = rows[-max(len(rows) // 10, 1):]
        info = {"id_weight": idw, "cl_weight": clw, "steps": result["step"], "batch": batch_size, "seed": seed,
                "phases": [p.__dict__ for p in cfg.phases],
                "final": {k: sum(r.get(k, 0.0) for r in tail) / len(tail) for k in ("diff", "id", "cl")},
                "wall_s": round(time.time() - ta, 1)}
        (folder / f"{name}.json").write_text(json.dumps(info, indent=1))
        arms[name] = info
        _log(f"adapters: arm {name}: {info['final']} in {info['wall_s']} s")
    return _record(root, "adapters", {"arms": arms, "shipped": "adapter.safetensors: the id_cl recipe, longer "
                                                              "(adapters/shipped.json); the arms in fp16",
                                      "data": {"samples": DATA_SAMPLES, "identities": WORLD["n_train_ids"]},
                                      "wall_s": round(time.time() - t0, 1)},
                   _files(folder) + [root / "adapter.safetensors"])


def run_demo(out: Path, *, steps: int = 180, batch_size: int = 4, n_samples: int = 240, n_identities: int | None = 200,
             report_cases: int = 8, report_steps: int = 20, world: Path | None = None) -> dict:
    """``make demo``: train an identity adapter from the shipped world's frozen base through the real
    four-phase trainer (flow matching + ID loss + InfoNCE on the pixel recogniser), then write
    ``loss.png``, ``sample_sheet.png`` (held-out identities: references, GT with boxes, with the
    adapter, adapter off, references swapped, prompt) and ``summary.json`` with the measured metrics."""
    import json

    from idflux.train.tiny_world_eval import demo_report
    from idflux.train.trainer import plot_losses, train

    t0 = time.time()
    out = Path(out)
    data = write_world_data(out.parent / f"{out.name}-data", n_samples, n_identities)
    t_data = time.time() - t0
    idw, clw = ARMS["id_cl"]
    cfg = world_config(out, data, world, steps=steps, batch_size=batch_size, id_weight=idw, cl_weight=clw)
    result = train(cfg, overwrite=out.exists())
    t_train = time.time() - t0 - t_data
    plot = plot_losses(result["log"], out / "loss.png")
    report = demo_report(result["model"], out, n_cases=report_cases, steps=report_steps)
    summary = {"steps": result["step"], "batch": batch_size, "phases": [p.name for p in cfg.phases],
               "losses": {"id_weight": idw, "cl_weight": clw}, "checkpoint": str(result["checkpoint"]),
               "adapter": str(result.get("adapter")), "loss_plot": str(plot), **report}
    summary["seconds"] = {"data": round(t_data, 1), "train": round(t_train, 1), "sheet_and_metrics": report["seconds"],
                          "total": round(time.time() - t0, 1)}
    summary["machine"] = _machine()
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _log(f"demo: {json.dumps({k: summary[k] for k in ('with_adapter', 'adapter_off', 'swap', 'seconds')})}")
    return summary
