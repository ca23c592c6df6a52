"""The project's metrics, each defined once (DESIGN.md, Metrics)."""

from __future__ import annotations

import torch
from torch import Tensor


def fvu(h: Tensor, h_hat: Tensor, *, detach_denominator: bool = False) -> Tensor:
    """Fraction of variance unexplained: Σ‖h − ĥ‖² / Σ‖h − mean(h)‖² over a batch of rows."""
    h = h.reshape(-1, h.shape[-1]).float()
    h_hat = h_hat.reshape(-1, h_hat.shape[-1]).float()
    total = (h - h.mean(dim=0)).pow(2).sum()
    if detach_denominator:
        total = total.detach()
    return (h - h_hat).pow(2).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def l0(values: Tensor) -> Tensor:
    """Mean number of non-zero code entries per token, from (…, k) TopK values."""
    return (values != 0).sum(dim=-1).float().mean()


def dead_mask(tokens_since_fired: Tensor, threshold_tokens: int) -> Tensor:
    """The features that did not fire in the last `threshold_tokens` tokens (bool)."""
    return tokens_since_fired >= threshold_tokens


def dead_fraction(tokens_since_fired: Tensor, threshold_tokens: int) -> float:
    """Fraction of features that did not fire in the last `threshold_tokens` tokens."""
    return dead_mask(tokens_since_fired, threshold_tokens).float().mean().item()


def firing_counts(values: Tensor, indices: Tensor, width: int) -> Tensor:
    """Per-feature count of tokens on which it fired (non-zero value), shape [width].

    Static shapes only (no masked select), so a compiled block keeps it in its graph."""
    fired = (values.reshape(-1) != 0).long()
    return fired.new_zeros(width).index_add_(0, indices.reshape(-1), fired)


def token_entropy(token_ids: Tensor, valid: Tensor | None = None) -> Tensor:
    """Entropy (bits) of each row's token-id distribution, e.g. over a feature's top-m tokens.

    `token_ids` is [F, m]; entries where `valid` is False are ignored; rows with none give NaN.
    """
    valid = torch.ones_like(token_ids, dtype=torch.bool) if valid is None else valid
    ids, order = token_ids.masked_fill(~valid, -1).sort(dim=1)
    ok = valid.gather(1, order)
    new_run = torch.ones_like(ok)
    new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run_id = new_run.long().cumsum(dim=1) - 1  # equal ids form one run: its count is one bin
    counts = torch.zeros(ids.shape, dtype=torch.float64, device=ids.device)
    counts.scatter_add_(1, run_id, ok.double())
    p = counts / counts.sum(dim=1, keepdim=True)
    terms = torch.where(p > 0, -p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
    return terms.sum(dim=1).float().masked_fill(~ok.any(dim=1), float("nan"))


def ce_loss_score(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 when splicing an SAE in loses nothing,
    0 when it is no better than zero-ablating the activation."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def next_token_kl(clean_logits: Tensor, spliced_logits: Tensor) -> Tensor:
    """Per-position KL(p_clean ‖ p_spliced) in nats of the next-token distributions, [...]."""
    clean = torch.log_softmax(clean_logits.float(), dim=-1)
    spliced = torch.log_softmax(spliced_logits.float(), dim=-1)
    return (clean.exp() * (clean - spliced)).sum(dim=-1)
