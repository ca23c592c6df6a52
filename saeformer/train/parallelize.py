"""Speed and scale applied from outside the model, torchtitan-style: AC, compile, DDP or FSDP2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from saeformer.model.transformer import Block, Transformer
from saeformer.train.config import TrainConfig
from saeformer.train.distributed import DistContext

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def parallelize(
    model: Transformer, cfg: TrainConfig, ctx: DistContext, device: torch.device
) -> nn.Module:
    """Activation checkpointing, per-block compile, then DDP or FSDP2: the module to call."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    return _data_parallel(model, cfg.parallel, ctx, device)


def _data_parallel(
    model: nn.Module, mode: str, ctx: DistContext, device: torch.device
) -> nn.Module:
    """DDP, or FSDP2 with one `fully_shard` per block and per bottleneck; unchanged alone."""
    if not ctx.enabled:
        return model
    if mode == "ddp":
        ids = [ctx.local_rank] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    for bottleneck in model.resid.values():
        fully_shard(bottleneck, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def compute_context(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """bf16 autocast and the chosen SDPA backend around a forward pass."""
    with contextlib.ExitStack() as stack:
        if cfg.dtype == "bf16":
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if cfg.sdpa_backend != "auto":
            stack.enter_context(sdpa_kernel(SDPA_BACKENDS[cfg.sdpa_backend]))
        yield
