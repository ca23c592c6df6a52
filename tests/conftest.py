"""Shared fixtures: a small prepared slice of the bundled corpus and a tiny run config."""

from pathlib import Path

import pytest

from saeformer.train.prepare import PrepareConfig, prepare_corpus

TINY_RUN = """
[model]
n_layers = 2
d_model = 64
n_heads = 2
d_ff = 128
context = 32

[[model.bottleneck]]
site = "resid"
layer = 0
width = 256
k = 8

[[model.bottleneck]]
site = "mlp"
layer = 1
width = 128
k = 8

[data]
dir = "{data}"

[train]
steps = 50
batch_size = 8
lr = 3e-3
warmup_steps = 5
eval_every = 25
eval_batches = 2
log_every = 5
ckpt_every = 10
keep_last = 2
threads = 1

[strategy]
alpha_warmup_steps = 10
k_start = 32
k_anneal_steps = 20
aux_coef = 0.03
k_aux = 32
dead_tokens = 2000
rec_coef = 0.1
"""


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The bundled corpus, 60k characters per source, BPE vocabulary 512."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_corpus(PrepareConfig(out_dir=out, vocab_size=512, max_chars=60_000))
    return out


@pytest.fixture
def config_file(tmp_path, data_dir) -> Path:
    """A tiny two-bottleneck run config (resid.0, mlp.1) on the prepared slice."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RUN.format(data=data_dir))
    return path
