"""A decoder-only Transformer with TopK bottlenecks at chosen sites (no training or I/O code)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saeformer.model.bottleneck import AuxRequest, Bottleneck, SiteOutput, TopKMLP
from saeformer.model.config import ModelConfig

try:  # optional: the `flash` extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None


@dataclass
class Output:
    """A forward pass: logits, next-token CE, and per-bottleneck stats and auxiliary losses."""

    logits: Tensor
    loss: Tensor | None = None
    sites: dict[str, SiteOutput] = field(default_factory=dict)


class Rotary(nn.Module):
    """Rotary position embedding tables for one head size."""

    def __init__(self, head_dim: int, context: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(context).float(), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate x [B, H, T, hd] by position."""
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal multi-head self-attention through SDPA, or flash-attn on CUDA when installed."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.context, cfg.rope_theta)
        self.use_flash = cfg.attention in ("auto", "flash") and flash_attn_func is not None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q), self.rotary(k)
        if self.use_flash and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True
            )
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return self.proj(y.reshape(b, t, d))


class MLP(nn.Module):
    """A dense GELU or SwiGLU feed-forward layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm Transformer block; its MLP is a TopKMLP when it holds an `mlp` bottleneck."""

    def __init__(self, cfg: ModelConfig, topk_mlp: TopKMLP | None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp: MLP | TopKMLP = topk_mlp if topk_mlp is not None else MLP(cfg)

    def forward(
        self, x: Tensor, k: int | None, keep_code: bool
    ) -> tuple[Tensor, SiteOutput | None]:
        x = x + self.attn(self.attn_norm(x))
        if isinstance(self.mlp, TopKMLP):
            y, site = self.mlp(self.mlp_norm(x), k=k, keep_code=keep_code)
            return x + y, site
        return x + self.mlp(self.mlp_norm(x)), None


def _own_stream(layer: int) -> torch.Generator:
    """A random stream for one bottleneck's initialisation, apart from the dense weights' one,
    so a model and its dense twin draw identical dense weights from the same seed."""
    return torch.Generator().manual_seed(torch.initial_seed() + 7919 * (layer + 1))


class Transformer(nn.Module):
    """GPT-style LM; `resid.L` bottlenecks sit after block L, `mlp.L` ones inside it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mlp_sites = {b.layer: b for b in cfg.bottleneck if b.site == "mlp"}
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, self._topk_mlp(mlp_sites.get(i))) for i in range(cfg.n_layers)
        )
        self.resid = nn.ModuleDict(
            {
                str(b.layer): Bottleneck(cfg.d_model, b.width, b.k, _own_stream(b.layer))
                for b in cfg.bottleneck
                if b.site == "resid"
            }
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_dense_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _topk_mlp(self, b) -> TopKMLP | None:
        return None if b is None else TopKMLP(self.cfg.d_model, b.width, b.k, self.cfg.n_layers)

    @torch.no_grad()
    def _init_dense_weights(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not name.startswith("resid"):
                std = residual_std if name.endswith(("proj", "down")) else 0.02
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def bottleneck(self, bid: str) -> Bottleneck | TopKMLP:
        """The module of bottleneck `bid` (`resid.L` or `mlp.L`)."""
        site, layer = bid.split(".")
        return self.resid[layer] if site == "resid" else self.blocks[int(layer)].mlp

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        *,
        alpha: Mapping[str, float] | None = None,
        k: Mapping[str, int] | None = None,
        aux: Mapping[str, AuxRequest] | None = None,
        keep_codes: bool = False,
    ) -> Output:
        """Logits for tokens [B, T]; CE against targets; per-bottleneck stats under `sites`."""
        alpha, k, aux = alpha or {}, k or {}, aux or {}
        out = Output(logits=tokens.new_empty(0))
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x, site = block(x, k.get(f"mlp.{i}"), keep_codes)
            if site is not None:
                out.sites[f"mlp.{i}"] = site
            if str(i) in self.resid:
                bid = f"resid.{i}"
                x, out.sites[bid] = self.resid[str(i)](
                    x,
                    alpha=alpha.get(bid, 1.0),
                    k=k.get(bid),
                    aux=aux.get(bid),
                    keep_code=keep_codes,
                )
        out.logits = self.lm_head(self.norm(x))
        if targets is not None:
            out.loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        return out
