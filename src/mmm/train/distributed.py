"""Multi-process training through PyTorch's own engine.

`torchrun --nproc_per_node=N -m mmm train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup` then joins the
process group (nccl on CUDA, gloo on CPU) and picks this rank's device. Without those variables the same
code runs as one process. `wrap` applies DDP (default) or FSDP2 (`fully_shard` on every block, then the
whole model). Each rank trains on its own slice of the global batch (see `data.BatchSampler`), so with
gradient averaging the update equals the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_gpu_count(local_world_size: int, available: int) -> None:
    """Clear error when more processes per node want a GPU than the node has."""
    if local_world_size > available:
        raise RuntimeError(
            f"{local_world_size} processes per node were started (torchrun --nproc_per_node={local_world_size}) "
            f"but this machine has {available} CUDA device(s); use --nproc_per_node<={available}"
            + (" or --device cpu" if available == 0 else "")
        )


def pick_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} was requested but no CUDA device is available here")
    return device


def setup(requested_device: str | None = None) -> Dist:
    """Join the process group if launched by torchrun; choose this rank's device."""
    device = pick_device(requested_device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), torch.cuda.device_count())
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown(d: Dist, clean: bool = True) -> None:
    """Leave the process group; after a clean run, only once every rank has finished.

    Without the barrier a rank that finished early (rank 0 still writing the checkpoint and plots) tore its
    gloo group down first and sometimes died with "terminate called without an active exception" (about
    1 run in 12 of the two-process CPU test). After an error the barrier is skipped: a failed peer would
    never reach it.
    """
    if d.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, fsdp: bool = False) -> nn.Module:
    """The model to train: itself on one process (or FSDP2-sharded in place), DDP-wrapped otherwise."""
    if fsdp:
        if not d.enabled and not dist.is_initialized():
            return model  # one process: nothing to shard across
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def mean_across_ranks(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average of a scalar over ranks (each rank holds the mean over an equal-sized slice)."""
    if d.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value
