"""Hook points on a frozen host model: saeformer's own Transformer or a transformers causal LM.

A hook point is named explicitly. `layers.N.output` is the residual stream after decoder layer N
(0-based): the output of `model.model.layers[N]` in transformers, which equals
`hidden_states[N + 1]` of `output_hidden_states=True` (`hidden_states[0]` is the embedding
output), except for the last layer, whose `hidden_states[-1]` is taken after the final norm.
In saeformer's own model it is the output of `blocks[N]` (before a `resid.N` bottleneck, if any).
`layers.N.mlp.hidden` is the input of layer N's MLP down projection (the post-activation hidden
units; the post-hoc counterpart of an `mlp.N` bottleneck).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from saeformer.errors import UserError
from saeformer.model import Transformer
from saeformer.runs import load_run

HOOK_PATTERN = re.compile(r"^layers\.(\d+)\.(output|mlp\.hidden)$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HookPoint:
    """A named activation site: `layers.N.output` or `layers.N.mlp.hidden`."""

    layer: int
    kind: Literal["output", "mlp.hidden"]

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        """Parse a hook name, with a UserError that shows the accepted forms."""
        match = HOOK_PATTERN.match(name)
        if match is None:
            raise UserError(
                f"unknown hook point {name!r}: use layers.N.output (residual stream after "
                "decoder layer N, = hidden_states[N+1]) or layers.N.mlp.hidden"
            )
        return cls(int(match.group(1)), match.group(2))  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        """The hook's name, as written in configs and tables."""
        return f"layers.{self.layer}.{self.kind}"


class _Stop(Exception):
    """Raised by a capture hook once every wanted activation is in: skips the rest."""


class Host:
    """A frozen causal LM with a list of decoder layers, for capture and splicing hooks."""

    def __init__(
        self, model: nn.Module, layers: nn.ModuleList, embed: nn.Embedding, name: str
    ) -> None:
        self.model, self.layers, self.name = model, layers, name
        self.d_model, self.vocab_size = embed.embedding_dim, embed.num_embeddings
        self.model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """The device of the host's parameters."""
        return next(self.model.parameters()).device

    def logits(self, tokens: Tensor) -> Tensor:
        """Next-token logits [B, T, V] for tokens [B, T]."""
        raise NotImplementedError

    def width(self, hook: HookPoint) -> int:
        """The size of the activation vectors at `hook`."""
        self._layer(hook)
        if hook.kind == "output":
            return self.d_model
        return self._down_proj(hook.layer).in_features

    def _layer(self, hook: HookPoint) -> nn.Module:
        if not 0 <= hook.layer < len(self.layers):
            raise UserError(
                f"hook {hook.name}: {self.name} has decoder layers 0..{len(self.layers) - 1}"
            )
        return self.layers[hook.layer]

    def _down_proj(self, layer: int) -> nn.Linear:
        mlp = self._layer(HookPoint(layer, "mlp.hidden")).mlp
        down = getattr(mlp, "down_proj", None) or getattr(mlp, "down", None)
        if not isinstance(down, nn.Linear):
            raise UserError(
                f"hook layers.{layer}.mlp.hidden: layer {layer} of {self.name} has no dense "
                "MLP down projection (a mixture of experts, or a TopK MLP bottleneck)"
            )
        return down

    @contextlib.contextmanager
    def hooked(self, hook: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
        """Call fn on the activation at `hook` during forwards; a returned tensor replaces it."""
        if hook.kind == "output":

            def on_output(_m: nn.Module, _args: tuple, out: Tensor | tuple) -> object:
                first = out[0] if isinstance(out, tuple) else out
                new = fn(first)
                if new is None:
                    return None
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handle = self._layer(hook).register_forward_hook(on_output)
        else:

            def on_input(_m: nn.Module, args: tuple) -> tuple | None:
                new = fn(args[0])
                return None if new is None else (new, *args[1:])

            handle = self._down_proj(hook.layer).register_forward_pre_hook(on_input)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def capture(self, tokens: Tensor, hooks: list[HookPoint]) -> dict[HookPoint, Tensor]:
        """Activations [B, T, width] at `hooks` from one forward, stopped after the last one."""
        found: dict[HookPoint, Tensor] = {}

        def keep(hook: HookPoint) -> Callable[[Tensor], None]:
            def fn(x: Tensor) -> None:
                found[hook] = x.detach()
                if len(found) == len(hooks):
                    raise _Stop

            return fn

        with contextlib.ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(self.hooked(hook, keep(hook)))
            with contextlib.suppress(_Stop):
                self.logits(tokens)
        return found


class SaeformerHost(Host):
    """saeformer's own Transformer: decoder layers are `blocks`."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__(model, model.blocks, model.embed, name)

    def logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens).logits


class HFHost(Host):
    """A transformers causal LM (Qwen3, Qwen3-MoE, Qwen3.5, ...)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        layers = _decoder_layers(model, model.config.get_text_config().num_hidden_layers)
        super().__init__(model, layers, model.get_input_embeddings(), name)

    def logits(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits


def _decoder_layers(model: nn.Module, count: int) -> nn.ModuleList:
    """The text decoder's layer list (`model.layers`, or `model.language_model.layers`)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.endswith("layers")
        and len(module) == count
        and not any(part in name for part in ("visual", "vision", "audio"))
    ]
    if not found:
        raise UserError(f"{type(model).__name__}: cannot find its {count} decoder layers")
    return min(found, key=lambda item: len(item[0]))[1]


@dataclass
class HostConfig:
    """The frozen model: a saeformer run directory or a transformers model (id or folder)."""

    kind: Literal["saeformer", "hf"] = "saeformer"
    path: str = "runs/dense"
    step: int | None = None  # saeformer runs: a checkpoint step (default: the latest)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    random_init: bool = False  # the same architecture with fresh random weights (a control)
    seed: int = 0  # seed of the random weights


def load_host(cfg: HostConfig, device: torch.device | str = "cpu") -> Host:
    """Load the host of `cfg` onto `device`, frozen, in eval mode."""
    dtype = DTYPES[cfg.dtype]
    if cfg.kind == "saeformer":
        run = load_run(cfg.path, step=cfg.step, device=str(device))
        model = run.model
        if cfg.random_init:
            torch.manual_seed(cfg.seed)
            model = Transformer(run.config.model).to(device)
        return SaeformerHost(model.to(dtype), name=_name(cfg))
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:  # pragma: no cover - depends on the environment
        raise UserError("host.kind = 'hf' needs transformers: install saeformer[hf]") from None
    try:
        if cfg.random_init:
            torch.manual_seed(cfg.seed)
            config = AutoConfig.from_pretrained(cfg.path)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load transformers model {cfg.path!r}: {exc}") from None
    return HFHost(model.to(device), name=_name(cfg))


def _name(cfg: HostConfig) -> str:
    """A short label: the model's folder or id, marked when its weights are random."""
    name = Path(cfg.path).name or cfg.path
    return f"{name} (random init)" if cfg.random_init else name
