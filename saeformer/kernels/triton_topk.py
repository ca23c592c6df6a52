"""Row-wise top-k over F up to 131072 (k up to 256) in Triton, by tiled bitonic selection.

Each element becomes one int64 key: its value mapped to an order-preserving int32 in the
high word, and the complement of its column in the low word, so that a single `tl.topk` over
keys selects values and carries indices (ties go to the lower column). Pass 1 keeps the top
KP = next_pow2(k) keys of every BLOCK-wide tile of a row; merge passes repeat that over the
candidates until one tile remains, whose pass writes the k values (read back from `pre` in
its own dtype) and indices, sorted descending. Traffic is one read of `pre` plus candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from saeformer.kernels import triton_util as util

BLOCK = 4096
"""Default tile width of the first pass; merge tiles are at least 2·KP wide."""

_KEY_MIN = tl.constexpr(-(2**63))
"""Key of padding past the end of a row: below every real key."""


@triton.jit
def _key(x, cols):
    """Order-preserving int64 key of fp values `x` at columns `cols` (ties → lower column)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))


@triton.jit
def _topk_tile_kernel(
    src_ptr,
    pre_ptr,
    keep_ptr,
    cand_ptr,
    val_ptr,
    idx_ptr,
    n_cols,
    k,
    stride_src_row,
    stride_src_col,
    stride_pre_row,
    stride_pre_col,
    FROM_PRE: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
):
    """Top-KP keys of tile (program 1) of row (program 0): candidates, or outputs if FINAL."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    src = src_ptr + row * stride_src_row + cols.to(tl.int64) * stride_src_col
    if FROM_PRE:
        x = tl.load(src, mask=inside, other=0.0)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + cols, mask=inside, other=0) != 0
            x = tl.where(keep, x, float("-inf"))
        keys = _key(x, cols)
    else:
        keys = tl.load(src, mask=inside, other=0)
    best = tl.topk(tl.where(inside, keys, _KEY_MIN), KP)
    slots = tl.arange(0, KP)
    if FINAL:
        idx = 0xFFFFFFFF - (best & 0xFFFFFFFF)
        wanted = slots < k
        val = tl.load(pre_ptr + row * stride_pre_row + idx * stride_pre_col, mask=wanted)
        if HAS_KEEP:
            keep_sel = tl.load(keep_ptr + idx, mask=wanted, other=0) != 0
            val = tl.where(keep_sel, val, float("-inf"))
        tl.store(val_ptr + row * k + slots, val, mask=wanted)
        tl.store(idx_ptr + row * k + slots, idx, mask=wanted)
    else:
        tl.store(cand_ptr + row * (tl.num_programs(1) * KP) + tile * KP + slots, best)


def select(
    pre: Tensor, k: int, keep: Tensor | None = None, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """Top-k of each row of pre [N, F] among columns where `keep` [F] (bool) holds.

    Returns values [N, k] (pre's dtype, sorted descending; -inf where fewer than k columns
    are kept) and int64 indices [N, k]. `block` is the first-pass tile width (a power of 2).
    """
    n, f = pre.shape
    values = util.empty((n, k), pre.dtype, pre.device)
    indices = util.empty((n, k), torch.int64, pre.device)
    if n == 0:
        return values, indices
    kp = triton.next_power_of_2(k)
    width = max(min(block, triton.next_power_of_2(f)), kp)
    src, n_cols = pre, f
    while True:
        tiles = triton.cdiv(n_cols, width)
        final = tiles == 1
        cand = None if final else util.empty((n, tiles * kp), torch.int64, pre.device)
        _topk_tile_kernel[(n, tiles)](
            src,
            pre,
            keep,
            cand,
            values,
            indices,
            n_cols,
            k,
            src.stride(0),
            src.stride(1),
            pre.stride(0),
            pre.stride(1),
            FROM_PRE=src is pre,
            HAS_KEEP=keep is not None,
            FINAL=final,
            BLOCK=width,
            KP=kp,
            num_warps=8 if width >= 2048 else 4,
        )
        if final:
            return values, indices
        src, n_cols = cand, tiles * kp
        width = min(max(width, 2 * kp), triton.next_power_of_2(n_cols))
