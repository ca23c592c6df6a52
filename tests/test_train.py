"""End to end on a slice of the bundled corpus: prepare → train → resume, and bad input."""

import pytest
import torch
from safetensors.torch import load_file

from saeformer import load_run
from saeformer.analysis.curves import plot_curves, read_metrics
from saeformer.analysis.snapshot import load_snapshot
from saeformer.cli import main
from saeformer.train.config import load_config
from saeformer.train.trainer import Trainer


def test_fifty_steps_lower_the_validation_loss(tmp_path, config_file):
    trainer = Trainer(load_config(config_file), tmp_path / "run")
    before = trainer.evaluate()["val/loss"]
    summary = trainer.run()
    assert summary["step"] == 50
    assert summary["val_loss"] < before - 0.5, (before, summary["val_loss"])
    for bid in ("resid.0", "mlp.1"):
        assert summary["sites"][bid]["l0"] <= 8
    assert summary["sites"]["resid.0"]["fvu"] is not None
    assert any((tmp_path / "run" / "tb").iterdir())
    series = read_metrics(tmp_path / "run")
    assert [s for s, _ in series["val/loss"]] == [0, 25, 50]
    assert series["val/loss"][0][1] == pytest.approx(before)
    assert plot_curves(tmp_path / "run").stat().st_size > 10_000


def test_resume_continues_the_same_run_bit_for_bit(tmp_path, config_file):
    sets = ["train.steps=20", "snapshot.every=5"]
    straight = Trainer(load_config(config_file, sets), tmp_path / "a")
    straight.run()
    first = Trainer(load_config(config_file, sets), tmp_path / "b")
    for _ in range(13):
        first.train_step()
    first.save()
    resumed = Trainer(load_config(tmp_path / "b" / "config.json"), tmp_path / "b", resume=True)
    assert resumed.progress.step == 13
    resumed.run()
    a = load_file(tmp_path / "a" / "checkpoints" / "step_20" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_20" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [read_metrics(tmp_path / run)["train/loss"] for run in ("a", "b")]
    assert [p for p in losses[0] if p[0] > 13] == losses[1]  # same losses after the resume
    for step in (15, 20):  # and the same snapshots
        for bid in ("resid.0", "mlp.1"):
            snap_a = load_snapshot(tmp_path / "a", step, bid).tensors
            snap_b = load_snapshot(tmp_path / "b", step, bid).tensors
            assert snap_a.keys() == snap_b.keys()
            for name, tensor in snap_a.items():  # NaN: entropy of a feature that never fired
                torch.testing.assert_close(snap_b[name], tensor, rtol=0, atol=0, equal_nan=True)


def test_cli_prepare_train_resume_and_load_run(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--run-dir", str(run), "--set", "train.steps=10"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "train.steps=20"]) == 0
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_10", "step_20"]
    loaded = load_run(run)
    assert loaded.checkpoint.name == "step_20"
    ids = loaded.tokenizer.encode("In the beginning").ids
    logits = loaded.model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), loaded.config.model.vocab_size)


def _fails_cleanly(argv: list[str], capsys, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saeformer: error:") and message in err[0], err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.bottleneck.0.k=300", "exceeds the width"),
        ("model.bottleneck.1.layer=2", "out of range"),
        ("train.bogus=1", "unknown key"),
    ],
)
def test_bad_config_is_one_line_and_leaves_nothing(
    tmp_path, config_file, capsys, override, message
):
    run = tmp_path / "run"
    _fails_cleanly(
        ["train", str(config_file), "--run-dir", str(run), "--set", override], capsys, message
    )
    assert not run.exists()


def test_missing_inputs_are_one_line(tmp_path, config_file, capsys):
    _fails_cleanly(["train", str(tmp_path / "missing.toml")], capsys, "not found")
    _fails_cleanly(
        ["prepare", "--out", str(tmp_path / "p"), str(tmp_path / "missing.txt")],
        capsys,
        "missing.txt",
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails_cleanly(["prepare", "--out", str(tmp_path / "p"), str(empty)], capsys, "empty")
    assert not (tmp_path / "p").exists()
    _fails_cleanly(["train", "--run-dir", str(tmp_path / "nothing"), "--resume"], capsys, "config")


def test_train_refuses_an_existing_run_without_resume(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    _fails_cleanly(["train", str(config_file), "--run-dir", str(run)], capsys, "--resume")
    assert (run / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_activation_checkpointing_and_bf16_autocast(tmp_path, config_file):
    def run(name: str, overrides: list[str]) -> dict[int, float]:
        trainer = Trainer(load_config(config_file, ["train.steps=4", *overrides]), tmp_path / name)
        return {s: trainer.train_step()["train/loss"] for s in range(4)}

    plain = run("plain", [])
    recomputed = run("ac", ["train.activation_checkpointing=true"])
    assert recomputed == pytest.approx(plain, abs=1e-4)
    bf16 = run("bf16", ["train.dtype=bf16"])
    assert all(abs(bf16[s] - plain[s]) < 0.05 for s in plain), (bf16, plain)


def test_alpha_zero_run_equals_the_dense_twin_step_for_step(tmp_path, config_file):
    bypass = ["model.bottleneck=[]", "train.steps=6"]
    dense = Trainer(load_config(config_file, bypass), tmp_path / "dense")
    cfg = load_config(config_file, ["train.steps=6", "strategy.aux_coef=0", "strategy.rec_coef=0"])
    cfg.model.bottleneck = [b for b in cfg.model.bottleneck if b.site == "resid"]
    cfg.model.bottleneck[0].layer = 1
    twin = Trainer(cfg, tmp_path / "bottleneck")
    twin.schedule = lambda step: ({"resid.1": 0.0}, {"resid.1": 8})  # α held at 0
    for _ in range(6):
        a, b = dense.train_step(), twin.train_step()
        assert a["train/loss"] == b["train/loss"]
    dense_weights, twin_weights = dense.model.state_dict(), twin.model.state_dict()
    for name, tensor in dense_weights.items():
        assert torch.equal(tensor, twin_weights[name]), name
