"""Step-indexed schedules: learning rate, bottleneck lr warm-up, bypass fade-in α, k annealing."""

from __future__ import annotations

import math

from saeformer.train.config import RunConfig, StrategyConfig, TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then down to cfg.lr·min_lr_ratio at cfg.steps: a cosine, or
    (wsd) a stable phase and a linear decay over the last decay_fraction of the steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_fraction * cfg.steps)
        start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        return cfg.lr - (cfg.lr - floor) * min(1.0, max(0, step - start) / max(1, decay_steps))
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def bottleneck_lr_scale(step: int, cfg: StrategyConfig) -> float:
    """Bottleneck warm-up: a factor (step+1)/N, capped at 1, on the bottleneck group's lr."""
    if cfg.bottleneck_warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / cfg.bottleneck_warmup_steps)


def alpha_at(step: int, cfg: StrategyConfig) -> float:
    """Bypass fade-in: α rises linearly from 0 to 1 over alpha_warmup_steps (1 when off)."""
    if cfg.alpha_warmup_steps <= 0:
        return 1.0
    return min(1.0, step / cfg.alpha_warmup_steps)


def k_at(step: int, k_final: int, width: int, cfg: StrategyConfig) -> int:
    """k annealing from k_start to k_final in k_levels geometric steps (k_final when off)."""
    k_start = min(cfg.k_start, width)
    if k_start <= k_final or step >= cfg.k_anneal_steps:
        return k_final
    level = step * cfg.k_levels // cfg.k_anneal_steps
    return round(k_start * (k_final / k_start) ** (level / cfg.k_levels))


def bottleneck_schedule(cfg: RunConfig, step: int) -> tuple[dict[str, float], dict[str, int]]:
    """Per-bottleneck bypass α (resid sites) and k that training uses at `step`."""
    s = cfg.strategy
    alpha = {b.id: alpha_at(step, s) for b in cfg.model.bottleneck if b.site == "resid"}
    ks = {b.id: k_at(step, b.k, b.width, s) for b in cfg.model.bottleneck}
    return alpha, ks
