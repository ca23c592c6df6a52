"""Triton kernels on sparse codes (values, indices) [N, k] against a row table [F, d].

- `gather_combine`: out[n] = Σ_j c[n, j] · rows[idx[n, j]]: sparse decode, and grad h of the
  encoder. One program per (row block, d block); k is walked in blocks, fp32 accumulation.
- `gather_dot`: out[n, j] = ⟨x[n], rows[idx[n, j]]⟩: grad of the code values. One program per
  (row block, k block), walking d.
- `segment_sum`: out[f] = Σ_{idx[n, j] = f} c[n, j] · x[n] (grad W), optionally Σ c (grad b).
  Entries are sorted by latent on the host; each program takes a chunk of sorted entries and a
  d block, sums runs of equal latents with a segmented scan and writes each run once: a plain
  store when the run lies inside the chunk, an atomic add only for runs split across chunks.
No kernel materialises anything of size N×F.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from saeformer.kernels import triton_util as util


@triton.jit
def _gather_combine_kernel(
    c_ptr,
    idx_ptr,
    rows_ptr,
    out_ptr,
    n,
    k,
    d,
    stride_cn,
    stride_ck,
    stride_in,
    stride_ik,
    stride_rf,
    stride_rd,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[rows block, d block] = Σ_j c[:, j] · rows[idx[:, j], d block]; out is [n, d]."""
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_n = rn < n
    in_d = rd < d
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, k, BLOCK_K):
        rk = j0 + tl.arange(0, BLOCK_K)
        m_nk = in_n[:, None] & (rk < k)[None, :]
        c_ptrs = c_ptr + rn[:, None] * stride_cn + rk[None, :] * stride_ck
        c = tl.load(c_ptrs, mask=m_nk, other=0.0)
        idx_ptrs = idx_ptr + rn[:, None] * stride_in + rk[None, :] * stride_ik
        idx = tl.load(idx_ptrs, mask=m_nk, other=0)
        w_ptr = rows_ptr + idx[:, :, None] * stride_rf + rd[None, None, :] * stride_rd
        w = tl.load(w_ptr, mask=m_nk[:, :, None] & in_d[None, None, :], other=0.0)
        acc += tl.sum(c.to(tl.float32)[:, :, None] * w.to(tl.float32), axis=1)
    out = out_ptr + rn[:, None] * d + rd[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_n[:, None] & in_d[None, :])


@triton.jit
def _gather_dot_kernel(
    x_ptr,
    idx_ptr,
    rows_ptr,
    out_ptr,
    n,
    k,
    d,
    stride_xn,
    stride_xd,
    stride_in,
    stride_ik,
    stride_rf,
    stride_rd,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[rows block, k block] = ⟨x[n], rows[idx[n, j]]⟩; out is [n, k]."""
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_nk = (rn < n)[:, None] & (rk < k)[None, :]
    idx = tl.load(idx_ptr + rn[:, None] * stride_in + rk[None, :] * stride_ik, mask=m_nk, other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        in_d = rd < d
        x_ptrs = x_ptr + rn[:, None] * stride_xn + rd[None, :] * stride_xd
        x = tl.load(x_ptrs, mask=(rn < n)[:, None] & in_d[None, :], other=0.0)
        w_ptr = rows_ptr + idx[:, :, None] * stride_rf + rd[None, None, :] * stride_rd
        w = tl.load(w_ptr, mask=m_nk[:, :, None] & in_d[None, None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32), axis=2)
    out = out_ptr + rn[:, None] * k + rk[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_nk)


@triton.jit
def _segmented_add(flag_a, sum_a, flag_b, sum_b):
    """Combine of a segmented inclusive sum: restart at b when b opens a segment."""
    return flag_a | flag_b, tl.where(flag_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def _flush(ptr, run_sum, is_end, split):
    """Write run sums at run ends: plain store if the run is whole, atomic add if split."""
    tl.store(ptr, run_sum, mask=is_end & ~split)
    tl.atomic_add(ptr, run_sum, mask=is_end & split, sem="relaxed")


@triton.jit
def _segment_sum_kernel(
    latent_ptr,
    perm_ptr,
    c_ptr,
    x_ptr,
    out_ptr,
    bias_ptr,
    n_entries,
    k,
    d,
    stride_cn,
    stride_ck,
    stride_xn,
    stride_xd,
    HAS_BIAS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Segment sums of c·x (and of c) over one chunk of latent-sorted entries, one d block."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    pos = start + tl.arange(0, CHUNK)
    valid = pos < n_entries
    last = tl.minimum(start + CHUNK, n_entries) - 1
    latent = tl.load(latent_ptr + pos, mask=valid, other=-1)
    prev = tl.load(latent_ptr + pos - 1, mask=valid & (pos > 0), other=-1)
    nxt = tl.load(latent_ptr + pos + 1, mask=pos + 1 < n_entries, other=-1)
    opens = (latent != prev) | (pos == start)
    is_end = valid & ((latent != nxt) | (pos == last))
    before = tl.load(latent_ptr + start - 1, mask=start > 0, other=-1)
    split = (latent == before) | (latent == nxt)  # at run ends: the run crosses the chunk

    entry = tl.load(perm_ptr + pos, mask=valid, other=0)
    tok = entry // k
    c_ptrs = c_ptr + tok * stride_cn + (entry - tok * k) * stride_ck
    c = tl.load(c_ptrs, mask=valid, other=0.0).to(tl.float32)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = rd < d
    x_ptrs = x_ptr + tok[:, None] * stride_xn + rd[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=valid[:, None] & in_d[None, :], other=0.0).to(tl.float32)
    flags = tl.broadcast_to(opens.to(tl.int32)[:, None], (CHUNK, BLOCK_D))
    run = tl.associative_scan((flags, c[:, None] * x), 0, _segmented_add)[1]
    out_ptrs = out_ptr + latent[:, None] * d + rd[None, :]
    _flush(out_ptrs, run, is_end[:, None] & in_d[None, :], split[:, None])
    if HAS_BIAS and tl.program_id(1) == 0:
        run_c = tl.associative_scan((opens.to(tl.int32), c), 0, _segmented_add)[1]
        _flush(bias_ptr + latent, run_c, is_end, split)


def _blocks(size: int, cap: int) -> int:
    """A power-of-2 block width covering `size`, at most `cap`."""
    return min(triton.next_power_of_2(max(size, 1)), cap)


def _segment_width(rows: Tensor) -> int:
    """Columns per gathered row segment: 128 bytes (one cache line), or all of d if fewer."""
    return _blocks(rows.shape[1], 128 // rows.element_size())


def gather_combine(c: Tensor, idx: Tensor, rows: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[n] = Σ_j c[n, j] · rows[idx[n, j]] for c, idx [N, k] and rows [F, d]: [N, d]."""
    n, k = idx.shape
    d = rows.shape[1]
    out = util.empty((n, d), out_dtype, rows.device)
    block_n, block_k, block_d = 16, _blocks(k, 8), _segment_width(rows)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    if n:
        _gather_combine_kernel[grid](
            c,
            idx,
            rows,
            out,
            n,
            k,
            d,
            *c.stride(),
            *idx.stride(),
            *rows.stride(),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
    return out


def gather_dot(x: Tensor, idx: Tensor, rows: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[n, j] = ⟨x[n], rows[idx[n, j]]⟩ for x [N, d], idx [N, k], rows [F, d]: [N, k]."""
    n, k = idx.shape
    d = rows.shape[1]
    out = util.empty((n, k), out_dtype, x.device)
    block_d = _segment_width(rows)
    block_n, block_k = max(512 // block_d, 1), _blocks(k, 8)  # 4096-element gather tiles
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    if n:
        _gather_dot_kernel[grid](
            x,
            idx,
            rows,
            out,
            n,
            k,
            d,
            *x.stride(),
            *idx.stride(),
            *rows.stride(),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )
    return out


def segment_sum(
    c: Tensor, idx: Tensor, x: Tensor, num_rows: int, with_bias: bool, chunk: int = 32
) -> tuple[Tensor, Tensor | None]:
    """fp32 out[f] = Σ_{idx[n, j] = f} c[n, j] · x[n] ([F, d]) and, if asked, Σ c ([F]).

    `chunk` (a power of 2) is the number of sorted entries per program.
    """
    n, k = idx.shape
    d = x.shape[1]
    out = torch.zeros((num_rows, d), dtype=torch.float32, device=x.device)
    bias = torch.zeros(num_rows, dtype=torch.float32, device=x.device) if with_bias else None
    latent, perm = torch.sort(idx.reshape(-1))
    block_d = _blocks(d, 32)  # [32, 32] tiles: larger ones spill registers on sm_90
    grid = (triton.cdiv(n * k, chunk), triton.cdiv(d, block_d))
    if n:
        _segment_sum_kernel[grid](
            latent,
            perm,
            c,
            x,
            out,
            bias,
            n * k,
            k,
            d,
            *c.stride(),
            *x.stride(),
            HAS_BIAS=with_bias,
            CHUNK=chunk,
            BLOCK_D=block_d,
        )
    return out, bias
