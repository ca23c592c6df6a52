"""Feature matching on decoder-row cosine (DESIGN.md, Metrics).

Exact Hungarian assignment for small F; for F in the tens of thousands, a sparse minimum-weight
full bipartite matching over each feature's top candidates, or mutual nearest neighbours.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from saeformer.errors import UserError

METHODS = ("auto", "hungarian", "sparse", "mnn")
ROW_CHUNK = 1024  # rows of A per block of the cosine matrix


@dataclass
class Matching:
    """A one-to-one matching of the rows of A to rows of B."""

    method: str  # the method that ran: hungarian, sparse or mnn
    target: np.ndarray  # [F_a] matched row of B, -1 where unmatched
    cosine: np.ndarray  # [F_a] cosine of each matched pair, NaN where unmatched


@dataclass
class Candidates:
    """Each row's top-c columns of the cosine matrix, and each column's top-c rows."""

    row_top: np.ndarray  # [F_a, c] indices into B, best first
    col_top: np.ndarray  # [F_b, c] indices into A, best first


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _blocks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
    """Row blocks of the cosine matrix A Bᵀ, on the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    for lo in range(0, len(a), ROW_CHUNK):
        yield lo, ta[lo : lo + ROW_CHUNK] @ tb.T


def top_candidates(a: np.ndarray, b: np.ndarray, c: int) -> Candidates:
    """Top-c candidates both ways, in one pass over the cosine matrix in row blocks."""
    c = max(1, min(c, len(a), len(b)))
    rows, col_val, col_idx = [], None, None
    for lo, scores in _blocks(a, b):
        rows.append(scores.topk(c, dim=1).indices.cpu())
        top = scores.topk(min(c, len(scores)), dim=0)
        val, idx = top.values, top.indices + lo
        if col_val is not None:
            val, idx = torch.cat([col_val, val]), torch.cat([col_idx, idx])
        keep = val.topk(min(c, len(val)), dim=0).indices
        col_val, col_idx = val.gather(0, keep), idx.gather(0, keep)
    return Candidates(row_top=torch.cat(rows).numpy(), col_top=col_idx.T.cpu().numpy())


def pair_cosines(a: np.ndarray, b: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cosine of each row of A with its matched row of B (NaN where target is -1)."""
    out = np.full(len(a), np.nan, dtype=np.float32)
    ok = target >= 0
    out[ok] = np.einsum("ij,ij->i", a[ok], b[target[ok]])
    return out


def _hungarian(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(a @ b.T, maximize=True)
    target = np.full(len(a), -1, dtype=np.int64)
    target[rows] = cols
    return target


def _sparse(a: np.ndarray, b: np.ndarray, c: int) -> np.ndarray:
    """Min-weight full matching over candidate edges; i→i edges keep a full matching possible."""
    cand = top_candidates(a, b, c)
    n = min(len(a), len(b))
    per_row, per_col = cand.row_top.shape[1], cand.col_top.shape[1]
    rows = np.concatenate(
        [np.repeat(np.arange(len(a)), per_row), cand.col_top.ravel(), np.arange(n)]
    )
    cols = np.concatenate(
        [cand.row_top.ravel(), np.repeat(np.arange(len(b)), per_col), np.arange(n)]
    )
    edge = np.unique(rows * len(b) + cols)
    rows, cols = edge // len(b), edge % len(b)
    cost = 2.0 - np.einsum("ij,ij->i", a[rows], b[cols])  # > 0: every edge is explicit
    graph = sp.csr_matrix((cost, (rows, cols)), shape=(len(a), len(b)))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    target = np.full(len(a), -1, dtype=np.int64)
    target[matched_rows] = matched_cols
    return target


def _mutual_nn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cand = top_candidates(a, b, 1)
    best_b, best_a = cand.row_top[:, 0], cand.col_top[:, 0]
    return np.where(best_a[best_b] == np.arange(len(a)), best_b, -1)


def match_features(
    a: np.ndarray,
    b: np.ndarray,
    method: str = "auto",
    *,
    exact_max: int = 4096,
    candidates: int = 8,
) -> Matching:
    """Match decoder rows A [F_a, d] to B [F_b, d], maximising total cosine.

    `auto` runs the exact Hungarian assignment when max(F_a, F_b) ≤ exact_max, else `sparse`.
    """
    if method not in METHODS:
        raise UserError(f"unknown matching method {method!r}: use one of {', '.join(METHODS)}")
    a, b = unit_rows(a), unit_rows(b)
    if method == "auto":
        method = "hungarian" if max(len(a), len(b)) <= exact_max else "sparse"
    if method == "hungarian":
        target = _hungarian(a, b)
    elif method == "sparse":
        target = _sparse(a, b, candidates)
    else:
        target = _mutual_nn(a, b)
    return Matching(method=method, target=target, cosine=pair_cosines(a, b, target))


def pairs_above(a: np.ndarray, b: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with cos(A_i, B_j) ≥ threshold, computed in row blocks."""
    found = [
        (scores >= threshold).nonzero().cpu() + torch.tensor([lo, 0])
        for lo, scores in _blocks(unit_rows(a), unit_rows(b))
    ]
    pairs = torch.cat(found).numpy()
    return pairs[:, 0], pairs[:, 1]
