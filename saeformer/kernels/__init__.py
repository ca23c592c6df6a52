"""Differentiable sparse kernels for TopK bottlenecks: custom ops (`ops`) whose backend is
picked by device (`dispatch`).

Inputs may carry leading batch dims: they are flattened to 2-D here, so ops see [N, ...] only.
Arguments are validated here; ops and backends assume valid input.
"""

from __future__ import annotations

from torch import Tensor

from saeformer.kernels import ops
from saeformer.kernels.torch_ops import EncodeResult

__all__ = ["EncodeResult", "encode_topk", "sparse_decode", "topk"]


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k over the last dim of pre [..., F]: raw values and int64 indices [..., k].

    Order within a row is backend-defined; the grad of pre is scattered to the selected slots.
    """
    _check_k(k, pre.shape[-1], "k")
    values, indices = ops.topk(pre.reshape(-1, pre.shape[-1]), k)
    lead = pre.shape[:-1]
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """out[..., :] = Σ_j values[..., j] · W_dec[indices[..., j]] for W_dec [F, d]: [..., d]."""
    k = values.shape[-1]
    out = ops.sparse_decode(values.reshape(-1, k), indices.reshape(-1, k), W_dec)
    return out.reshape(*values.shape[:-1], W_dec.shape[1])


def encode_topk(
    h: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> EncodeResult:
    """ReLU'd top-k of h @ W_encᵀ + b_enc (h [..., d], b_dec already subtracted), plus AuxK.

    With k_aux > 0, also the top-k_aux latents among `dead_mask` [F] (bool); slots beyond the
    number of dead latents hold value 0 with zero grad. Outputs are [..., k] / [..., k_aux].
    """
    if k_aux < 0 or (k_aux > 0 and dead_mask is None):
        raise ValueError(f"k_aux={k_aux} needs k_aux >= 0, and a dead_mask when positive")
    _check_k(k, W_enc.shape[0], "k")
    if k_aux:
        _check_k(k_aux, W_enc.shape[0], "k_aux")
    lead = h.shape[:-1]
    values, indices = ops.encode_topk(h.reshape(-1, h.shape[-1]), W_enc, b_enc, k, dead_mask, k_aux)
    slots = values.shape[-1]
    values, indices = values.reshape(*lead, slots), indices.reshape(*lead, slots)
    if k_aux == 0:
        return EncodeResult(values, indices, None, None)
    return EncodeResult(values[..., :k], indices[..., :k], values[..., k:], indices[..., k:])


def _check_k(k: int, width: int, name: str) -> None:
    if not 1 <= k <= width:
        raise ValueError(f"{name} = {k} must be between 1 and the width F = {width}")
