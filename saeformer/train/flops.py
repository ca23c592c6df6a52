"""FLOPs per token and model FLOPs utilisation (MFU) against a per-device peak table."""

from __future__ import annotations

import torch

from saeformer.model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets.
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def dense_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of the Transformer without bottlenecks: 6·N + 12·L·d·T."""
    d, L = cfg.d_model, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    params = L * (4 * d * d + mlp) + d * cfg.vocab_size
    return 6.0 * params + 12.0 * L * d * cfg.context


def bottleneck_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token the bottlenecks add to `dense_flops_per_token`.

    resid: dense encoder forward 2·d·F, sparse decode 2·k·d, and a sparse backward (grad W_enc,
    grad h, grad values, grad W_dec: 2·k·d each). mlp: a TopK MLP of width F (dense up
    projection 6·d·F, sparse down projection 6·k·d) in place of the dense one (12·d·d_ff).
    """
    d = cfg.d_model
    total = 0.0
    for b in cfg.bottleneck:
        if b.site == "resid":
            total += 2.0 * d * b.width + 10.0 * b.k * d
        else:
            total += 6.0 * d * b.width + 6.0 * b.k * d - 12.0 * d * cfg.d_ff
    return total


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of this device from the table, or None (CPU, unknown card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)
