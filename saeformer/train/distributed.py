"""Data parallelism applied from outside the model: process group, DDP or FSDP2, collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from saeformer.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (world size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress and writes the files that exist once per run."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1


def launched_world_size() -> int:
    """The world size torchrun (or Slurm through torchrun) announced, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, timeout_s: int) -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); a no-op alone."""
    world = launched_world_size()
    if world <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
    return DistContext(rank=dist.get_rank(), world_size=world, local_rank=local_rank)


def background_group(ctx: DistContext) -> dist.ProcessGroup | None:
    """A gloo group for collectives run from a background thread (async checkpoint saves), so
    they never interleave with training's NCCL collectives; None alone."""
    if not ctx.enabled:
        return None
    return dist.new_group(backend="gloo")


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient all-reduce on for the last micro-batch only (DDP no_sync / FSDP2 flag)."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def all_reduce(values: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """Sum (or average) a tensor over ranks, in place; identity alone."""
    if ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        if op == "mean":
            values /= ctx.world_size
    return values


def sum_named(values: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, torch.Tensor]:
    """Sum named tensors of one shape over ranks in a single all-reduce; unchanged alone."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    return dict(zip(keys, all_reduce(torch.stack([values[k] for k in keys]), ctx), strict=True))


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's value on every rank."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for every rank."""
    if ctx.enabled:
        dist.barrier()


def check_divisible(batch_size: int, grad_accum: int, ctx: DistContext) -> None:
    """The global batch must split evenly into micro-batches on every rank."""
    if batch_size % (grad_accum * ctx.world_size):
        raise UserError(
            f"train.batch_size ({batch_size}) must be divisible by train.grad_accum "
            f"({grad_accum}) × world size ({ctx.world_size})"
        )
