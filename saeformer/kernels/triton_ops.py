"""Triton backend of `saeformer.kernels`: the three differentiable ops on 2-D inputs.

Same contract as `torch_ops` (its twin and reference). Importing this module raises ImportError
when no Triton kernel can run here (no CUDA, no TRITON_INTERPRET=1), so `dispatch` falls back
to the torch kernels instead of failing at the first launch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from saeformer.kernels import triton_util
from saeformer.kernels.triton_sparse import gather_combine, gather_dot, segment_sum
from saeformer.kernels.triton_topk import select

triton_util.require_runnable()

__all__ = ["encode_topk", "sparse_decode", "topk"]


class _TopK(torch.autograd.Function):
    """Row-wise top-k of pre [N, F]; backward scatters grad values into a zero [N, F]."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        values, indices = select(pre, k)
        ctx.save_for_backward(indices)
        ctx.num_cols = pre.shape[1]
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None
    ) -> tuple[Tensor, None]:
        (indices,) = ctx.saved_tensors
        grad_pre = grad_values.new_zeros((grad_values.shape[0], ctx.num_cols))
        return grad_pre.scatter_(1, indices, grad_values), None


class _SparseDecode(torch.autograd.Function):
    """out = Σ_j values[:, j] · W_dec[indices[:, j]], with a sparse backward."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        out_dtype = torch.promote_types(values.dtype, W_dec.dtype)
        return gather_combine(values, indices, W_dec, out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(grad_out, indices, W_dec, values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w, _ = segment_sum(values, indices, grad_out, W_dec.shape[0], with_bias=False)
            grad_w = grad_w.to(W_dec.dtype)
        return grad_values, None, grad_w


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
        pre = torch.nn.functional.linear(h, W_enc, b_enc)
        pre_sel, indices = select(pre, k)
        if k_aux > 0 and dead_mask is not None:
            aux_sel, aux_indices = select(pre, k_aux, keep=dead_mask.contiguous())
            pre_sel = torch.cat([pre_sel, aux_sel], 1)
            indices = torch.cat([indices, aux_indices], 1)
        values = torch.relu(pre_sel)
        ctx.save_for_backward(h, W_enc, indices, values)
        ctx.b_dtype = b_enc.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        h, W_enc, indices, values = ctx.saved_tensors
        g = torch.where(values > 0, grad_values, 0)  # sparse grad of pre, [N, k + k_aux]
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = gather_combine(g, indices, W_enc, h.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w, grad_b = segment_sum(g, indices, h, W_enc.shape[0], with_bias=True)
            grad_w = grad_w.to(W_enc.dtype) if ctx.needs_input_grad[1] else None
            grad_b = grad_b.to(ctx.b_dtype) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k over the last dim of pre [..., F]: raw values (descending), int64 indices."""
    values, indices = _TopK.apply(pre.reshape(-1, pre.shape[-1]), k)
    lead = pre.shape[:-1]
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """out[n] = Σ_j values[n, j] · W_dec[indices[n, j]] for 2-D values, indices [N, k]."""
    return _SparseDecode.apply(values, indices, W_dec)


def encode_topk(
    h: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None, k_aux: int
) -> tuple[Tensor, Tensor]:
    """ReLU'd top-k of h @ W_encᵀ + b_enc (h [N, d]) and, side by side, the top-k_aux dead
    latents: values and indices [N, k + k_aux]. AuxK slots beyond the number of dead latents
    hold value 0 (zero grad)."""
    return _EncodeTopK.apply(h, W_enc, b_enc, k, dead_mask, k_aux)
