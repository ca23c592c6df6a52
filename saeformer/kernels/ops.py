"""The three sparse kernels as `torch.library` custom ops, with their autograd written once.

Each op runs the primitives of the backend `dispatch` picks for its device (`torch_ops` or
`triton_ops`); a fake implementation gives `torch.compile` shapes without running anything, so
a compiled block keeps its bottleneck in one graph. Under autocast, `encode_topk` runs in bf16
(its inputs cast, autocast off inside); the decode accumulates in float32 whatever it gets.
Ops take 2-D inputs; `saeformer.kernels` flattens and validates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saeformer.kernels.dispatch import backend


def _filled(grads: tuple[Tensor | None, ...], like: Tensor) -> tuple[Tensor, ...]:
    """Custom ops cannot return None: an empty tensor stands in for a grad nobody asked for."""
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _grad_or_none(grad: Tensor, needed: bool) -> Tensor | None:
    return grad if needed else None


# ----------------------------------------------------------------------------------- topk


@torch.library.custom_op("saeformer::topk", mutates_args=())
def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k of pre [N, F]: values and int64 indices [N, k]."""
    return backend(pre.device).topk(pre, k)


@topk.register_fake
def _(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return pre.new_empty(pre.shape[0], k), pre.new_empty(pre.shape[0], k, dtype=torch.int64)


def _topk_setup(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(output[1])
    ctx.num_cols = inputs[0].shape[1]
    ctx.mark_non_differentiable(output[1])


def _topk_backward(ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None) -> tuple:
    (indices,) = ctx.saved_tensors
    grad_pre = grad_values.new_zeros(grad_values.shape[0], ctx.num_cols)
    return grad_pre.scatter_(1, indices, grad_values), None


topk.register_autograd(_topk_backward, setup_context=_topk_setup)


# -------------------------------------------------------------------------- sparse decode


@torch.library.custom_op("saeformer::sparse_decode", mutates_args=())
def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """out[n] = Σ_j values[n, j] · W_dec[indices[n, j]]: [N, d]."""
    return backend(values.device).sparse_decode(values, indices, W_dec)


@sparse_decode.register_fake
def _(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    dtype = torch.promote_types(values.dtype, W_dec.dtype)
    return values.new_empty(values.shape[0], W_dec.shape[1], dtype=dtype)


@torch.library.custom_op("saeformer::sparse_decode_backward", mutates_args=())
def sparse_decode_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    need_values: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor]:
    """Grads of values ([N, k], gathered dot products) and W_dec ([F, d], a segment sum)."""
    grads = backend(values.device).sparse_decode_backward(
        grad_out, values, indices, W_dec, need_values, need_w
    )
    return _filled(grads, values)


@sparse_decode_backward.register_fake
def _(grad_out, values, indices, W_dec, need_values, need_w) -> tuple[Tensor, Tensor]:
    return (
        values.new_empty(values.shape if need_values else 0),
        W_dec.new_empty(W_dec.shape if need_w else 0),
    )


def _decode_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _decode_backward(ctx: Any, grad_out: Tensor) -> tuple:
    values, indices, W_dec = ctx.saved_tensors
    need_values, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_values, grad_w = sparse_decode_backward(
        grad_out, values, indices, W_dec, need_values, need_w
    )
    return _grad_or_none(grad_values, need_values), None, _grad_or_none(grad_w, need_w)


sparse_decode.register_autograd(_decode_backward, setup_context=_decode_setup)


# ---------------------------------------------------------------------------- encode_topk


@torch.library.custom_op("saeformer::encode_topk", mutates_args=())
def encode_topk(
    h: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None, k_aux: int
) -> tuple[Tensor, Tensor]:
    """ReLU'd top-k of h @ W_encᵀ + b_enc and, side by side, the top-k_aux dead latents:
    values and indices [N, k + k_aux] (AuxK slots past the dead count hold 0)."""
    return backend(h.device).encode_topk(h, W_enc, b_enc, k, dead_mask, k_aux)


@encode_topk.register_fake
def _(h, W_enc, b_enc, k, dead_mask, k_aux) -> tuple[Tensor, Tensor]:
    slots = k + (k_aux if dead_mask is not None else 0)
    dtype = torch.promote_types(h.dtype, W_enc.dtype)
    return (
        h.new_empty(h.shape[0], slots, dtype=dtype),
        h.new_empty(h.shape[0], slots, dtype=torch.int64),
    )


@torch.library.custom_op("saeformer::encode_topk_backward", mutates_args=())
def encode_topk_backward(
    grad_pre: Tensor,
    h: Tensor,
    W_enc: Tensor,
    indices: Tensor,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grads of h, W_enc and b_enc from the sparse grad of the selected pre-activations."""
    grads = backend(h.device).encode_topk_backward(
        grad_pre, h, W_enc, indices, need_h, need_w, need_b
    )
    return _filled(grads, h)


@encode_topk_backward.register_fake
def _(grad_pre, h, W_enc, indices, need_h, need_w, need_b) -> tuple[Tensor, Tensor, Tensor]:
    return (
        h.new_empty(h.shape if need_h else 0),
        W_enc.new_empty(W_enc.shape if need_w else 0),
        W_enc.new_empty(W_enc.shape[0] if need_b else 0),
    )


def _encode_setup(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    h, W_enc, b_enc = inputs[:3]
    values, indices = output
    ctx.save_for_backward(h, W_enc, indices, values)
    ctx.b_dtype = b_enc.dtype
    ctx.mark_non_differentiable(indices)


def _encode_backward(ctx: Any, grad_values: Tensor, _grad_indices: Tensor | None) -> tuple:
    h, W_enc, indices, values = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_pre = torch.where(values > 0, grad_values, 0)  # ReLU; 0 in unused AuxK slots
    grad_h, grad_w, grad_b = encode_topk_backward(
        grad_pre, h, W_enc, indices, need_h, need_w, need_b
    )
    grad_b = grad_b.to(ctx.b_dtype) if need_b else None
    return _grad_or_none(grad_h, need_h), _grad_or_none(grad_w, need_w), grad_b, None, None, None


encode_topk.register_autograd(_encode_backward, setup_context=_encode_setup)
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("saeformer::encode_topk", _device, torch.bfloat16)
