"""Torch kernels against an independent float64 dense reference; gradcheck; memory; dispatch.

Every test draws a fresh seed (set SAEFORMER_TEST_SEED to replay one); failures print it.
"""

from __future__ import annotations

import os
import random
import sys
import types
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import saeformer.kernels as kernels
from saeformer.errors import UserError
from saeformer.kernels import dispatch, torch_ops

F64 = torch.float64
FORWARD_TOL = {  # (rtol, atol relative to the output scale) per dtype, forward only
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
GRAD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}
MARGIN = 1e-3  # sampled inputs keep selections and ReLU signs this far from a flip


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Route the public API to the torch kernels and reset the cached Triton import."""
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    dispatch._triton_or_torch.cache_clear()
    yield
    dispatch._triton_or_torch.cache_clear()


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, or SAEFORMER_TEST_SEED when set."""
    return int(os.environ.get("SAEFORMER_TEST_SEED", random.randrange(2**31)))


# ---------------------------------------------------------------- float64 dense references


def ref_topk_dense(pre: Tensor, k: int) -> Tensor:
    """Dense [N, F]: the top-k entries of pre per row, zero elsewhere."""
    vals, idx = torch.topk(pre, k, dim=1)
    return torch.zeros_like(pre).scatter(1, idx, vals)


def ref_topk_relu(pre: Tensor, k: int) -> Tensor:
    """Dense code [N, F]: ReLU of the top-k entries of pre per row, zero elsewhere."""
    return torch.relu(ref_topk_dense(pre, k))


def ref_encode(h: Tensor, W: Tensor, b: Tensor, k: int, dead: Tensor | None, k_aux: int):
    """Dense pre, active code and AuxK code (or None), all float64."""
    pre = h.to(F64) @ W.to(F64).T + b.to(F64)
    z_aux = None
    if k_aux:
        z_aux = ref_topk_relu(pre.masked_fill(~dead, float("-inf")), k_aux)
    return pre, ref_topk_relu(pre, k), z_aux


def ref_decode(values: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """Dense decode z @ W_dec with z [N, F] built by scatter-add (repeated indices add up)."""
    z = torch.zeros(values.shape[0], W.shape[0], dtype=F64).scatter_add(1, idx, values.to(F64))
    return z @ W.to(F64)


def densify(values: Tensor, idx: Tensor, num_latents: int) -> Tensor:
    """Sparse (values, indices) rows as a dense float64 [N, F] code."""
    z = torch.zeros(values.shape[0], num_latents, dtype=F64)
    return z.scatter_add(1, idx, values.detach().to(F64))


# ---------------------------------------------------------------- inputs and checks


def noncontig(x: Tensor) -> Tensor:
    """The same values as x in a non-contiguous layout (a leaf when x is)."""
    return torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]


def row_margin(pre: Tensor, k: int) -> float:
    """Smallest distance of the top-k selection and its ReLU signs from flipping."""
    s = pre.sort(dim=-1, descending=True).values
    m = s[..., :k].abs().min().item()
    if k < pre.shape[-1]:
        m = min(m, (s[..., k - 1] - s[..., k]).min().item())
    return m


def encode_inputs(gen: torch.Generator, n: int, f: int, d: int, k: int, n_dead: int, k_aux: int):
    """h, W_enc, b_enc (float64) and dead_mask whose selections are MARGIN away from flipping."""
    for _ in range(1000):
        h, W, b = (torch.randn(*s, generator=gen, dtype=F64) for s in ((n, d), (f, d), (f,)))
        dead = torch.zeros(f, dtype=torch.bool)
        dead[torch.randperm(f, generator=gen)[:n_dead]] = True
        pre = h @ W.T + b
        ok = row_margin(pre, k) > MARGIN
        if k_aux and n_dead:
            ok = ok and row_margin(pre[:, dead], min(k_aux, n_dead)) > MARGIN
        if ok:
            return h, W, b, dead
    raise AssertionError("could not sample separated inputs")


def assert_close(actual: Tensor, expected: Tensor, tol: tuple[float, float], msg: str) -> None:
    """assert_close in float64 with atol scaled by the size of expected."""
    rtol, atol = tol
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().to(F64), expected.detach(), rtol=rtol, atol=atol * scale, msg=msg
    )


def assert_selection(values: Tensor, idx: Tensor, pre: Tensor, k: int, tol, msg: str) -> None:
    """Tie-tolerant top-k check against pre (float64): sorted values, and index sets where the
    k-th and (k+1)-th reference values differ by more than the tolerance."""
    ref_vals = torch.topk(pre, k, dim=-1).values
    assert_close(values.sort(dim=-1, descending=True).values, ref_vals, tol, msg)
    assert_close(values, pre.gather(-1, idx), tol, msg + " (values at their indices)")
    if k == pre.shape[-1]:
        gap = torch.full(pre.shape[:-1], float("inf"), dtype=F64)
    else:
        s = pre.sort(dim=-1, descending=True).values
        gap = s[..., k - 1] - s[..., k]
    clear = gap > 4 * tol[1] * max(1.0, pre.abs().max().item())
    ref_set = torch.topk(pre, k, dim=-1).indices.sort(dim=-1).values
    got_set = idx.sort(dim=-1).values
    assert torch.equal(got_set[clear], ref_set[clear]), msg + " (index sets)"


def grads(loss: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """Gradients of loss w.r.t. inputs (leaf or not)."""
    return list(torch.autograd.grad(loss, inputs))


# ---------------------------------------------------------------- topk


@pytest.mark.parametrize(
    ("shape", "k", "dtype"),
    [
        ((13, 37), 5, F64),
        ((13, 37), 1, torch.float32),
        ((6, 19), 19, F64),
        ((2, 5, 100), 7, torch.float32),
        ((9, 300), 16, torch.float16),
        ((9, 300), 16, torch.bfloat16),
    ],
)
def test_topk_matches_reference(seed: int, shape: tuple[int, ...], k: int, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(*shape, generator=gen, dtype=F64).to(dtype)
    values, idx = kernels.topk(noncontig(pre), k)
    msg = f"seed={seed}"
    assert values.shape == idx.shape == (*shape[:-1], k) and idx.dtype == torch.int64, msg
    assert_selection(values, idx, pre.to(F64), k, FORWARD_TOL[dtype], msg)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_topk_grad_scatters_to_selected(seed: int, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randperm(41 * 7, generator=gen).reshape(7, 41).to(dtype).requires_grad_()
    upstream = torch.randn(7, 41, generator=gen, dtype=F64)
    values, idx = kernels.topk(pre, 6)
    (g,) = grads((values * upstream.gather(1, idx).to(dtype)).sum(), [pre])
    pre_ref = pre.detach().to(F64).requires_grad_()
    (g_ref,) = grads((ref_topk_dense(pre_ref, 6) * upstream).sum(), [pre_ref])
    assert_close(g, g_ref, GRAD_TOL[dtype], f"seed={seed}")


def test_topk_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randint(0, 5, (20, 23), generator=gen).to(torch.float32)
    values, idx = kernels.topk(pre, 4)
    assert_selection(values, idx, pre.to(F64), 4, FORWARD_TOL[torch.float32], f"seed={seed}")


# ---------------------------------------------------------------- sparse_decode


@pytest.mark.parametrize(
    ("n", "f", "d", "k", "dtype", "contiguous"),
    [
        (32, 37, 12, 5, F64, True),
        (32, 37, 12, 1, torch.float32, False),
        (16, 23, 8, 23, F64, False),
        (40, 100, 16, 7, torch.float32, True),
    ],
)
def test_sparse_decode_matches_reference(seed, n, f, d, k, dtype, contiguous) -> None:
    check_decode(seed, n, f, d, k, dtype, contiguous=contiguous)


def check_decode(seed: int, n, f, d, k, dtype, *, contiguous=True) -> None:
    """sparse_decode output and grads (values, W_dec) against the dense float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=gen, dtype=F64).to(dtype)
    # with replacement: indices repeat across rows and within rows
    idx = torch.randint(0, f, (n, k), generator=gen)
    if k == f:
        idx = torch.stack([torch.randperm(f, generator=gen) for _ in range(n)])
    W = torch.randn(f, d, generator=gen, dtype=F64).to(dtype)
    if not contiguous:
        values, idx, W = noncontig(values), noncontig(idx), W.T.contiguous().T
    values.requires_grad_()
    W.requires_grad_()
    upstream = torch.randn(n, d, generator=gen, dtype=F64)
    out = kernels.sparse_decode(values, idx, W)
    g_values, g_W = grads((out * upstream.to(dtype)).sum(), [values, W])

    values_ref = values.detach().to(F64).requires_grad_()
    W_ref = W.detach().to(F64).requires_grad_()
    out_ref = ref_decode(values_ref, idx, W_ref)
    g_values_ref, g_W_ref = grads((out_ref * upstream).sum(), [values_ref, W_ref])
    msg = f"seed={seed}"
    assert out.dtype == dtype, msg
    assert_close(out, out_ref, FORWARD_TOL[dtype], msg + " out")
    assert_close(g_values, g_values_ref, GRAD_TOL[dtype], msg + " grad values")
    assert_close(g_W, g_W_ref, GRAD_TOL[dtype], msg + " grad W_dec")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_decode_low_precision_forward(seed: int, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(24, 6, generator=gen).to(dtype)
    idx = torch.randint(0, 50, (24, 6), generator=gen)
    W = torch.randn(50, 16, generator=gen).to(dtype)
    out = kernels.sparse_decode(values, idx, W)
    assert out.dtype == dtype
    assert_close(out, ref_decode(values, idx, W), FORWARD_TOL[dtype], f"seed={seed}")


def test_sparse_decode_leading_dims(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 3, 4, generator=gen)
    idx = torch.randint(0, 9, (2, 3, 4), generator=gen)
    W = torch.randn(9, 5, generator=gen)
    out = kernels.sparse_decode(values, idx, W)
    assert out.shape == (2, 3, 5)
    flat = ref_decode(values.reshape(6, 4), idx.reshape(6, 4), W).reshape(2, 3, 5)
    assert_close(out, flat, FORWARD_TOL[torch.float32], f"seed={seed}")


# ---------------------------------------------------------------- encode_topk


def check_encode(seed: int, n, f, d, k, dtype, *, n_dead=0, k_aux=0, contiguous=True) -> None:
    """encode_topk outputs and grads (h, W_enc, b_enc) against the dense float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    h, W, b, dead = encode_inputs(gen, n, f, d, k, n_dead, k_aux)
    h, W, b = h.to(dtype), W.to(dtype), b.to(dtype)
    if not contiguous:
        h, W, b = h.T.contiguous().T, W.T.contiguous().T, noncontig(b)
    for t in (h, W, b):
        t.requires_grad_()
    up, up_aux = torch.randn(2, n, f, generator=gen, dtype=F64)
    res = kernels.encode_topk(h, W, b, k, dead if k_aux else None, k_aux)
    loss = (res.values * up.gather(1, res.indices).to(dtype)).sum()
    if k_aux:
        loss = loss + (res.aux_values * up_aux.gather(1, res.aux_indices).to(dtype)).sum()
    got = grads(loss, [h, W, b])

    refs = [t.detach().to(F64).requires_grad_() for t in (h, W, b)]
    _, z, z_aux = ref_encode(*refs, k, dead, k_aux)
    loss_ref = (z * up).sum() + ((z_aux * up_aux).sum() if k_aux else 0)
    want = grads(loss_ref, refs)

    msg = f"seed={seed}"
    assert res.values.shape == res.indices.shape == (n, k), msg
    assert res.values.dtype == dtype and res.indices.dtype == torch.int64, msg
    assert (res.values >= 0).all(), msg
    assert_close(densify(res.values, res.indices, f), z, FORWARD_TOL[dtype], msg + " code")
    if k_aux:
        assert res.aux_values.shape == res.aux_indices.shape == (n, k_aux), msg
        z_got = densify(res.aux_values, res.aux_indices, f)
        assert_close(z_got, z_aux, FORWARD_TOL[dtype], msg + " aux code")
        n_sel = (dead[res.aux_indices]).sum(dim=1)
        assert (n_sel == min(k_aux, n_dead)).all(), msg + " aux picks the dead latents"
        assert (res.aux_values[~dead[res.aux_indices]] == 0).all(), msg + " extra aux slots"
    else:
        assert res.aux_values is None and res.aux_indices is None, msg
    for name, g, g_ref in zip(("h", "W_enc", "b_enc"), got, want, strict=True):
        assert g.dtype == dtype, msg
        assert_close(g, g_ref, GRAD_TOL[dtype], f"{msg} grad {name}")


@pytest.mark.parametrize(
    ("n", "f", "d", "k", "dtype", "contiguous"),
    [
        (32, 37, 12, 5, F64, True),
        (32, 37, 12, 1, torch.float32, False),
        (16, 23, 8, 23, F64, False),
        (40, 100, 16, 7, torch.float32, True),
    ],
)
def test_encode_topk_matches_reference(seed, n, f, d, k, dtype, contiguous) -> None:
    check_encode(seed, n, f, d, k, dtype, contiguous=contiguous)


@pytest.mark.parametrize(
    ("n_dead", "k_aux", "dtype", "contiguous"),
    [(20, 6, F64, True), (20, 6, torch.float32, False), (3, 8, F64, True), (0, 4, F64, False)],
)
def test_encode_topk_auxk(seed, n_dead, k_aux, dtype, contiguous) -> None:
    check_encode(seed, 24, 45, 10, 5, dtype, n_dead=n_dead, k_aux=k_aux, contiguous=contiguous)


def test_chunked_primitives(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_ops, "_CHUNK_ELEMS", 50)  # a few rows per chunk
    check_encode(seed, 33, 29, 6, 4, F64, n_dead=9, k_aux=3)
    check_decode(seed, 33, 29, 6, 4, F64, contiguous=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_encode_topk_forward_precision(seed: int, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, W, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((24, 16), (70, 16), (70,)))
    dead = torch.rand(70, generator=gen) < 0.3
    res = kernels.encode_topk(h, W, b, 8, dead, 4)
    pre = h.to(F64) @ W.to(F64).T + b.to(F64)
    tol, msg = FORWARD_TOL[dtype], f"seed={seed}"
    assert res.values.dtype == dtype, msg
    assert_selection(res.values, res.indices, pre.relu(), 8, tol, msg)
    pre_dead = pre.masked_fill(~dead, float("-inf")).relu()
    assert_selection(res.aux_values, res.aux_indices, pre_dead, 4, tol, msg + " aux")


def test_encode_topk_leading_dims(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, W, b = (torch.randn(*s, generator=gen) for s in ((2, 3, 8), (20, 8), (20,)))
    dead = torch.arange(20) % 3 == 0
    res = kernels.encode_topk(h, W, b, 4, dead, 2)
    values, indices = torch_ops.encode_topk(h.reshape(6, 8), W, b, 4, dead, 2)
    flat = (values[:, :4], indices[:, :4], values[:, 4:], indices[:, 4:])
    for got, want in zip(res, flat, strict=True):
        assert got.shape == (2, 3, want.shape[-1]) and torch.equal(got.reshape(want.shape), want)


def test_encode_topk_rejects_aux_without_mask() -> None:
    with pytest.raises(ValueError, match="dead_mask"):
        kernels.encode_topk(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(5), 2, None, 1)


# ---------------------------------------------------------------- gradcheck (float64)


def test_gradcheck_topk(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pre = (torch.randperm(21, generator=gen).reshape(3, 7).to(F64) / 7).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: kernels.topk(p, 3)[0], (pre,)), f"seed={seed}"


def test_gradcheck_sparse_decode(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    idx = torch.tensor([[0, 2, 2], [5, 0, 1], [2, 2, 2], [4, 3, 0]])
    W = torch.randn(6, 5, generator=gen, dtype=F64, requires_grad=True)
    fn = lambda v, w: kernels.sparse_decode(v, idx, w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values, W)), f"seed={seed}"


def test_gradcheck_encode_topk(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, W, b, dead = encode_inputs(gen, 4, 9, 5, 3, 3, 4)  # fewer dead than k_aux
    fn = lambda *t: tuple(kernels.encode_topk(*t, 3, dead, 4)[::2])  # noqa: E731
    inputs = tuple(t.requires_grad_() for t in (h, W, b))
    assert torch.autograd.gradcheck(fn, inputs), f"seed={seed}"


# ---------------------------------------------------------------- no N×F tensor in backward


class _Numels(TorchDispatchMode):
    """Records the numel of every tensor an aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, Tensor)]
        return out


def backward_numels(loss: Tensor) -> list[int]:
    """Numels of all tensors produced while back-propagating loss."""
    with _Numels() as mode:
        loss.backward()
    return mode.numels


def test_backward_never_builds_n_by_f(seed: int) -> None:
    n, f, d, k, k_aux = 64, 4096, 16, 8, 16  # N·F = 262144 ≫ F·d = 65536 ≫ N·(k+k_aux)·d
    gen = torch.Generator().manual_seed(seed)
    h, W_enc, W_dec = (torch.randn(*s, generator=gen) for s in ((n, d), (f, d), (f, d)))
    b = torch.randn(f, generator=gen)
    for t in (h, W_enc, W_dec, b):
        t.requires_grad_()
    dead = torch.rand(f, generator=gen) < 0.5
    res = kernels.encode_topk(h, W_enc, b, k, dead, k_aux)
    out = kernels.sparse_decode(res.values, res.indices, W_dec)
    aux = kernels.sparse_decode(res.aux_values, res.aux_indices, W_dec)
    numels = backward_numels((out**2).sum() + (aux**2).sum())
    assert numels and max(numels) < n * f, f"seed={seed}: backward built {max(numels)} elements"
    assert all(t.grad is not None for t in (h, W_enc, W_dec, b))

    # the recorder does see a dense backward: the reference allocates N×F
    _, z, _ = ref_encode(h.detach().requires_grad_(), W_enc, b, k, None, 0)
    assert max(backward_numels((z @ W_dec.to(F64)).square().sum())) >= n * f


# ---------------------------------------------------------------- dispatch


def _stub_triton(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Install a fake Triton kernel module whose topk records that it ran."""
    stub = types.ModuleType(dispatch.TRITON_MODULE)
    stub.calls = []
    stub.topk = lambda pre, k: stub.calls.append(k) or torch_ops.topk(pre, k)
    monkeypatch.setitem(sys.modules, dispatch.TRITON_MODULE, stub)
    return stub


def test_env_torch_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub_triton(monkeypatch)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.backend(torch.device("cuda")) is torch_ops
    assert dispatch.backend(torch.device("cpu")) is torch_ops


def test_auto_picks_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _stub_triton(monkeypatch)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.backend(torch.device("cuda", 0)) is stub
    assert dispatch.backend(torch.device("cpu")) is torch_ops
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.backend(torch.device("cuda")) is stub


def test_env_triton_forces_triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _stub_triton(monkeypatch)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    kernels.topk(torch.randn(3, 8), 2)
    assert stub.calls == [2]


def test_missing_triton_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, dispatch.TRITON_MODULE, None)  # import raises ImportError
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    pre = torch.randn(4, 9)
    with pytest.warns(UserWarning, match="Triton kernels unavailable"):
        values, _ = kernels.topk(pre, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = kernels.topk(pre, 3)
    assert torch.equal(values, torch.topk(pre, 3).values) and torch.equal(again, values)


def test_bad_env_value_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(UserError, match="SAEFORMER_KERNELS"):
        kernels.topk(torch.zeros(2, 3), 1)
