"""Triton kernels, run by the CPU interpreter, against an independent float64 dense reference.

Run in a process of their own: TRITON_INTERPRET=1 SAEFORMER_KERNELS=triton python -m pytest
tests/triton. Every kernel output buffer is poisoned before launch (see conftest), every test
draws a fresh seed (SAEFORMER_TEST_SEED replays one) and failures print it. Tolerances are
(rtol, atol × the reference's largest magnitude) per dtype; selections are compared exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as nnf
from torch import Tensor

F64 = torch.float64
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}
MARGIN = {torch.float32: 1e-3, torch.float16: 5e-2}  # encode inputs keep selections this clear
DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16 arithmetic
ROOT = Path(__file__).resolve().parents[2]


def name(value: object) -> str | None:
    """Test ids: dtypes by their short name, everything else as pytest would."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def say(seed: int, what: str) -> str:
    """Failure message naming the check and how to replay it."""
    return f"{what} (seed {seed}; replay with SAEFORMER_TEST_SEED={seed})"


def assert_close(actual: Tensor, expected: Tensor, tol: tuple[float, float], msg: str) -> None:
    """Compare in float64 with atol scaled by the largest finite reference magnitude."""
    finite = expected[expected.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().to(F64), expected.detach(), rtol=tol[0], atol=tol[1] * scale, msg=msg
    )


def noncontig(x: Tensor) -> Tensor:
    """The same values as x with a last-dim stride of 2."""
    return torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]


def assert_topk(values: Tensor, idx: Tensor, pre: Tensor, k: int, tol, msg: str) -> None:
    """values/idx [..., k] against torch.topk of float64 pre [..., F], tie-tolerant.

    Sorted values match; values equal pre at their indices, which are distinct; index sets
    match in rows where the k-th and (k+1)-th reference values differ.
    """
    ref = torch.topk(pre, k, dim=-1)
    assert idx.dtype == torch.int64, msg
    assert_close(values.sort(dim=-1, descending=True).values, ref.values, tol, msg + ": values")
    assert_close(values, pre.gather(-1, idx), tol, msg + ": values at their indices")
    assert bool((idx.sort(dim=-1).values.diff(dim=-1) > 0).all()), msg + ": repeated index"
    if k == pre.shape[-1]:
        return
    top = torch.topk(pre, k + 1, dim=-1).values
    clear = top[..., k - 1] > top[..., k]
    got, want = idx.sort(dim=-1).values, ref.indices.sort(dim=-1).values
    assert torch.equal(got[clear], want[clear]), msg + ": selected indices"


# ---------------------------------------------------------------- topk


TOPK_CASES = [((5, 37), 1), ((5, 37), 6), ((3, 13), 13), ((2, 3, 20), 4), ((4, 100), 17)]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=name)
@pytest.mark.parametrize(("shape", "k"), TOPK_CASES)
def test_topk_forward_backward(ops, seed, shape, k, dtype, layout) -> None:
    """Values, indices and grad of pre against torch.topk and a one-hot float64 backward."""
    import saeformer.kernels as kernels

    base = torch.randn(shape).to(dtype)
    pre = (noncontig(base) if layout == "strided" else base).requires_grad_()
    values, idx = kernels.topk(pre, k)
    msg = say(seed, f"topk {shape} k={k} {dtype} {layout}")
    assert values.dtype == dtype and values.shape == (*shape[:-1], k), msg
    assert_topk(values, idx, base.to(F64), k, (0.0, 0.0), msg)

    grad_values = torch.randn(values.shape).to(dtype)
    values.backward(grad_values)
    one_hot = nnf.one_hot(idx, shape[-1]).to(F64)  # [..., k, F]
    want = torch.einsum("...j,...jf->...f", grad_values.to(F64), one_hot)
    assert pre.grad.dtype == dtype, msg
    assert_close(pre.grad, want, (0.0, 0.0), msg + ": grad pre")


@pytest.mark.parametrize(("f", "k", "block"), [(37, 3, 4), (50, 5, 8), (70, 16, 16), (9, 9, 4)])
def test_topk_merge_passes(ops, seed, f, k, block) -> None:
    """Forcing small tiles runs several merge passes; the result is still exact."""
    from saeformer.kernels.triton_topk import select

    pre = torch.randn(4, f)
    values, idx = select(pre, k, block=block)
    assert_topk(values, idx, pre.to(F64), k, (0.0, 0.0), say(seed, f"select f={f} k={k}"))


def test_topk_ties(ops, seed) -> None:
    """Heavily tied rows (and one constant row): values exact, indices where unambiguous."""
    import saeformer.kernels as kernels

    pre = torch.randint(0, 3, (6, 40)).float()
    pre[0] = 1.0
    for k in (1, 5, 40):
        values, idx = kernels.topk(pre, k)
        assert_topk(values, idx, pre.to(F64), k, (0.0, 0.0), say(seed, f"ties k={k}"))


def test_topk_keep_mask(ops, seed) -> None:
    """With a column mask, only kept columns are selected; missing slots are -inf."""
    from saeformer.kernels.triton_topk import select

    pre = torch.randn(5, 29)
    keep = torch.zeros(29, dtype=torch.bool)
    keep[torch.randperm(29)[:2]] = True
    values, idx = select(pre, 4, keep=keep, block=8)
    msg = say(seed, "keep mask")
    masked = pre.to(F64).masked_fill(~keep, float("-inf"))
    assert_close(values, torch.topk(masked, 4, dim=-1).values, (0.0, 0.0), msg)
    assert_close(values, masked.gather(1, idx), (0.0, 0.0), msg + ": values at indices")
    assert bool((idx.sort(dim=-1).values.diff(dim=-1) > 0).all()), msg + ": repeated index"
    assert bool(keep[idx[:, :2]].all()) and not bool(keep[idx[:, 2:]].any()), msg


# ---------------------------------------------------------------- sparse_decode


def decode_inputs(n: int, k: int, f: int, d: int, dtype: torch.dtype, strided: bool):
    """values [n, k], indices with repeats (within rows, and one constant row), W_dec [f, d]."""
    idx = torch.randint(0, f, (n, k))
    idx[:, 1] = idx[:, 0]
    idx[0] = f - 1
    values, W = torch.randn(n, k).to(dtype), torch.randn(f, d).to(dtype)
    if strided:
        values, W = noncontig(values), W.T.contiguous().T
        idx = idx.T.contiguous().T
    return values.requires_grad_(), idx, W.requires_grad_()


DECODE_CASES = [  # (n, k, f, d, dtype, layout, upstream): small, then several blocks per dim
    *[
        (7, 5, 11, 19, dtype, layout, upstream)
        for dtype in DTYPES
        for layout in ("contiguous", "strided")
        for upstream in ("random", "sum")
    ],
    (20, 17, 6, 70, torch.float32, "contiguous", "random"),
    (20, 17, 6, 70, torch.float32, "strided", "random"),
]


@pytest.mark.parametrize(
    ("n", "k", "f", "d", "dtype", "layout", "upstream"), DECODE_CASES, ids=name
)
def test_sparse_decode(ops, seed, n, k, f, d, dtype, layout, upstream) -> None:
    """out, grad values and grad W_dec against dense z @ W_dec in float64 (autograd)."""
    import saeformer.kernels as kernels

    values, idx, W = decode_inputs(n, k, f, d, dtype, layout == "strided")
    out = kernels.sparse_decode(values, idx, W)
    v64, W64 = (t.detach().to(F64).requires_grad_() for t in (values, W))
    ref = torch.zeros(n, f, dtype=F64).scatter_add(1, idx, v64) @ W64
    msg = say(seed, f"sparse_decode n={n} k={k} f={f} d={d} {dtype} {layout} {upstream}")
    assert out.dtype == dtype, msg
    assert_close(out, ref, TOL[dtype], msg + ": out")

    if upstream == "sum":  # an expanded, stride-0 grad_out
        out.sum().backward()
        ref.sum().backward()
    else:
        grad_out = torch.randn(n, d).to(dtype)
        out.backward(grad_out)
        ref.backward(grad_out.to(F64))
    assert values.grad.dtype == dtype and W.grad.dtype == dtype, msg
    assert_close(values.grad, v64.grad, TOL[dtype], msg + ": grad values")
    assert_close(W.grad, W64.grad, TOL[dtype], msg + ": grad W_dec")


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_segment_sum_split_runs(ops, seed, chunk) -> None:
    """Long runs of one latent cross chunk boundaries (atomics); untouched rows stay zero."""
    from saeformer.kernels.triton_sparse import segment_sum

    n, k, f, d = 13, 6, 5, 40
    idx = torch.randint(0, 3, (n, k))  # latents 3, 4 never used
    c, x = torch.randn(n, k), noncontig(torch.randn(n, d))
    out, bias = segment_sum(c, idx, x, f, with_bias=True, chunk=chunk)
    z = torch.zeros(n, f, dtype=F64).scatter_add(1, idx, c.to(F64))
    msg = say(seed, f"segment_sum chunk={chunk}")
    assert_close(out, z.T @ x.to(F64), TOL[torch.float32], msg + ": rows")
    assert_close(bias, z.sum(0), TOL[torch.float32], msg + ": bias")


# ---------------------------------------------------------------- encode_topk


def relu_margin(pre: Tensor, k: int) -> float:
    """Distance of pre's top-k selection and the ReLU signs of the selected from flipping."""
    top = torch.topk(pre, min(k + 1, pre.shape[-1]), dim=-1).values
    margin = top[..., :k].abs().min().item()
    if k == top.shape[-1]:
        return margin
    return min(margin, (top[..., k - 1] - top[..., k]).min().item())


def encode_inputs(n: int, f: int, d: int, k: int, n_dead: int, k_aux: int, dtype):
    """h, W_enc, b_enc in dtype and dead_mask, resampled until selections are clear."""
    for _ in range(200):
        h, W, b = torch.randn(n, d).to(dtype), torch.randn(f, d).to(dtype), torch.randn(f).to(dtype)
        dead = torch.zeros(f, dtype=torch.bool)
        dead[torch.randperm(f)[:n_dead]] = True
        pre = h.to(F64) @ W.to(F64).T + b.to(F64)
        margins = [relu_margin(pre, k)]
        if k_aux and n_dead:
            margins.append(relu_margin(pre[:, dead], min(k_aux, n_dead)))
        if min(margins) > MARGIN[dtype]:
            return h, W, b, dead
    raise AssertionError("could not sample inputs with clear selections")


ENCODE_CASES = [(4, 0, 0), (4, 3, 8), (5, 6, 2), (1, 1, 1)]  # (k, k_aux, number of dead)


@pytest.mark.parametrize("h_grad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=name)
@pytest.mark.parametrize(("k", "k_aux", "n_dead"), ENCODE_CASES)
def test_encode_topk(ops, seed, k, k_aux, n_dead, dtype, h_grad) -> None:
    """Values, indices, AuxK slots and grads of h, W_enc, b_enc against float64 dense."""
    import saeformer.kernels as kernels

    n, f, d = 6, 24, 16
    h, W, b, dead = encode_inputs(n, f, d, k, n_dead, k_aux, dtype)
    h, W, b = h.requires_grad_(h_grad), W.requires_grad_(), b.requires_grad_()
    res = kernels.encode_topk(h, W, b, k, dead if k_aux else None, k_aux)
    msg = say(seed, f"encode k={k} k_aux={k_aux} dead={n_dead} {dtype} h_grad={h_grad}")

    h64, W64, b64 = (t.detach().to(F64).requires_grad_() for t in (h, W, b))
    pre = h64 @ W64.T + b64
    assert res.values.dtype == dtype, msg
    assert_topk(res.values, res.indices, pre.relu(), k, TOL[dtype], msg + ": active")
    ref = torch.zeros_like(pre).scatter(1, pre.topk(k).indices, pre.topk(k).values.relu())
    grad = torch.randn(n, k).to(dtype)
    loss = (res.values * grad).sum()
    ref_loss = (ref * torch.zeros(n, f, dtype=F64).scatter(1, res.indices, grad.to(F64))).sum()
    if k_aux:
        loss, ref_loss = check_aux(res, pre, dead, k_aux, loss, ref_loss, dtype, msg)
    else:
        assert res.aux_values is None and res.aux_indices is None, msg
    loss.backward()
    ref_loss.backward()
    if h_grad:
        assert_close(h.grad, h64.grad, TOL[dtype], msg + ": grad h")
    assert_close(W.grad, W64.grad, TOL[dtype], msg + ": grad W_enc")
    assert_close(b.grad, b64.grad, TOL[dtype], msg + ": grad b_enc")


def check_aux(res, pre: Tensor, dead: Tensor, k_aux: int, loss, ref_loss, dtype, msg: str):
    """Check the AuxK slots (values beyond the dead count are 0); add their terms to losses."""
    masked = pre.masked_fill(~dead, float("-inf"))
    n_sel = min(k_aux, int(dead.sum()))
    top = masked.topk(k_aux)
    assert_close(res.aux_values, top.values.relu(), TOL[dtype], msg + ": aux values")
    got = res.aux_indices[:, :n_sel].sort(dim=-1).values
    assert torch.equal(got, top.indices[:, :n_sel].sort(dim=-1).values), msg + ": aux indices"
    assert bool(res.aux_values[:, n_sel:].eq(0).all()), msg + ": aux slots past the dead"
    grad = torch.randn(res.aux_values.shape).to(dtype)
    ref = torch.zeros_like(pre).scatter(1, top.indices[:, :n_sel], top.values[:, :n_sel].relu())
    up = torch.zeros_like(pre).scatter(1, res.aux_indices[:, :n_sel], grad[:, :n_sel].to(F64))
    return loss + (res.aux_values * grad).sum(), ref_loss + (ref * up).sum()


def test_encode_strided_leading_dims(ops, seed) -> None:
    """Strided h [2, 3, d] and a transposed W_enc give the same result as contiguous ones."""
    import saeformer.kernels as kernels

    h, W, b, _ = encode_inputs(6, 24, 16, 4, 0, 0, torch.float32)
    res = kernels.encode_topk(noncontig(h).reshape(2, 3, 16), W.T.contiguous().T, b, 4)
    flat = kernels.encode_topk(h, W, b, 4)
    msg = say(seed, "encode strided")
    assert res.values.shape == (2, 3, 4), msg
    assert_close(res.values.reshape(6, 4), flat.values.to(F64), TOL[torch.float32], msg)
    assert torch.equal(res.indices.reshape(6, 4), flat.indices), msg


def test_empty_batch(ops) -> None:
    """Zero rows: every op returns empty outputs and zero parameter grads."""
    import saeformer.kernels as kernels

    pre = torch.randn(0, 9, requires_grad=True)
    values, _ = kernels.topk(pre, 3)
    values.sum().backward()
    assert values.shape == (0, 3) and pre.grad.shape == (0, 9)
    W = torch.randn(9, 4, requires_grad=True)
    out = kernels.sparse_decode(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), W)
    out.sum().backward()
    assert out.shape == (0, 4) and bool(W.grad.eq(0).all())
    b = torch.randn(9, requires_grad=True)
    res = kernels.encode_topk(torch.zeros(0, 4), W, b, 3)
    res.values.sum().backward()
    assert res.values.shape == (0, 3) and bool(b.grad.eq(0).all())


# ---------------------------------------------------------------- dispatch


def test_dispatch_routes_cpu_to_triton_under_interpreter(ops) -> None:
    """SAEFORMER_KERNELS=triton with the interpreter runs these kernels on CPU tensors."""
    from saeformer.kernels.dispatch import backend

    assert backend(torch.device("cpu")) is ops


def test_cpu_without_interpreter_falls_back_to_torch() -> None:
    """Forcing triton on a CPU-only machine without the interpreter warns and uses torch."""
    pytest.importorskip("triton")
    code = (
        "import warnings, torch\n"
        "import saeformer.kernels as kernels\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    values, idx = kernels.topk(torch.tensor([[1.0, 3.0, 2.0]]), 2)\n"
        "assert idx.tolist() == [[1, 2]], idx\n"
        "assert any('Triton kernels unavailable' in str(w.message) for w in caught), caught\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SAEFORMER_KERNELS="triton", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """Every kernel lowers to sm_90 machine code (no GPU needed), which the interpreter skips."""
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in backends.backends:
        pytest.skip("this triton build has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    script = Path(__file__).with_name("compile_sm90.py")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_module_exports_the_api(ops: ModuleType) -> None:
    """The kernel modules export the API that dispatch expects."""
    assert {"topk", "sparse_decode", "encode_topk"} <= set(ops.__all__)
