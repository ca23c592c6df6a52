"""TOML configs: typed building, overrides and validation with one clear message."""

from pathlib import Path

import pytest

from saeformer.errors import UserError
from saeformer.train.config import load_config

BASE = """
[model]
vocab_size = 512
n_layers = 4
d_model = 64
n_heads = 4

[[model.bottleneck]]
site = "resid"
layer = 1
width = 256
k = 16

[train]
steps = 10
lr = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_builds_typed_config_and_applies_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE), ["train.lr=3e-4", "model.bottleneck.0.k=64", "data.dir=elsewhere"]
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.bottleneck[0].k == 64 and cfg.model.bottleneck[0].id == "resid.1"
    assert cfg.data.dir == Path("elsewhere")
    cfg.validate()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (BASE + "\nbogus = 1\n", [], "unknown key 'bogus'"),
        (BASE, ["train.setps=3"], "did you mean 'steps'"),
        (BASE, ["model.d_model=wide"], "expected int"),
        (BASE, ["model.bottleneck.0.site=attn"], "must be one of"),
        (BASE, ["model.bottleneck.3.k=1"], "no item 3"),
        (BASE, ["train.steps"], "key=value"),
        ("[model\n", [], "not a valid config file"),
    ],
)
def test_bad_config_files_give_one_clear_error(tmp_path, text, overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text), overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.bottleneck.0.k=512"], "exceeds the width"),
        (["model.bottleneck.0.layer=4"], "out of range"),
        (["model.n_heads=3"], "heads"),
        (["train.batch_size=10", "train.grad_accum=3"], "divisible"),
        (["strategy.k_start=64"], "k_anneal_steps"),
    ],
)
def test_validation_rejects_configs_that_cannot_train(tmp_path, overrides, message):
    cfg = load_config(write(tmp_path, BASE), overrides)
    with pytest.raises(UserError, match=message):
        cfg.validate()


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["tiny-cpu.toml", "tiny-cpu-dense.toml", "gpt2-small.toml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(Path(__file__).parent.parent / "configs" / name)
    cfg.model.vocab_size = 8192
    cfg.validate()
