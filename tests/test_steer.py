"""Steering: a clamped feature changes the bottleneck output by exactly (v − z_f)·W_dec[f]."""

import pytest
import torch

from saeformer.analysis.generate import Clamp, clamped
from saeformer.errors import UserError
from saeformer.model import BottleneckConfig, ModelConfig, Transformer


@pytest.fixture
def model() -> Transformer:
    cfg = ModelConfig(
        vocab_size=50,
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_ff=32,
        context=8,
        bottleneck=[BottleneckConfig("resid", 0, 24, 3), BottleneckConfig("mlp", 1, 32, 4)],
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize("bid", ["resid.0", "mlp.1"])
def test_clamp_adds_the_missing_activation_along_the_decoder_row(model, bid):
    module = model.bottleneck(bid)
    tokens = torch.randint(0, 50, (2, 8))
    seen = []

    def capture(_module, _args, output):
        seen.append(output)

    before = module.register_forward_hook(capture)
    with torch.no_grad(), clamped(model, Clamp(bid, 5, 2.5)):
        after = module.register_forward_hook(capture)
        model(tokens, keep_codes=True)
    before.remove()
    after.remove()
    (plain, site), (steered, _) = seen
    z = torch.zeros(16, module.width).scatter_(1, site.indices, site.values)
    expected = plain + ((2.5 - z[:, 5:6]) * module.W_dec[5]).reshape(plain.shape)
    torch.testing.assert_close(steered, expected)
    assert not module._forward_hooks  # the clamp's hook is gone after the block


def test_clamping_an_unused_feature_at_zero_changes_nothing(model):
    tokens = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        out = model(tokens, keep_codes=True)
        unused = sorted(set(range(24)) - set(out.sites["resid.0"].indices.flatten().tolist()))[0]
        with clamped(model, Clamp("resid.0", unused, 0.0)):
            same = model(tokens, keep_codes=True)
    torch.testing.assert_close(same.logits, out.logits)


def test_unknown_bottleneck_or_feature_is_a_user_error(model):
    with pytest.raises(UserError, match="no bottleneck"), clamped(model, Clamp("resid.1", 0, 1.0)):
        pass
    with pytest.raises(UserError, match="features 0..23"), clamped(model, Clamp("resid.0", 24, 1)):
        pass
