"""Model configuration: the Transformer's dimensions and where its bottlenecks sit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saeformer.errors import UserError

Site = Literal["resid", "mlp"]


@dataclass
class BottleneckConfig:
    """One TopK bottleneck: `resid` after block `layer`, or `mlp` inside block `layer`."""

    site: Site
    layer: int
    width: int
    k: int

    @property
    def id(self) -> str:
        """The bottleneck id used in TOML, TensorBoard tags and snapshot folders."""
        return f"{self.site}.{self.layer}"


@dataclass
class ModelConfig:
    """A decoder-only Transformer (RMSNorm, RoPE, causal SDPA attention) with bottlenecks."""

    vocab_size: int = 0  # 0: taken from the prepared data
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    context: int = 256
    mlp: Literal["gelu", "swiglu"] = "gelu"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention: Literal["auto", "sdpa", "flash"] = "auto"
    bottleneck: list[BottleneckConfig] = field(default_factory=list)

    def validate(self) -> None:
        """Raise UserError for dimensions or bottlenecks that cannot work."""
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "context"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UserError(
                f"model.d_model ({self.d_model}) must split into {self.n_heads} heads "
                "of even size (RoPE rotates pairs)"
            )
        seen: set[str] = set()
        for i, b in enumerate(self.bottleneck):
            where = f"model.bottleneck.{i} ({b.id})"
            if not 0 <= b.layer < self.n_layers:
                raise UserError(f"{where}: layer {b.layer} is out of range 0..{self.n_layers - 1}")
            if b.width <= 0 or b.k <= 0:
                raise UserError(f"{where}: width and k must be positive")
            if b.k > b.width:
                raise UserError(f"{where}: k = {b.k} exceeds the width F = {b.width}")
            if b.site == "mlp" and self.mlp != "gelu":
                raise UserError(f"{where}: mlp sites need model.mlp = 'gelu'")
            if b.id in seen:
                raise UserError(f"{where}: a second bottleneck at the same site")
            seen.add(b.id)

    def bottleneck_ids(self) -> list[str]:
        """Ids of all bottlenecks in depth order."""
        order = {"mlp": 0, "resid": 1}
        return [b.id for b in sorted(self.bottleneck, key=lambda b: (b.layer, order[b.site]))]
