"""AdamW with parameter groups: decayed weights, undecayed vectors, and bottleneck parameters."""

from __future__ import annotations

import torch

from saeformer.model import Transformer
from saeformer.train.config import RunConfig


def build_optimizer(model: Transformer, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW whose groups carry an `lr_mult` that the trainer multiplies into the scheduled lr."""
    mlp_sites = {b.layer for b in cfg.model.bottleneck if b.site == "mlp"}
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "bottleneck": []}
    for name, param in model.named_parameters():
        if name.startswith("resid.") or _in_topk_mlp(name, mlp_sites):
            groups["bottleneck"].append(param)
        elif param.ndim >= 2:
            groups["decay"].append(param)
        else:
            groups["no_decay"].append(param)
    t = cfg.train
    param_groups = [
        {
            "name": "decay",
            "params": groups["decay"],
            "weight_decay": t.weight_decay,
            "lr_mult": 1.0,
        },
        {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0, "lr_mult": 1.0},
        {
            "name": "bottleneck",
            "params": groups["bottleneck"],
            "weight_decay": 0.0,
            "lr_mult": cfg.strategy.bottleneck_lr_mult,
        },
    ]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        [g for g in param_groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), fused=fused
    )


def _in_topk_mlp(name: str, mlp_sites: set[int]) -> bool:
    parts = name.split(".")
    return parts[0] == "blocks" and int(parts[1]) in mlp_sites and parts[2] == "mlp"


def set_lr(optimizer: torch.optim.Optimizer, lr: float, bottleneck_scale: float = 1.0) -> None:
    """Set each group's lr to the scheduled lr times its multiplier (and the bottleneck group's
    also times `bottleneck_scale`, its own warm-up)."""
    for group in optimizer.param_groups:
        scale = bottleneck_scale if group.get("name") == "bottleneck" else 1.0
        group["lr"] = lr * group["lr_mult"] * scale


def clip_groups(optimizer: torch.optim.Optimizer, max_norm: float) -> dict[str, torch.Tensor]:
    """Clip the host's and the bottlenecks' gradients separately, so bottleneck gradients never
    change the host's clipping; return each part's norm before clipping."""
    parts: dict[str, list[torch.nn.Parameter]] = {}
    for group in optimizer.param_groups:
        part = "bottleneck" if group["name"] == "bottleneck" else "host"
        parts.setdefault(part, []).extend(group["params"])
    return {
        part: torch.nn.utils.clip_grad_norm_(params, max_norm) for part, params in parts.items()
    }
