"""Torch-native kernels: the CPU implementation and the reference twin of the Triton kernels.

Forward and backward primitives on 2-D inputs; autograd lives in `ops`. Memory: no pass
builds an N×F tensor. The encoder forward computes its pre-activations in blocks of at most
`_CHUNK_ROWS` rows and `_CHUNK_ELEMS` elements and keeps only the selected codes (N×k); the
sparse products are `embedding_bag` calls (fused gather-multiply-sum; the segment sums bag the
slots sorted by latent) and gather-dots in bounded blocks: extra memory is O(N·k + F·d)
beyond one block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as nnf
from torch import Tensor

_CHUNK_ELEMS = 1 << 24
"""Largest block of encoder pre-activations [rows, F] held at once, in elements (64 MiB fp32)."""
_CHUNK_ROWS = 1024
"""Most rows per block: at small F, blocks of 1024 rows ran the linear + top-k in 1.20 dense
matmuls against 1.41 for 4096 rows (F = 4096, d = 256, one thread)."""


class EncodeResult(NamedTuple):
    """Active (values, indices) and, with AuxK, the top dead latents' (values, indices)."""

    values: Tensor
    indices: Tensor
    aux_values: Tensor | None
    aux_indices: Tensor | None


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunks(n: int, width: int) -> Iterator[slice]:
    """Slices of at most `_CHUNK_ROWS` and `_CHUNK_ELEMS // width` rows covering range(n)."""
    step = max(1, min(_CHUNK_ROWS, _CHUNK_ELEMS // max(1, width)))
    return (slice(start, start + step) for start in range(0, n, step))


def _combine(coeff: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """out[n] = Σ_j coeff[n, j] · rows[idx[n, j]] in the accumulation dtype; differentiable."""
    acc = _acc_dtype(coeff, rows)
    return nnf.embedding_bag(idx, rows.to(acc), per_sample_weights=coeff.to(acc), mode="sum")


def _combine_nonzero(coeff: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """`_combine` without the slots whose coefficient is 0 (inactive or unused AuxK slots):
    they add nothing, forward or backward, so no row is gathered or summed for them."""
    keep = coeff != 0
    if keep.all():
        return _combine(coeff, idx, rows)
    counts = keep.sum(1)
    acc = _acc_dtype(coeff, rows)
    return nnf.embedding_bag(
        idx[keep],
        rows.to(acc),
        counts.cumsum(0) - counts,
        per_sample_weights=coeff[keep].to(acc),
        mode="sum",
    )


def _gather_dot(grad_out: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """out[n, j] = grad_out[n] · rows[idx[n, j]]: [N, k], by `embedding_bag`'s fused
    per-sample-weights backward (nothing of size N·k·d is gathered)."""
    n, k = idx.shape
    acc = _acc_dtype(grad_out, rows)
    bags = torch.arange(n, device=idx.device)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_out.to(acc).contiguous(),
        rows.to(acc).contiguous(),
        idx.reshape(-1).contiguous(),
        bags * k,
        bags.repeat_interleave(k),
        0,
    )
    return out.reshape(n, k)


def _segment_sum(coeff: Tensor, idx: Tensor, inputs: Tensor, num_rows: int) -> Tensor:
    """out[f] = Σ over slots (n, j) with idx[n, j] = f of coeff[n, j] · inputs[n]: [F, d], by
    `embedding_bag`'s fused weight backward over the non-zero slots."""
    keep = coeff != 0
    counts = keep.sum(1)
    bag_of_slot = torch.arange(len(counts), device=idx.device).repeat_interleave(counts)
    acc = _acc_dtype(coeff, inputs)
    return torch.ops.aten._embedding_bag_dense_backward(
        inputs.to(acc),
        idx[keep],
        bag_of_slot,
        counts,
        counts,
        num_rows,
        False,
        0,
        coeff[keep].to(acc),
    )


class _AuxColumns(NamedTuple):
    """The dead latents AuxK selects from, and the live latent that pads unused slots."""

    dead: Tensor
    pad: int


def _aux_columns(dead_mask: Tensor, k_aux: int) -> _AuxColumns:
    """Dead latent indices; the pad is a live latent, needed only when fewer than k_aux die."""
    dead = dead_mask.nonzero().squeeze(1)
    pad = 0 if len(dead) >= k_aux else int((~dead_mask).nonzero()[0])
    return _AuxColumns(dead, pad)


def _select_aux(pre: Tensor, cols: _AuxColumns, k_aux: int) -> tuple[Tensor, Tensor]:
    """Top-k_aux of pre over the dead columns only; unused slots hold -inf at the pad latent."""
    n_sel = min(k_aux, len(cols.dead))
    values = pre.new_full((pre.shape[0], k_aux), float("-inf"))
    indices = torch.full(values.shape, cols.pad, dtype=torch.int64, device=pre.device)
    if n_sel:
        # unsorted: 1.5x faster than sorted at k_aux = 256 of 2048 columns
        top = pre.index_select(1, cols.dead).topk(n_sel, dim=1, sorted=False)
        values[:, :n_sel] = top.values
        indices[:, :n_sel] = cols.dead[top.indices]
    return values, indices


def _select(
    h: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None, k_aux: int
) -> tuple[Tensor, Tensor]:
    """Top-k of h @ W_encᵀ + b_enc per row, then (k_aux > 0) the top-k_aux dead latents."""
    cols = None if k_aux == 0 or dead_mask is None else _aux_columns(dead_mask, k_aux)
    parts = [
        _select_block(nnf.linear(h[s], W_enc, b_enc), k, cols, k_aux)
        for s in _chunks(h.shape[0], W_enc.shape[0])
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _select_block(
    pre: Tensor, k: int, cols: _AuxColumns | None, k_aux: int
) -> tuple[Tensor, Tensor]:
    """`_select` on one block of pre-activations, which is freed on return."""
    top = pre.topk(k, dim=1, sorted=False)
    if cols is None:
        return top.values, top.indices
    aux = _select_aux(pre, cols, k_aux)
    return torch.cat([top.values, aux[0]], 1), torch.cat([top.indices, aux[1]], 1)


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k over the last dim: raw values (descending) and int64 indices."""
    values, indices = torch.topk(pre, k, dim=-1)
    return values, indices


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """out[n] = Σ_j values[n, j] · W_dec[indices[n, j]] for 2-D values, indices [N, k]."""
    return _combine(values, indices, W_dec).to(torch.promote_types(values.dtype, W_dec.dtype))


def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    need_values: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Grads of values (gathered dot products) and W_dec (a segment sum over the indices)."""
    grad_values = _gather_dot(grad_out, indices, W_dec).to(values.dtype) if need_values else None
    grad_w = None
    if need_w:
        grad_w = _segment_sum(values, indices, grad_out, W_dec.shape[0]).to(W_dec.dtype)
    return grad_values, grad_w


def encode_topk(
    h: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None, k_aux: int
) -> tuple[Tensor, Tensor]:
    """ReLU'd top-k of h @ W_encᵀ + b_enc (h [N, d]) and, side by side, the top-k_aux dead
    latents: values and indices [N, k + k_aux]. AuxK slots beyond the number of dead latents
    hold value 0."""
    pre_sel, indices = _select(h, W_enc, b_enc, k, dead_mask, k_aux)
    return torch.relu(pre_sel), indices


def encode_topk_backward(
    grad_pre: Tensor,
    h: Tensor,
    W_enc: Tensor,
    indices: Tensor,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Grads of h, W_enc and b_enc (in the accumulation dtype) from grad_pre [N, k + k_aux]."""
    grad_h = _combine_nonzero(grad_pre, indices, W_enc).to(h.dtype) if need_h else None
    grad_w = grad_b = None
    if need_w:
        grad_w = _segment_sum(grad_pre, indices, h, W_enc.shape[0]).to(W_enc.dtype)
    if need_b:
        acc = _acc_dtype(grad_pre)
        grad_b = grad_pre.new_zeros(W_enc.shape[0], dtype=acc).index_add_(
            0, indices.reshape(-1), grad_pre.reshape(-1).to(acc)
        )
    return grad_h, grad_w, grad_b
