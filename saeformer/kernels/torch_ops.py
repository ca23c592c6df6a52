"""Torch-native kernels: the CPU implementation and the reference twin of the Triton kernels.

Memory: no backward pass builds an N×F tensor. The three primitives below work on the sparse
codes (N×k) and loop over fixed chunks of tokens, so their only temporary, a gathered
[chunk, k, d] block, stays under `_CHUNK_ELEMS` elements: extra memory is O(N·k + F·d).
Ops take 2-D inputs (tokens flattened); the public wrappers in `saeformer.kernels` flatten.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_CHUNK_ELEMS = 1 << 22
"""Largest temporary [chunk, k, d] block, in elements (16 MiB in fp32)."""


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
    """Slices of at most `_CHUNK_ELEMS // width` rows covering range(n)."""
    step = max(1, _CHUNK_ELEMS // max(1, width))
    return (slice(start, start + step) for start in range(0, n, step))


def gather_combine(coeff: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """out[n] = Σ_j coeff[n, j] · rows[idx[n, j]]: [N, d] in the accumulation dtype."""
    acc = _acc_dtype(coeff, rows)
    n, k = idx.shape
    out = rows.new_empty((n, rows.shape[1]), dtype=acc)
    for s in _chunks(n, k * rows.shape[1]):
        out[s] = torch.bmm(coeff[s].to(acc).unsqueeze(1), rows[idx[s]].to(acc)).squeeze(1)
    return out


def gather_dot(x: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """out[n, j] = ⟨x[n], rows[idx[n, j]]⟩: [N, k] in the accumulation dtype."""
    acc = _acc_dtype(x, rows)
    n, k = idx.shape
    out = x.new_empty((n, k), dtype=acc)
    for s in _chunks(n, k * rows.shape[1]):
        out[s] = torch.bmm(rows[idx[s]].to(acc), x[s].to(acc).unsqueeze(2)).squeeze(2)
    return out


def scatter_outer(coeff: Tensor, idx: Tensor, x: Tensor, num_rows: int) -> Tensor:
    """Segment sum out[f] = Σ_{idx[n, j] = f} coeff[n, j] · x[n]: [F, d], accumulation dtype."""
    acc = _acc_dtype(coeff, x)
    n, k = idx.shape
    d = x.shape[1]
    out = x.new_zeros((num_rows, d), dtype=acc)
    for s in _chunks(n, k * d):
        outer = coeff[s].to(acc).unsqueeze(2) * x[s].to(acc).unsqueeze(1)
        out.index_add_(0, idx[s].reshape(-1), outer.reshape(-1, d))
    return out


class _SparseDecode(torch.autograd.Function):
    """out = Σ_j values[:, j] · W_dec[indices[:, j]], with a sparse backward."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        out_dtype = torch.promote_types(values.dtype, W_dec.dtype)
        return gather_combine(values, indices, W_dec).to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(grad_out, indices, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = scatter_outer(values, indices, grad_out, W_dec.shape[0]).to(W_dec.dtype)
        return grad_values, None, grad_w


def _select(pre: Tensor, k: int, dead_mask: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor]:
    """Top-k of pre per row, then (k_aux > 0) the top-k_aux dead latents; overwrites pre."""
    values, indices = pre.topk(k, dim=1)
    if k_aux == 0 or dead_mask is None:
        return values, indices
    aux_values, aux_indices = pre.masked_fill_(~dead_mask, float("-inf")).topk(k_aux, dim=1)
    return torch.cat([values, aux_values], 1), torch.cat([indices, aux_indices], 1)


class _EncodeTopK(torch.autograd.Function):
    """ReLU(top-k(h @ W_encᵀ + b_enc)), active and AuxK slots side by side, sparse backward."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        k: int,
        dead_mask: Tensor | None,
        k_aux: int,
    ) -> tuple[Tensor, Tensor]:
        pre_sel, indices = _select(torch.nn.functional.linear(h, W_enc, b_enc), k, dead_mask, k_aux)
        ctx.save_for_backward(h, W_enc, indices, pre_sel > 0)
        ctx.b_dtype = b_enc.dtype
        ctx.mark_non_differentiable(indices)
        return torch.relu(pre_sel), indices

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        h, W_enc, indices, active = ctx.saved_tensors
        g = grad_values * active  # sparse grad of pre at the selected latents, [N, k + k_aux]
        num_latents = W_enc.shape[0]
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = gather_combine(g, indices, W_enc).to(h.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = scatter_outer(g, indices, h, num_latents).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            acc = _acc_dtype(g)
            grad_b = (
                g.new_zeros(num_latents, dtype=acc)
                .index_add_(0, indices.reshape(-1), g.reshape(-1).to(acc))
                .to(ctx.b_dtype)
            )
        return grad_h, grad_w, grad_b, None, None, None


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k over the last dim: raw values (descending) and int64 indices."""
    values, indices = torch.topk(pre, k, dim=-1)
    return values, indices


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """out[n] = Σ_j values[n, j] · W_dec[indices[n, j]] for 2-D values, indices [N, k]."""
    return _SparseDecode.apply(values, indices, W_dec)


def encode_topk(
    h: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> EncodeResult:
    """Top-k of h @ W_encᵀ + b_enc, ReLU'd, plus the top-k_aux dead latents (h is [N, d]).

    AuxK slots beyond the number of dead latents hold value 0 (zero grad) at arbitrary indices.
    """
    values, indices = _EncodeTopK.apply(h, W_enc, b_enc, k, dead_mask, k_aux)
    if k_aux == 0 or dead_mask is None:
        return EncodeResult(values, indices, None, None)
    return EncodeResult(values[:, :k], indices[:, :k], values[:, k:], indices[:, k:])
