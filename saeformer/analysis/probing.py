"""k-sparse probing (Gurnee et al. 2023) of SAE features on token labels from the tagged Brown
Corpus: part of speech and genre depend on context; token-identity labels are the control.

For each binary task the k features whose mean activation differs most between the classes
(on the training windows) feed a logistic probe; its accuracy on held-out windows, with classes
balanced by subsampling, is the score (chance = 0.5).
"""

from __future__ import annotations

import lzma
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from saeformer.errors import UserError

POS = {  # Brown tag prefixes of each part of speech (after stripping -tl, -hl, -nc and $)
    "noun": ("nn", "np"),
    "verb": ("vb",),
    "adjective": ("jj",),
    "adverb": ("rb",),
    "preposition": ("in",),
    "determiner": ("at",),
}
FICTION = set("klmnpr")  # Brown genre letters of fiction (k general … r humor)
NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", "''", ")"}
QUOTES = {"``": '"', "''": '"'}


@dataclass
class ProbeSet:
    """Token windows of tagged text with per-token labels (-1: no label) for each task."""

    tokens: Tensor  # [N, T]
    labels: dict[str, Tensor]  # task name → [N, T] int8 in {-1, 0, 1}


def _base_tag(tag: str) -> str:
    tag = tag.lower().split("-")[0]
    return tag.rstrip("$*")


def read_brown(path: Path, words_per_doc: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Words with their tags per Brown file (`ca01`, ...), in corpus order; with a positive
    `words_per_doc`, only each file's first sentences, up to about that many words."""
    docs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    try:
        with lzma.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                name, _, sentence = line.rstrip("\n").partition("\t")
                if 0 < words_per_doc <= len(docs[name]):
                    continue
                for item in sentence.split():
                    word, _, tag = item.rpartition("/")
                    if word:
                        docs[name].append((QUOTES.get(word, word), tag))
    except (OSError, lzma.LZMAError, EOFError) as exc:
        raise UserError(f"cannot read the tagged Brown Corpus {path}: {exc}") from None
    if not docs:
        raise UserError(f"{path}: no tagged sentences")
    return docs


def _detokenise(words: list[tuple[str, str]]) -> tuple[str, np.ndarray]:
    """Running text of the words, and the word index of every character (-1: a space)."""
    parts, owner = [], []
    for i, (word, _) in enumerate(words):
        if parts and word not in NO_SPACE_BEFORE and parts[-1] != '"':
            parts.append(" ")
            owner.append(-1)
        parts.append(word)
        owner.extend([i] * len(word))
    return "".join(parts), np.asarray(owner, dtype=np.int64)


def _token_tasks(tokenizer: Tokenizer, vocab_size: int) -> dict[str, np.ndarray]:
    """Token-identity labels per token id: capitalised, digit, punctuation, and a random control."""
    forms = [tokenizer.decode([i]).strip() for i in range(vocab_size)]
    rng = np.random.default_rng(0)
    return {
        "token:capitalised": np.array([f[:1].isupper() for f in forms]),
        "token:digit": np.array([f[:1].isdigit() for f in forms]),
        "token:punctuation": np.array([bool(f) and not f[0].isalnum() for f in forms]),
        "control:random token label": rng.random(vocab_size) < 0.5,
    }


def brown_probe_set(
    path: Path,
    tokenizer: Tokenizer,
    vocab_size: int,
    context: int,
    windows: int,
    words_per_doc: int = 0,
) -> ProbeSet:
    """`windows` evenly spaced windows of `context` tokens over the tagged Brown Corpus."""
    ids, word_tags, genres = [], [], []
    for name, words in read_brown(path, words_per_doc).items():
        text, owner = _detokenise(words)
        enc = tokenizer.encode(text)
        ids.extend(enc.ids)
        for _start, end in enc.offsets:
            w = owner[end - 1] if end > 0 else -1
            word_tags.append(_base_tag(words[w][1]) if w >= 0 else "")
        genres.extend([name[1] in FICTION] * len(enc.ids))
    total = len(ids)
    if total < context * windows:
        raise UserError(f"{path}: {total} tokens, fewer than {windows} windows of {context}")
    starts = np.arange(windows) * ((total - context) // max(windows - 1, 1))
    index = starts[:, None] + np.arange(context)
    tokens = np.asarray(ids, dtype=np.int64)[index]
    tags = np.asarray(word_tags, dtype=object)[index]
    labels = {
        f"pos:{pos}": np.where(tags == "", -1, np.vectorize(lambda t, p=p: t.startswith(p))(tags))
        for pos, p in POS.items()
    }
    labels["genre:fiction"] = np.asarray(genres)[index]
    for task, per_id in _token_tasks(tokenizer, vocab_size).items():
        labels[task] = per_id[tokens]
    return ProbeSet(
        tokens=torch.from_numpy(tokens),
        labels={k: torch.from_numpy(np.asarray(v, dtype=np.int8)) for k, v in labels.items()},
    )


def gather_features(values: Tensor, indices: Tensor, features: Tensor) -> Tensor:
    """Dense activations [N, len(features)] of chosen features from sparse codes [N, k]."""
    hit = indices.unsqueeze(-1) == features.view(1, 1, -1)
    return (values.unsqueeze(-1) * hit).sum(dim=1)


def _balanced(labels: Tensor, rows: Tensor, gen: torch.Generator) -> Tensor:
    """Row ids with as many positives as negatives (the larger class subsampled)."""
    pos, neg = rows[labels[rows] == 1], rows[labels[rows] == 0]
    n = min(len(pos), len(neg))
    pick = [c[torch.randperm(len(c), generator=gen)[:n]] for c in (pos, neg)]
    return torch.cat(pick)


def _fit_logistic(x: Tensor, y: Tensor, steps: int = 100, l2: float = 1e-3) -> Tensor:
    """Weights (with a bias last) of an L2-regularised logistic regression, by L-BFGS."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(x1.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(x1 @ w, y)
            + l2 * w[:-1].square().sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def k_sparse_probe(
    values: Tensor, indices: Tensor, width: int, labels: Tensor, train: Tensor, ks: list[int]
) -> dict[int, float]:
    """Balanced held-out accuracy of logistic probes on the k most class-selective features.

    values/indices: [N, k_code] codes of N tokens; labels: [N] in {-1, 0, 1}; train: [N] bool.
    """
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(len(labels))
    fit_rows = _balanced(labels, rows[train & (labels >= 0)], gen)
    test_rows = _balanced(labels, rows[~train & (labels >= 0)], gen)
    if len(fit_rows) < 4 or len(test_rows) < 4:
        return {k: float("nan") for k in ks}
    means = []
    for cls in (1, 0):
        r = fit_rows[labels[fit_rows] == cls]
        sums = torch.zeros(width, dtype=torch.float64)
        sums.index_add_(0, indices[r].reshape(-1), values[r].reshape(-1).double())
        means.append(sums / len(r))
    order = (means[0] - means[1]).abs().argsort(descending=True)
    scores = {}
    for k in ks:
        chosen = order[:k]
        x_fit = gather_features(values[fit_rows], indices[fit_rows], chosen).double()
        x_test = gather_features(values[test_rows], indices[test_rows], chosen).double()
        mu, sd = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)
        w = _fit_logistic((x_fit - mu) / sd, labels[fit_rows].double())
        x1 = torch.cat([(x_test - mu) / sd, torch.ones(len(x_test), 1, dtype=torch.float64)], 1)
        predicted = (x1 @ w > 0).to(labels.dtype)
        scores[k] = (predicted == labels[test_rows]).double().mean().item()
    return scores
