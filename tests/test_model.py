"""The Transformer and its bottlenecks against independent float64 references."""

import pytest
import torch
import torch.nn.functional as F

from saeformer.model import (
    AuxRequest,
    Bottleneck,
    BottleneckConfig,
    ModelConfig,
    TopKMLP,
    Transformer,
)


def tiny_config(**overrides) -> ModelConfig:
    cfg = dict(
        vocab_size=97,
        n_layers=3,
        d_model=32,
        n_heads=2,
        d_ff=64,
        context=16,
        bottleneck=[BottleneckConfig("resid", 0, 96, 5), BottleneckConfig("mlp", 1, 64, 7)],
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def reference_bottleneck(h, b: Bottleneck, k: int) -> torch.Tensor:
    """ĥ from the dense formula in float64: W_decᵀ TopK(ReLU(W_enc(h − b_dec) + b_enc)) + b_dec."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (b.W_enc, b.b_enc, b.W_dec, b.b_dec))
    pre = (h.double() - b_dec) @ W_enc.T + b_enc
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return z @ W_dec + b_dec


def test_bottleneck_matches_dense_formula_and_alpha_blend():
    torch.manual_seed(torch.seed() % 2**31)
    b = Bottleneck(d_model=24, width=150, k=9)
    with torch.no_grad():
        b.b_enc.normal_(std=0.1)
        b.b_dec.normal_(std=0.1)
    h = torch.randn(4, 6, 24)
    expected = reference_bottleneck(h.reshape(-1, 24), b, 9).reshape(h.shape)
    out, site = b(h, alpha=1.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    blended, _ = b(h, alpha=0.3)
    torch.testing.assert_close(
        blended.double(), 0.3 * expected + 0.7 * h.double(), rtol=1e-4, atol=1e-4
    )
    identity, _ = b(h, alpha=0.0)
    torch.testing.assert_close(identity, h, rtol=0, atol=0)
    resid = (h.double() - expected).reshape(-1, 24)
    centred = h.double().reshape(-1, 24) - h.double().reshape(-1, 24).mean(0)
    assert site.fvu.item() == pytest.approx(
        (resid.pow(2).sum() / centred.pow(2).sum()).item(), rel=1e-4
    )


def test_topk_mlp_matches_dense_formula():
    mlp = TopKMLP(d_model=16, width=40, k=6, n_layers=2)
    x = torch.randn(3, 5, 16)
    hidden = F.gelu(x.double() @ mlp.up.weight.double().T + mlp.up.bias.double())
    top = hidden.topk(6, dim=-1)
    z = torch.zeros_like(hidden).scatter(-1, top.indices, top.values)
    expected = z @ mlp.W_dec.double() + mlp.b_dec.double()
    out, site = mlp(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    assert site.fvu is None and site.counts.sum().item() == pytest.approx(15 * site.l0.item())


def test_shapes_and_at_most_k_nonzeros_per_token():
    cfg = tiny_config()
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.context))
    out = model(tokens, tokens, k={"resid.0": 3}, keep_codes=True)
    assert out.logits.shape == (3, cfg.context, cfg.vocab_size)
    assert out.loss.ndim == 0
    for bid, k in (("resid.0", 3), ("mlp.1", 7)):
        site = out.sites[bid]
        assert site.values.shape == (3 * cfg.context, k)
        assert ((site.values != 0).sum(-1) <= k).all()
        assert site.indices.max() < model.bottleneck(bid).width


def test_every_parameter_gets_a_gradient_at_alpha_one():
    cfg = tiny_config()
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.context))
    dead = torch.ones(96, dtype=torch.bool)
    out = model(
        tokens,
        tokens,
        alpha={"resid.0": 1.0},
        aux={"resid.0": AuxRequest(rec=True, dead_mask=dead, k_aux=8)},
    )
    loss = out.loss + out.sites["resid.0"].rec_loss + out.sites["resid.0"].auxk_loss
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def test_alpha_zero_makes_the_model_its_dense_twin():
    cfg = tiny_config(bottleneck=[BottleneckConfig("resid", 1, 64, 4)])
    model = Transformer(cfg)
    dense = Transformer(tiny_config(bottleneck=[]))
    dense.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("resid")}
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.context))
    torch.testing.assert_close(model(tokens, alpha={"resid.1": 0.0}).logits, dense(tokens).logits)


def test_reconstruction_loss_never_moves_the_host_model():
    cfg = tiny_config(bottleneck=[BottleneckConfig("resid", 1, 64, 4)])
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.context))
    out = model(
        tokens,
        aux={"resid.1": AuxRequest(rec=True, dead_mask=torch.ones(64, dtype=torch.bool), k_aux=4)},
    )
    (out.sites["resid.1"].rec_loss + out.sites["resid.1"].auxk_loss).backward()
    for name, p in model.named_parameters():
        moved = p.grad is not None and p.grad.abs().sum() > 0
        assert moved == name.startswith("resid."), name


def test_causality():
    cfg = tiny_config()
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.context))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(tokens).logits[:, :-1], model(changed).logits[:, :-1])


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_untied_and_swiglu_variants_run(mlp):
    cfg = tiny_config(
        mlp=mlp, tie_embeddings=False, bottleneck=[BottleneckConfig("resid", 2, 64, 4)]
    )
    model = Transformer(cfg)
    assert model.lm_head.weight is not model.embed.weight
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.context))
    assert torch.isfinite(model(tokens, tokens).loss)
