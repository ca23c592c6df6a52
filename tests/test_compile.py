"""The kernels as torch.library custom ops: registration checks, and compiled bottlenecks that
stay in one graph and match eager mode."""

from __future__ import annotations

import os
import random

import pytest
import torch

from saeformer.kernels import dispatch, ops
from saeformer.model import Transformer
from saeformer.model.bottleneck import AuxRequest, Bottleneck
from saeformer.model.config import BottleneckConfig, ModelConfig


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh random stream per test (SAEFORMER_TEST_SEED replays one)."""
    seed = int(os.environ.get("SAEFORMER_TEST_SEED", random.randrange(2**31)))
    return torch.Generator().manual_seed(seed)


def test_ops_pass_opcheck(gen: torch.Generator) -> None:
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every op."""
    n, f, d = 12, 40, 8
    h, W_enc, W_dec = (torch.randn(*s, generator=gen) for s in ((n, d), (f, d), (f, d)))
    b = torch.randn(f, generator=gen)
    dead = torch.rand(f, generator=gen) < 0.5
    values, indices = ops.encode_topk(h, W_enc, b, 5, dead, 3)
    grad = [t.clone().requires_grad_() for t in (h, W_enc, b)]
    samples = [
        (ops.topk, (torch.randn(n, f, generator=gen, requires_grad=True), 5)),
        (ops.sparse_decode, (values.requires_grad_(), indices, W_dec.requires_grad_())),
        (ops.encode_topk, (*grad, 5, dead, 3)),
        (ops.encode_topk, (*grad, 5, None, 0)),
        (ops.encode_topk, (h, W_enc, b, 5, None, 0)),  # no grad wanted at all
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def _compare(module: torch.nn.Module, run, *inputs: torch.Tensor) -> None:
    """`run(module, *inputs)` → loss: compiled in one graph, same loss and grads as eager."""
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (run, compiled):
        module.zero_grad()
        loss = fn(module, *inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (loss, grads), (c_loss, c_grads) = results
    torch.testing.assert_close(c_loss, loss)
    for got, want in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(got, want)


def test_bottleneck_compiles_to_one_graph(gen: torch.Generator) -> None:
    bn = Bottleneck(16, 96, 6, generator=gen)
    h = torch.randn(2, 10, 16, generator=gen, requires_grad=True)
    dead = torch.rand(96, generator=gen) < 0.3

    def run(module: Bottleneck, x: torch.Tensor) -> torch.Tensor:
        out, site = module(x, alpha=0.5, aux=AuxRequest(rec=True, dead_mask=dead, k_aux=4))
        return out.square().sum() + site.rec_loss + site.auxk_loss + site.counts.sum() * 0

    _compare(bn, run, h)


def test_block_with_mlp_bottleneck_compiles_to_one_graph(gen: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    cfg = ModelConfig(
        vocab_size=50, n_layers=1, d_model=16, n_heads=2, d_ff=64, context=8,
        bottleneck=[BottleneckConfig(site="mlp", layer=0, width=64, k=5)],
    )  # fmt: skip
    block = Transformer(cfg).blocks[0]
    x = torch.randn(2, 8, 16, generator=gen)

    def run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        y, site = module(x, k=None, keep_code=False)
        return y.square().sum() + site.l0 * 0

    _compare(block, run, x)


def test_encode_runs_in_bf16_under_autocast(gen: torch.Generator) -> None:
    h, W = torch.randn(6, 8, generator=gen), torch.randn(30, 8, generator=gen)
    b = torch.zeros(30, requires_grad=True)
    W.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = ops.encode_topk(h, W, b, 4, None, 0)
    assert values.dtype == torch.bfloat16 and indices.dtype == torch.int64
    values.float().sum().backward()
    assert W.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    want = torch.relu((h.bfloat16() @ W.detach().bfloat16().T).float()).topk(4).values
    torch.testing.assert_close(values.float().sort(1).values, want.sort(1).values)
