"""Activation streaming and the post-hoc SAE trainer: filtering, bounded shuffling, caching,
training, export, and a run killed mid-checkpoint that resumes bit-exactly."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from posthoc_models import dense_run, tiny_hf

from saeformer.analysis.activations import ActivationStream, StreamConfig, special_token_ids
from saeformer.analysis.formats import load_saelens
from saeformer.analysis.hooks import HFHost, HookPoint
from saeformer.errors import UserError
from saeformer.train.checkpoint import list_checkpoints
from saeformer.train.data import Batches, TokenData
from saeformer.train.posthoc import PosthocTrainer, load_posthoc_config

POSTHOC = """
[host]
kind = "saeformer"
path = "{run}"

[data]
dir = "{data}"
context = 32
host_batch = 4
buffer_tokens = 512

[[sae]]
hook = "layers.0.output"
width = 64
k = 4

[[sae]]
hook = "layers.1.mlp.hidden"
width = 96
k = 6

[train]
steps = 30
batch_tokens = 128
lr = 3e-3
warmup_steps = 3
eval_every = 10
eval_tokens = 256
log_every = 5
ckpt_every = 10
threads = 1

[strategy]
dead_tokens = 256
k_aux = 16
"""


@pytest.fixture(scope="module")
def host_run(tmp_path_factory, data_dir):
    return dense_run(tmp_path_factory.mktemp("host"), data_dir)


@pytest.fixture
def posthoc_file(tmp_path, host_run, data_dir):
    path = tmp_path / "posthoc.toml"
    path.write_text(POSTHOC.format(run=host_run, data=data_dir))
    return path


def _stream(data_dir, host, hooks, **overrides):
    data = TokenData(data_dir)
    cfg = StreamConfig(dir=data_dir, context=16, host_batch=4, buffer_tokens=160, **overrides)
    special = special_token_ids(data.tokenizer_path)
    return ActivationStream(host, hooks, data.split("train"), special, cfg, seed=3)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order, to compare buffers as multisets."""
    key = x @ torch.linspace(1, 2, x.shape[1])
    return x[key.argsort()]


def test_buffer_holds_the_filtered_activations_of_its_windows(data_dir):
    pytest.importorskip("transformers")
    model = tiny_hf("qwen3", vocab_size=512)
    hook = HookPoint(1, "output")
    stream = _stream(data_dir, HFHost(model, "q"), [hook])
    eos = TokenData(data_dir).meta["eos_id"]
    windows = Batches(TokenData(data_dir).split("train"), 16, 3)  # the stream's window order
    r = next(
        r for r in range(windows.n_windows // 10) if (windows.samples(r * 10, 10)[0] == eos).any()
    )
    x, _ = windows.samples(r * 10, 10)  # a buffer with a document end, which must be dropped
    got = stream.buffer(r)[hook]
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states[2]
    keep = x != eos
    keep[:, 0] = False
    assert len(got) == keep.sum() <= 160
    torch.testing.assert_close(_sorted_rows(got), _sorted_rows(hidden[keep]))


def test_batches_tile_the_buffers_and_resume_from_a_position(data_dir):
    pytest.importorskip("transformers")
    host = HFHost(tiny_hf("qwen3", vocab_size=512), "q")
    hooks = [HookPoint(0, "output"), HookPoint(2, "mlp.hidden")]
    stream = _stream(data_dir, host, hooks)
    position, parts = (0, 0), []
    for _ in range(5):
        batch, position = stream.batch(position, 70)
        assert batch[hooks[1]].shape == (70, 64)
        parts.append(batch[hooks[0]])
    whole = torch.cat([stream.buffer(r)[hooks[0]] for r in range(position[0] + 1)])
    torch.testing.assert_close(torch.cat(parts), whole[:350], rtol=0, atol=0)
    fresh = _stream(data_dir, host, hooks)
    again, _ = fresh.batch((1, 40), 70)
    start = len(stream.buffer(0)[hooks[0]]) + 40
    torch.testing.assert_close(again[hooks[0]], whole[start : start + 70], rtol=0, atol=0)


def test_cache_serves_buffers_without_the_host_and_rejects_other_settings(data_dir, tmp_path):
    pytest.importorskip("transformers")
    host = HFHost(tiny_hf("qwen3", vocab_size=512), "q")
    hook = HookPoint(1, "output")
    first = _stream(data_dir, host, [hook], cache_dir=tmp_path)
    expected = first.buffer(0)[hook]

    def no_host(*_args):
        raise AssertionError("the host ran although the buffer was cached")

    host.logits = no_host
    cached = _stream(data_dir, host, [hook], cache_dir=tmp_path)
    torch.testing.assert_close(cached.buffer(0)[hook], expected, rtol=0, atol=0)
    with pytest.raises(UserError, match="other settings"):
        _stream(data_dir, host, [hook], cache_dir=tmp_path, exclude_first=2)


def test_norm_filter_drops_outlier_tokens(data_dir):
    pytest.importorskip("transformers")
    host = HFHost(tiny_hf("qwen3", vocab_size=512), "q")
    hook = HookPoint(0, "output")
    plain = _stream(data_dir, host, [hook]).buffer(0)[hook]
    filtered = _stream(data_dir, host, [hook], norm_outlier=1.0).buffer(0)[hook]
    assert 0 < len(filtered) < len(plain)
    assert filtered.norm(dim=1).max() <= plain.norm(dim=1).max()


def test_posthoc_training_lowers_fvu_and_exports_saelens(tmp_path, posthoc_file):
    trainer = PosthocTrainer(load_posthoc_config(posthoc_file), tmp_path / "run")
    before = trainer.evaluate()
    summary = trainer.run()
    assert summary["step"] == 30
    for name, sae in summary["saes"].items():
        assert sae["fvu"] < before[f"val/{name}/fvu"]
        assert sae["l0"] <= trainer.cfg.sae[0].k if name.startswith("layers.0") else 6
        loaded = load_saelens(tmp_path / "run" / "saes" / name)
        assert loaded.hook == name
    exported = load_saelens(tmp_path / "run" / "saes" / "layers.0.output").sae
    torch.testing.assert_close(exported.state_dict(), trainer.saes.resid["0"].state_dict())
    norms = trainer.saes.resid["0"].W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert (tmp_path / "run" / "tb").is_dir()


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saeformer.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )


def test_killed_run_resumes_from_its_checkpoint_bit_exactly(tmp_path, posthoc_file):
    straight = PosthocTrainer(load_posthoc_config(posthoc_file), tmp_path / "straight")
    straight.run()
    run = tmp_path / "killed"
    killed = _cli(
        ["posthoc", str(posthoc_file), "--run-dir", str(run)],
        env={"SAEFORMER_CRASH_AT": "checkpoint.commit@20"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_10"]
    resumed = _cli(["posthoc", "--resume", "--run-dir", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 10" in resumed.stdout
    for i, name in enumerate(["layers.0.output", "layers.1.mlp.hidden"]):
        got = load_saelens(run / "saes" / name).sae.state_dict()
        want = straight.saes.resid[str(i)].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae.0.k=100", "k <= width"),
        ("sae.1.hook='layers.0.output'", "same hook"),
        ("sae.0.hook='blocks.0'", "unknown hook point"),
        ("train.batch_tokens=0", "batch_tokens"),
        ("data.exclude_first=40", "exclude_first"),
        ("train.colour=1", "unknown key 'colour'"),
    ],
)
def test_bad_configs_fail_before_any_work(posthoc_file, override, message):
    with pytest.raises(UserError, match=message):
        load_posthoc_config(posthoc_file, [override])


def test_a_hook_beyond_the_host_fails_before_the_run_dir_exists(tmp_path, posthoc_file):
    cfg = load_posthoc_config(posthoc_file, ["sae.0.hook='layers.5.output'"])
    with pytest.raises(UserError, match="decoder layers 0..1"):
        PosthocTrainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
