"""torch.distributed helpers: process group from torchrun's environment, gathers that keep autograd."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str) -> tuple[int, int]:
    """(rank, world). Initialises the default group when torchrun started several processes
    (NCCL on CUDA, gloo on the CPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def on_rank0(fn):
    """Run ``fn()`` on rank 0 only and return its result on every rank (a barrier: the other ranks
    wait for it). An exception on rank 0 is raised there, and on every other rank as a RuntimeError
    with the same message, so all processes stop together instead of waiting on each other."""
    if not active():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 -- handed to every rank, re-raised below
            error = exc
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, message = box[0]
    if message is not None:
        raise RuntimeError(f"rank 0 stopped: {message}")
    return result


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if active():
        x = x.clone()
        dist.all_reduce(x)
    return x


def gather_rows(x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) rows in rank order (n_r may differ). With ``grad`` the
    result stays in the autograd graph (each rank's gradient comes back to it, summed over ranks)."""
    if not active():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = x.new_zeros(max(sizes), *x.shape[1:])
    pad[: x.shape[0]] = x
    if grad:
        import torch.distributed.nn.functional as dfn

        parts = dfn.all_gather(pad)
    else:
        parts = [torch.zeros_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_frozen(transformer: torch.nn.Module, device_type: str) -> None:
    """FSDP2 over the frozen FLUX transformer, one unit per block and per embedder/head: each process keeps
    1/world of the weights and gathers a block's weights only while it runs (forward and backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    # flux_forward calls these modules one by one (never transformer.forward), so each is its own
    # unit: its hooks gather its weights exactly when it runs.
    units = [transformer.x_embedder, transformer.time_text_embed, transformer.context_embedder,
             *transformer.transformer_blocks, *transformer.single_transformer_blocks, transformer.norm_out,
             transformer.proj_out]
    for unit in units:
        fully_shard(unit, mesh=mesh)
