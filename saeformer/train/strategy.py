"""Per-step bottleneck upkeep: decoder-norm constraint and dead-feature counters."""

from __future__ import annotations

import torch
from torch import Tensor

from saeformer.model import Bottleneck, Transformer


def resid_bottlenecks(model: Transformer) -> list[Bottleneck]:
    """The model's resid-site bottlenecks (the ones with unit-norm decoder rows)."""
    return list(model.resid.values())


@torch.no_grad()
def remove_parallel_decoder_grads(model: Transformer) -> None:
    """Drop the gradient component parallel to each (unit-norm) decoder row."""
    for b in resid_bottlenecks(model):
        if b.W_dec.grad is not None:
            parallel = (b.W_dec.grad * b.W_dec).sum(dim=1, keepdim=True)
            b.W_dec.grad.sub_(parallel * b.W_dec)


@torch.no_grad()
def normalize_decoders(model: Transformer) -> None:
    """Rescale every resid decoder row to unit norm after an optimizer step."""
    for b in resid_bottlenecks(model):
        b.normalize_decoder()


def update_dead_counters(since_fired: Tensor, counts: Tensor, n_tokens: int) -> None:
    """Advance 'tokens since last fired' by n_tokens and reset the features that fired."""
    since_fired.add_(n_tokens)
    since_fired[counts.to(since_fired.device) > 0] = 0
