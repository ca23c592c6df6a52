"""Triton backend of `saeformer.kernels`: forward and backward primitives on 2-D inputs.

Same contract as `torch_ops` (its twin and reference); autograd lives in `ops`. Importing this
module raises ImportError when no Triton kernel can run here (no CUDA, no TRITON_INTERPRET=1),
so `dispatch` falls back to the torch kernels instead of failing at the first launch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saeformer.kernels import triton_util
from saeformer.kernels.triton_sparse import gather_combine, gather_dot, segment_sum
from saeformer.kernels.triton_topk import select

triton_util.require_runnable()

__all__ = [
    "encode_topk",
    "encode_topk_backward",
    "sparse_decode",
    "sparse_decode_backward",
    "topk",
]


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k of pre [N, F]: raw values (descending) and int64 indices."""
    return select(pre, k)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """out[n] = Σ_j values[n, j] · W_dec[indices[n, j]] for 2-D values, indices [N, k]."""
    return gather_combine(values, indices, W_dec, torch.promote_types(values.dtype, W_dec.dtype))


def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    need_values: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Grads of values (gathered dot products) and W_dec (a segment sum over the indices)."""
    grad_values = gather_dot(grad_out, indices, W_dec, values.dtype) if need_values else None
    grad_w = None
    if need_w:
        grad_w, _ = segment_sum(values, indices, grad_out, W_dec.shape[0], with_bias=False)
        grad_w = grad_w.to(W_dec.dtype)
    return grad_values, grad_w


def encode_topk(
    h: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None, k_aux: int
) -> tuple[Tensor, Tensor]:
    """ReLU'd top-k of h @ W_encᵀ + b_enc (h [N, d]) and, side by side, the top-k_aux dead
    latents: values and indices [N, k + k_aux]. AuxK slots beyond the number of dead latents
    hold value 0."""
    pre = torch.nn.functional.linear(h, W_enc, b_enc)
    pre_sel, indices = select(pre, k)
    if k_aux > 0 and dead_mask is not None:
        aux_sel, aux_indices = select(pre, k_aux, keep=dead_mask.contiguous())
        pre_sel = torch.cat([pre_sel, aux_sel], 1)
        indices = torch.cat([indices, aux_indices], 1)
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
    """Grads of h, W_enc and b_enc (float32) from grad_pre [N, k + k_aux]."""
    grad_h = gather_combine(grad_pre, indices, W_enc, h.dtype) if need_h else None
    grad_w = grad_b = None
    if need_w or need_b:
        grad_w, grad_b = segment_sum(grad_pre, indices, h, W_enc.shape[0], with_bias=True)
        grad_w = grad_w.to(W_enc.dtype) if need_w else None
        grad_b = grad_b if need_b else None
    return grad_h, grad_w, grad_b
