"""Deterministic, resumable loading of prepared token shards (see `saeformer.train.prepare`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from saeformer.errors import UserError

SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
META_KEYS = ("vocab_size", "dtype", "n_tokens", "tokenizer", "eos_id")


class TokenData:
    """A prepared folder: meta.json, the tokenizer and memory-mapped train/val tokens."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokenizer_path = self.path / self.meta["tokenizer"]
        if not self.tokenizer_path.is_file():
            raise UserError(f"{self.path}: tokenizer file {self.meta['tokenizer']} is missing")
        self._splits = {name: self._open(name) for name in SPLITS}

    def split(self, name: str) -> np.ndarray:
        """The tokens of split `name` ("train" or "val"), memory-mapped read-only."""
        if name not in self._splits:
            raise UserError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        return self._splits[name]

    def _open(self, name: str) -> np.ndarray:
        """Memory-map `<name>.bin`, checking its size against meta.json."""
        file = self.path / f"{name}.bin"
        dtype = np.dtype(self.meta["dtype"])
        expected = int(self.meta["n_tokens"][name])
        size = file.stat().st_size if file.is_file() else None
        if size != expected * dtype.itemsize:
            found = "it is missing" if size is None else f"it holds {size} bytes"
            raise UserError(
                f"{file}: expected {expected} {dtype.name} tokens but {found}; prepare again"
            )
        if expected == 0:
            return np.zeros(0, dtype)
        return np.memmap(file, dtype=dtype, mode="r", shape=(expected,))


def _read_meta(path: Path) -> dict:
    """meta.json of a prepared folder, checked for the keys the loader needs."""
    file = path / "meta.json"
    if not file.is_file():
        raise UserError(f"{path} is not a prepared token folder (no meta.json); run prepare")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{file}: missing {', '.join(missing)}; prepare again")
    if meta["dtype"] not in DTYPES or not all(s in meta["n_tokens"] for s in SPLITS):
        raise UserError(f"{file}: bad dtype or n_tokens; prepare again")
    return meta


class Batches:
    """Sample i of an epoch: a window of context+1 tokens at a start from a seeded permutation of
    non-overlapping window starts; position = global sample index (independent of world size)."""

    def __init__(self, tokens: np.ndarray, context: int, seed: int) -> None:
        _check_length(tokens, context)
        self.tokens = tokens
        self.context = context
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // context
        self._perms: dict[int, np.ndarray] = {}

    def samples(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples start..start+count-1 as (x, y), int64 [count, context]; y is x shifted by one."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be non-negative, got {start}, {count}")
        epochs, slots = np.divmod(np.arange(start, start + count, dtype=np.int64), self.n_windows)
        starts = np.empty(count, np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            starts[mask] = self._permutation(int(epoch))[slots[mask]] * self.context
        return _windows(self.tokens, starts, self.context)

    def _permutation(self, epoch: int) -> np.ndarray:
        """The window order of one epoch, seeded by (seed, epoch); the last two are kept."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n_windows)
        return self._perms[epoch]


def fixed_windows(
    tokens: np.ndarray, context: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` evenly spaced windows, first to last possible start: a fixed evaluation set."""
    _check_length(tokens, context)
    if count < 1:
        raise UserError(f"count must be positive, got {count}")
    last = len(tokens) - context - 1
    starts = np.arange(count, dtype=np.int64) * last // max(count - 1, 1)
    return _windows(tokens, starts, context)


def _check_length(tokens: np.ndarray, context: int) -> None:
    """Raise UserError unless `tokens` holds at least one window of context+1 tokens."""
    if context < 1:
        raise UserError(f"context must be positive, got {context}")
    if len(tokens) < context + 1:
        raise UserError(
            f"split has {len(tokens)} tokens, fewer than context + 1 = {context + 1}; "
            "use more text or a shorter context"
        )


def _windows(
    tokens: np.ndarray, starts: np.ndarray, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of the windows at `starts`."""
    rows = np.asarray(tokens[starts[:, None] + np.arange(context + 1)], dtype=np.int64)
    window = torch.from_numpy(rows)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
