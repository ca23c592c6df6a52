"""Tiny host models for the post-hoc tests: transformers Qwen models and a saeformer run."""

from pathlib import Path

import torch

from saeformer.train.config import load_config
from saeformer.train.trainer import Trainer

TINY_RUN = """
[model]
n_layers = 2
d_model = 32
n_heads = 2
d_ff = 64
context = 32
{bottleneck}
[data]
dir = "{data}"

[train]
steps = 2
batch_size = 4
warmup_steps = 1
eval_every = 2
eval_batches = 1
ckpt_every = 2
threads = 1
"""


def tiny_hf(arch: str, vocab_size: int = 128) -> torch.nn.Module:
    """A randomly initialised Qwen3 / Qwen3-MoE / Qwen3.5 causal LM with small dims."""
    import transformers

    small = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small))
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **small, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.Qwen3_5TextConfig(
        **small,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    )
    return transformers.Qwen3_5ForCausalLM(cfg)


JOINT = """
[[model.bottleneck]]
site = "resid"
layer = 0
width = 64
k = 4
"""


def dense_run(root: Path, data_dir: Path, *, joint: bool = False, seed: int = 0) -> Path:
    """A two-layer saeformer run trained for two steps: dense, or with a `resid.0` bottleneck."""
    name = f"{'joint' if joint else 'dense'}-{seed}"
    config = root / f"{name}.toml"
    config.write_text(TINY_RUN.format(data=data_dir, bottleneck=JOINT if joint else ""))
    run_dir = root / name
    Trainer(load_config(config, [f"train.seed={seed}"]), run_dir).run()
    return run_dir
