"""Activation streaming: token windows → frozen host → filtered, shuffled activation batches.

Memory is bounded by one buffer of `buffer_tokens` activations per hook point. Buffer r holds
the activations of windows r·W … r·W+W−1 of a seeded random order over the whole split (W =
buffer_tokens / context), shuffled with a generator seeded by (seed, r). A position in the stream
is therefore two integers (buffer, offset): resuming recomputes that buffer and continues
bit-exactly, and an optional on-disk cache stores buffers so that other SAEs train from them
without running the host again.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor
from tqdm import tqdm

from saeformer.analysis.hooks import HookPoint, Host
from saeformer.atomic import write_json
from saeformer.errors import UserError
from saeformer.train.data import Batches


@dataclass
class StreamConfig:
    """Where activations come from and how they are filtered and shuffled."""

    dir: Path = Path("data/prepared/bundled")  # prepared tokens, tokenised for the host
    split: str = "train"
    context: int = 128  # tokens per window fed to the host
    host_batch: int = 8  # windows per host forward pass
    buffer_tokens: int = 65_536  # activations per hook point held for shuffling
    exclude_first: int = 1  # positions dropped at the start of every window (no context)
    norm_outlier: float = 0.0  # drop norms above this × the host batch median (0: off)
    cache_dir: Path | None = None  # optional on-disk cache of the shuffled buffers

    def validate(self) -> None:
        """Raise UserError for settings that cannot stream."""
        if min(self.context, self.host_batch, self.buffer_tokens) <= 0:
            raise UserError("data.context, data.host_batch and data.buffer_tokens must be positive")
        if not 0 <= self.exclude_first < self.context:
            raise UserError("data.exclude_first must be in [0, data.context)")
        if self.norm_outlier < 0:
            raise UserError("data.norm_outlier must be non-negative")


def special_token_ids(tokenizer_path: Path) -> list[int]:
    """Ids of the special tokens (end-of-text, BOS, chat markers) of a tokenizer.json."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def keep_mask(
    tokens: Tensor, acts: list[Tensor], special: Tensor, exclude_first: int, norm_outlier: float
) -> Tensor:
    """[B, T] bool: not special, not among the first positions, and no outlier norm at any hook."""
    keep = ~torch.isin(tokens, special.to(tokens.device))
    keep[:, :exclude_first] = False
    if norm_outlier > 0 and keep.any():
        for a in acts:
            norms = a.float().norm(dim=-1)
            keep &= norms <= norm_outlier * norms[keep].median()
    return keep


class ActivationStream:
    """Fixed-size batches of activations at several hook points, from one host forward each."""

    def __init__(
        self,
        host: Host,
        hooks: list[HookPoint],
        tokens: np.ndarray,
        special_ids: list[int],
        cfg: StreamConfig,
        seed: int,
    ) -> None:
        cfg.validate()
        self.host, self.hooks, self.cfg, self.seed = host, hooks, cfg, seed
        self.windows = Batches(tokens, cfg.context, seed)
        self.special = torch.tensor(special_ids, dtype=torch.long)
        self.per_buffer = math.ceil(cfg.buffer_tokens / cfg.context)
        self._cached: tuple[int, dict[HookPoint, Tensor]] | None = None
        if cfg.cache_dir is not None:
            self._check_cache(cfg.cache_dir)

    def _fingerprint(self) -> dict:
        keys = ("dir", "split", "context", "buffer_tokens", "exclude_first", "norm_outlier")
        settings = {k: str(v) for k, v in asdict(self.cfg).items() if k in keys}
        hooks = [h.name for h in self.hooks]
        return {"host": self.host.name, "hooks": hooks, "seed": self.seed, **settings}

    def _check_cache(self, cache: Path) -> None:
        meta = cache / "cache.json"
        if meta.is_file():
            found = json.loads(meta.read_text(encoding="utf-8"))
            if found != self._fingerprint():
                raise UserError(f"activation cache {cache} was written for other settings: {found}")
        else:
            write_json(meta, self._fingerprint())

    @torch.no_grad()
    def _compute(self, r: int) -> dict[HookPoint, Tensor]:
        """Buffer r: kept activations of its windows, shuffled, on the host's device."""
        cfg = self.cfg
        parts: dict[HookPoint, list[Tensor]] = {h: [] for h in self.hooks}
        start = r * self.per_buffer
        chunks = range(start, start + self.per_buffer, cfg.host_batch)
        for i in tqdm(chunks, desc=f"activations {r}", leave=False, disable=None):
            count = min(cfg.host_batch, start + self.per_buffer - i)
            x, _ = self.windows.samples(i, count)
            x = x.to(self.host.device)
            acts = self.host.capture(x, self.hooks)
            keep = keep_mask(
                x, list(acts.values()), self.special, cfg.exclude_first, cfg.norm_outlier
            )
            for h in self.hooks:
                parts[h].append(acts[h][keep])
        merged = {h: torch.cat(p) for h, p in parts.items()}
        order = np.random.default_rng([self.seed, r]).permutation(len(merged[self.hooks[0]]))
        index = torch.from_numpy(order).to(self.host.device)
        return {h: a[index] for h, a in merged.items()}

    def buffer(self, r: int) -> dict[HookPoint, Tensor]:
        """Buffer r, from memory, the on-disk cache, or the host."""
        if self._cached is not None and self._cached[0] == r:
            return self._cached[1]
        cache = self.cfg.cache_dir
        file = cache / f"buffer_{r}.safetensors" if cache is not None else None
        if file is not None and file.is_file():
            loaded = load_file(file, device=str(self.host.device))
            acts = {h: loaded[h.name] for h in self.hooks}
        else:
            acts = self._compute(r)
            if file is not None:
                save_file({h.name: a.contiguous().cpu() for h, a in acts.items()}, file)
        self._cached = (r, acts)
        return acts

    def batch(
        self, position: tuple[int, int], size: int
    ) -> tuple[dict[HookPoint, Tensor], tuple[int, int]]:
        """`size` activations per hook from position (buffer, offset); also the next position."""
        r, offset = position
        pieces: dict[HookPoint, list[Tensor]] = {h: [] for h in self.hooks}
        need = size
        while need > 0:
            acts = self.buffer(r)
            n = len(acts[self.hooks[0]])
            take = min(need, n - offset)
            for h in self.hooks:
                pieces[h].append(acts[h][offset : offset + take])
            need, offset = need - take, offset + take
            if offset == n:
                r, offset = r + 1, 0
        return {h: torch.cat(p).float() for h, p in pieces.items()}, (r, offset)
