"""The training loop: one readable function, only adapter parameters train.

Per optimizer step: set the phase's lr, then for each micro-batch forward (flow matching + GT-aligned
identity + contrastive), backward; clip, step, zero_grad, EMA, log, checkpoint. Runs alone or under
torchrun (DDP over the adapter; the frozen backbone is replicated). Every random draw depends on
(seed, step, global sample index), so 1 process and N processes give the same run, and a resumed
run continues exactly. The log line of step k is written once step k + 1 is queued (values
read back through pinned memory and an event), so the host never waits for the step it has just
queued; a checkpoint, the end of the run or a crash flushes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from idflux.train import distributed as D
from idflux.train.checkpoint import (ADAPTER_FILE, EMA_FILE, CheckpointError, find_resume_checkpoint, load_checkpoint,
                                     prepare_run_folder, rng_state, run_lock, run_outputs, save_adapter_file, save_checkpoint,
                                     set_rng_state)
from idflux.train.config import ConfigError, TrainConfig
from idflux.train.model import TrainBatch, TrainModel


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
          dataset=None) -> dict:
    """Run (or continue) training; returns {"step", "log", "checkpoint", "adapter", "model", "dataset"}.

    resume: continue from the newest checkpoint of ``cfg.out`` that loads (newer unusable ones are
    named in a warning); a folder that holds a run but no usable checkpoint is an error naming each
    problem, and nothing in it is changed. overwrite: replace the run already in ``cfg.out``;
    without resume or overwrite such a folder is refused. The folder is locked (``train.lock``)
    for the run's lifetime. max_steps stops after that many optimizer steps in total (for tests
    and staged runs); dataset overrides the data built from ``cfg`` (a map-style dataset).
    Every option is validated first (:meth:`TrainConfig.validate`).
    """
    cfg.validate()
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps (--max-steps) must be an int >= 1, got {max_steps!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device (--device) {cfg.device}: torch sees no CUDA device; use --device cpu")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in the folder, or replace it")
    rank, world = D.setup(cfg.device)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(f"batch_size (--batch-size) {cfg.batch_size} must be divisible by processes x grad_accum = "
                          f"{world} x {cfg.grad_accum}")
    out = Path(cfg.out)
    loaded = {}
    with contextlib.ExitStack() as held:
        def claim():  # rank 0: lock the folder, check it, choose the checkpoint; every rank gets the path
            held.enter_context(run_lock(out))
            prepare_run_folder(out, resume=resume, overwrite=overwrite)
            if not resume:
                return None
            path, ckpt, problems = find_resume_checkpoint(out)
            if path is None:
                previous = [n for n in run_outputs(out) if n in ("checkpoints", "log.jsonl")]
                if problems or previous:
                    raise CheckpointError(f"--resume: no usable checkpoint in {out / 'checkpoints'}"
                                          + "".join(f"\n  {p}" for p in problems)
                                          + f"\nnothing in {out} was changed; repair or move these, or start again with "
                                          "--overwrite")
                warnings.warn(f"--resume: {out} holds no run yet; starting at step 0", RuntimeWarning, stacklevel=3)
                return None
            if problems:
                warnings.warn(f"--resume: continuing from {path.name}, the newest usable checkpoint; passed over:"
                              + "".join(f"\n  {p}" for p in problems), RuntimeWarning, stacklevel=3)
            loaded[str(path)] = ckpt
            return str(path)

        ckpt = D.on_rank0(claim)
        return _train(cfg, rank, world, ckpt, loaded.get(ckpt), resume, max_steps, dataset)


def _train(cfg: TrainConfig, rank: int, world: int, ckpt: str | None, loaded, resume: bool, max_steps, dataset) -> dict:
    from idflux.train.data_pipeline import build_dataset, collate, micro_batches

    device = torch.device(cfg.device if not cfg.device.startswith("cuda") else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    out = Path(cfg.out)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)

    model = TrainModel.build(cfg).to(device)
    if device.type == "cuda":
        model.transformer.to(torch.bfloat16), model.vae.to(torch.bfloat16)
    dataset = dataset if dataset is not None else build_dataset(cfg)
    params = [p for p in model.adapter.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.phases[0].lr, weight_decay=cfg.weight_decay)
    adapter = model.adapter
    ddp = None
    if D.active():
        if cfg.shard_backbone:
            D.shard_frozen(model.transformer, device.type)
            # DDP must neither broadcast nor reduce the sharded backbone's tensors: FSDP2 owns them.
            ignore = [f"transformer.{n}" for n, _ in model.transformer.named_parameters()]
            ignore += [f"transformer.{n}" for n, _ in model.transformer.named_buffers()]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        # DDP over the whole model: only the adapter requires grad, so only its gradients are reduced.
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    runner = ddp if ddp is not None else model
    ema = {k: v.detach().clone().float() for k, v in adapter.state_dict().items()} if cfg.ema_decay is not None else None

    step = 0
    if ckpt is not None:
        weights, state, ema_state = loaded if loaded is not None else load_checkpoint(ckpt)
        adapter.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        set_rng_state(state)
        if state.get("queue") is not None and model.cl_loss.bank is not None:
            model.cl_loss.bank.load_queue_state(state["queue"])
        if ema is not None and ema_state is not None:
            ema = {k: v.float() for k, v in ema_state.items()}
    total = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    log_path = out / "log.jsonl"
    if rank == 0 and resume:
        _truncate_log(log_path, step)  # steps logged after the checkpoint run again
    model.train()
    bar = tqdm(total=total, initial=step, desc="training", disable=rank != 0)
    log = _StepLog(log_path, bar, device) if rank == 0 else None
    last_ckpt = None
    data = micro_batches(dataset, cfg, step, total, rank, micro)
    try:
        while step < total:
            phase = cfg.phase_at(step)
            for group in opt.param_groups:
                group["lr"] = phase.lr
            timer = _StepTimer(device)
            parts = {k: torch.zeros((), device=device) for k in ("diff", "id", "cl")}
            for m in range(cfg.grad_accum):
                indices, samples = next(data)
                batch = collate(samples, device)
                last = m == cfg.grad_accum - 1
                sync = ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()
                with sync, torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out_l = runner(batch, [_seed(cfg.seed, i) for i in indices], _seed(cfg.seed, step, m, 7))
                    (out_l["loss"] / cfg.grad_accum).backward()
                for k in parts:
                    if k in out_l:
                        parts[k] = parts[k] + out_l[k].detach().float() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    for k, v in adapter.state_dict().items():
                        ema[k].mul_(cfg.ema_decay).add_(v.float(), alpha=1 - cfg.ema_decay)
            step += 1
            if log is not None:
                log.add({"step": step, "phase": phase.name, "lr": phase.lr}, {**parts, "grad_norm": grad_norm}, timer.stop())
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == total):
                log.flush()  # the log holds every step the checkpoint holds
                state = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(),
                         "queue": model.cl_loss.bank.queue_state() if model.cl_loss.bank is not None else None}
                last_ckpt = save_checkpoint(out, step, weights=adapter.state_dict(), state=state, config=cfg.to_dict(), ema=ema,
                                            adapter_config=adapter.cfg)
            if D.active():
                torch.distributed.barrier()
    finally:
        data.close()  # stops the DataLoader's workers
        if log is not None:
            log.flush()  # a crash keeps the lines of the steps that finished
        bar.close()
    final = None
    if rank == 0:  # the trained adapter at a fixed path, in idflux's format (the last checkpoint's weights)
        final = save_adapter_file(adapter.state_dict(), adapter.cfg, out / ADAPTER_FILE)
        if ema is not None:
            save_adapter_file(ema, adapter.cfg, out / EMA_FILE)
    return {"step": step, "log": log_path, "checkpoint": last_ckpt, "adapter": final, "model": model, "dataset": dataset}


class _StepTimer:
    """A step's time: CUDA events on the device (read when the step's log line is written, never
    waited for here), host wall time otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> "_StepTimer":
        if self.cuda:
            self.end.record()
        else:
            self.seconds = time.perf_counter() - self.t0
        return self

    def read(self) -> float:
        return self.start.elapsed_time(self.end) / 1000.0 if self.cuda else self.seconds


class _StepLog:
    """The per-step JSONL log, written one step late: a step's values (loss parts, grad norm) stay
    on the device and go to pinned host memory with an asynchronous copy, so the host queues step
    k + 1 while the GPU runs step k; step k's line is written once step k + 1 is queued (or at a
    checkpoint, the end, or a crash: ``flush``)."""

    def __init__(self, path: Path, bar, device: torch.device):
        self.path, self.bar, self.cuda = path, bar, device.type == "cuda"
        self.pending: list = []

    def add(self, meta: dict, values: dict, timer: _StepTimer) -> None:
        vec = torch.stack([v.detach().float().reshape(()) for v in values.values()])
        event = None
        if self.cuda:
            host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            vec = host
        self.pending.append((meta, list(values), vec, event, timer))
        while len(self.pending) > 1:
            self._write(self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._write(self.pending.pop(0))

    def _write(self, item) -> None:
        meta, names, vec, event, timer = item
        if event is not None:
            event.synchronize()  # this step only: the steps queued after it keep running
        row = dict(zip(names, vec.tolist()))
        row.update(meta, seconds=timer.read(), loss=row["diff"] + row["id"] + row["cl"])
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", phase=meta["phase"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (the checkpoint a run resumes from), atomically."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _logged_step(line: str) -> float:
    """The step of a log line; a torn line (a crash mid-write) counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(log_path, out_png) -> Path:
    """Loss curves (total and parts) per step, phases shaded, from log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    fig, ax = plt.subplots(figsize=(8, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "diff", "id", "cl"):
        ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key)
    start = 0
    for i, r in enumerate(rows):
        if i + 1 == len(rows) or rows[i + 1]["phase"] != r["phase"]:
            ax.axvspan(start, r["step"], alpha=0.08 * (1 + i % 2), color="gray")
            ax.text(start, ax.get_ylim()[1] * 0.95, r["phase"], fontsize=7)
            start = r["step"]
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
