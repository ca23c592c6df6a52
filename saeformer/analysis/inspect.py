"""Token by token, which features of each bottleneck fire on a text, and how strongly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from saeformer.errors import UserError
from saeformer.model import Transformer


@dataclass
class TokenFeatures:
    """One token and, per bottleneck, its strongest features as (id, activation)."""

    token: str
    features: dict[str, list[tuple[int, float]]]


@torch.no_grad()
def inspect_text(
    model: Transformer,
    tokenizer: Tokenizer,
    text: str,
    top: int = 5,
    bottlenecks: list[str] | None = None,
) -> list[TokenFeatures]:
    """The `top` strongest features per bottleneck on every token of `text` (first context)."""
    ids = tokenizer.encode(text).ids[: model.cfg.context]
    if not ids:
        raise UserError("inspect needs a non-empty text")
    known = model.cfg.bottleneck_ids()
    wanted = bottlenecks or known
    unknown = [b for b in wanted if b not in known]
    if unknown:
        raise UserError(f"no bottleneck {unknown[0]!r}: this model has {', '.join(known)}")
    model.eval()
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device), keep_codes=True)
    rows = []
    for t, token_id in enumerate(ids):
        features = {}
        for bid in wanted:
            values, indices = out.sites[bid].values[t].cpu(), out.sites[bid].indices[t].cpu()
            order = values.argsort(descending=True)[:top]
            features[bid] = [
                (int(indices[i]), float(values[i])) for i in order if float(values[i]) > 0
            ]
        rows.append(TokenFeatures(tokenizer.decode([token_id]), features))
    return rows


def format_inspection(rows: list[TokenFeatures]) -> str:
    """A plain-text table: one line per token, `id:activation` per bottleneck."""
    if not rows:
        return ""
    bids = list(rows[0].features)
    token_width = max(8, *(len(repr(r.token)) for r in rows))
    cells = [[" ".join(f"{i}:{v:.2f}" for i, v in r.features[b]) for b in bids] for r in rows]
    widths = [max(len(b), *(len(c[j]) for c in cells)) for j, b in enumerate(bids)]
    lines = [
        "token".ljust(token_width)
        + "  "
        + "  ".join(b.ljust(w) for b, w in zip(bids, widths, strict=True))
    ]
    for row, cell in zip(rows, cells, strict=True):
        line = repr(row.token).ljust(token_width) + "  "
        lines.append(line + "  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)
