"""The model as a language model: sampling, steering with one feature clamped, perplexity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from saeformer.errors import UserError
from saeformer.model import Transformer
from saeformer.train.prepare import EOS


@dataclass
class SampleConfig:
    """How tokens are drawn."""

    max_new_tokens: int = 40
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # sample among the k most likely tokens (0: all)
    seed: int = 0


@dataclass
class Clamp:
    """Hold feature `feature` of bottleneck `bottleneck` at `value` on every token."""

    bottleneck: str
    feature: int
    value: float


def check_clamp(model: Transformer, clamp: Clamp) -> None:
    """Raise UserError for a bottleneck or feature the model does not have."""
    ids = model.cfg.bottleneck_ids()
    if clamp.bottleneck not in ids:
        raise UserError(f"no bottleneck {clamp.bottleneck!r}: this model has {', '.join(ids)}")
    width = model.bottleneck(clamp.bottleneck).width
    if not 0 <= clamp.feature < width:
        raise UserError(f"{clamp.bottleneck} has features 0..{width - 1}, not {clamp.feature}")


@contextlib.contextmanager
def clamped(model: Transformer, clamp: Clamp | None) -> Iterator[None]:
    """Within the block, the bottleneck output carries the feature at the clamped value.

    out += (value − z_f) · W_dec[f] per token: the code with z_f replaced (α = 1 at inference).
    """
    if clamp is None:
        yield
        return
    check_clamp(model, clamp)
    module = model.bottleneck(clamp.bottleneck)

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        out, site = output
        current = (site.values * (site.indices == clamp.feature)).sum(-1, keepdim=True)
        delta = (clamp.value - current) * module.W_dec[clamp.feature]
        return out + delta.reshape(out.shape).to(out.dtype), site

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from the end-of-text token."""
    ids = tokenizer.encode(text).ids
    eos = tokenizer.token_to_id(EOS)
    return ids or ([eos] if eos is not None else [0])


def _next_token(logits: Tensor, cfg: SampleConfig, gen: torch.Generator) -> int:
    if cfg.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / cfg.temperature
    if 0 < cfg.top_k < logits.numel():
        cutoff = logits.topk(cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, -math.inf)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.no_grad()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    clamp: Clamp | None = None,
) -> str:
    """Continue `prompt` by `cfg.max_new_tokens` tokens (seeded), optionally steered."""
    model.eval()
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)
    start = len(ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    with clamped(model, clamp):
        for _ in range(cfg.max_new_tokens):
            window = torch.tensor([ids[-model.cfg.context :]], device=device)
            logits = model(window, keep_codes=clamp is not None).logits[0, -1].cpu()
            ids.append(_next_token(logits, cfg, gen))
    return tokenizer.decode(ids[start:])


@torch.no_grad()
def perplexity(
    model: Transformer, tokenizer: Tokenizer, path: Path, max_tokens: int | None = None
) -> dict[str, float]:
    """Mean next-token CE and perplexity of a UTF-8 text file, in windows of model.context."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text: {exc}") from None
    ids = tokenizer.encode(text).ids[: max_tokens and max_tokens + 1]
    if len(ids) < 2:
        raise UserError(f"{path} holds fewer than two tokens: nothing to predict")
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    context, total, count = model.cfg.context, 0.0, 0
    for lo in range(0, len(ids) - 1, context):
        chunk = tokens[lo : lo + context + 1]
        logits = model(chunk[None, :-1]).logits[0]
        total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    ce = total / count
    return {"tokens": count, "ce": ce, "perplexity": math.exp(ce)}
