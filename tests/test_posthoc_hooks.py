"""Hook points against independent references: `output_hidden_states` and a manual forward."""

import pytest
import torch
import torch.nn.functional as F
from posthoc_models import tiny_hf

from saeformer.analysis.hooks import HFHost, HookPoint, SaeformerHost
from saeformer.errors import UserError
from saeformer.model import ModelConfig, Transformer

pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen3_5"])
def test_layer_output_is_hidden_states_n_plus_one(arch):
    model = tiny_hf(arch)
    host = HFHost(model, arch)
    tokens = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        ref = model(tokens, output_hidden_states=True).hidden_states
    hooks = [HookPoint.parse(f"layers.{n}.output") for n in range(3)]
    got = host.capture(tokens, hooks)
    for n in range(2):
        torch.testing.assert_close(got[hooks[n]], ref[n + 1], rtol=0, atol=0)
    # the last entry of hidden_states is taken after the final norm
    torch.testing.assert_close(model.model.norm(got[hooks[2]]), ref[3])
    assert not torch.allclose(got[hooks[2]], ref[3])


def test_capture_stops_after_the_last_hook():
    model = tiny_hf("qwen3")
    calls = []
    model.model.layers[2].register_forward_hook(lambda *_: calls.append("late layer"))
    got = HFHost(model, "q").capture(torch.randint(0, 128, (1, 5)), [HookPoint(1, "output")])
    assert got[HookPoint(1, "output")].shape == (1, 5, 32)
    assert calls == []


def test_mlp_hidden_is_the_down_projection_input():
    model = tiny_hf("qwen3")
    mlp = model.model.layers[1].mlp
    seen = {}
    mlp.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    hook = HookPoint.parse("layers.1.mlp.hidden")
    got = HFHost(model, "q").capture(torch.randint(0, 128, (2, 7)), [hook])[hook]
    x = seen["x"]
    torch.testing.assert_close(got, F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert HFHost(model, "q").width(hook) == 64


def test_mlp_hidden_of_a_mixture_of_experts_is_a_clear_error():
    with pytest.raises(UserError, match="no dense"):
        HFHost(tiny_hf("qwen3_moe"), "moe").width(HookPoint(0, "mlp.hidden"))


def test_saeformer_hooks_match_a_manual_forward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=2, d_ff=48))
    host = SaeformerHost(model, "tiny")
    tokens = torch.randint(0, 64, (2, 9))
    hooks = [HookPoint(n, "output") for n in range(3)] + [HookPoint(2, "mlp.hidden")]
    got = host.capture(tokens, hooks)
    with torch.no_grad():
        x = model.embed(tokens)
        for n, block in enumerate(model.blocks):
            mid = x + block.attn(block.attn_norm(x))
            hidden = F.gelu(block.mlp.up(block.mlp_norm(mid)))
            x = mid + block.mlp.down(hidden)
            torch.testing.assert_close(got[HookPoint(n, "output")], x)
    torch.testing.assert_close(got[HookPoint(2, "mlp.hidden")], hidden)


def test_a_splice_hook_replaces_the_activation():
    model = tiny_hf("qwen3")
    host = HFHost(model, "q")
    tokens = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        clean = host.logits(tokens)
        with host.hooked(HookPoint(2, "output"), torch.zeros_like):
            zeroed = host.logits(tokens)
        with host.hooked(HookPoint(1, "output"), lambda h: h):
            same = host.logits(tokens)
    torch.testing.assert_close(same, clean)
    torch.testing.assert_close(zeroed, model.lm_head(torch.zeros(1, 6, 32)))


@pytest.mark.parametrize("name", ["layers.x.output", "blocks.2.hook_resid_post", "layers.1", ""])
def test_unknown_hook_names_are_rejected(name):
    with pytest.raises(UserError, match="hidden_states"):
        HookPoint.parse(name)


def test_out_of_range_layer_is_a_clear_error():
    with pytest.raises(UserError, match="decoder layers 0..2"):
        HFHost(tiny_hf("qwen3"), "q").capture(
            torch.zeros(1, 3, dtype=torch.long), [HookPoint(5, "output")]
        )
