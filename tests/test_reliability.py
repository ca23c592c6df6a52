"""Crash safety, signals, guarded steps and damaged checkpoints."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeformer.errors import UserError
from saeformer.train import checkpoint as ckpt_module
from saeformer.train.checkpoint import latest_checkpoint, list_checkpoints
from saeformer.train.config import load_config
from saeformer.train.trainer import Trainer


def _cli(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "saeformer.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


@pytest.mark.parametrize("point", ["checkpoint.model", "checkpoint.optimizer", "checkpoint.commit"])
def test_sigkill_during_checkpoint_write_then_resume_matches(tmp_path, config_file, point):
    steps = ["--set", "train.steps=30"]
    straight = tmp_path / "straight"
    assert _cli(["train", str(config_file), "--run-dir", str(straight), *steps]).wait() == 0
    run = tmp_path / "killed"
    proc = _cli(
        ["train", str(config_file), "--run-dir", str(run), *steps],
        env={"SAEFORMER_CRASH_AT": f"{point}@20"},
    )
    assert proc.wait() == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(run)] == ["step_10"]  # step 20 never committed
    assert latest_checkpoint(run).name == "step_10"
    resumed = _cli(["train", "--run-dir", str(run), "--resume"])
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert not list((run / "checkpoints").glob(".*tmp*"))
    a, b = _weights(straight, 30), _weights(run, 30)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, config_file):
    run = tmp_path / "run"
    proc = _cli(
        [
            "train",
            str(config_file),
            "--run-dir",
            str(run),
            "--set",
            "train.steps=100000",
            "--set",
            "train.ckpt_every=100000",
        ]
    )
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in out
    saved = latest_checkpoint(run)
    assert saved is not None and int(saved.name.split("_")[1]) > 0


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, config_file):
    trainer = Trainer(load_config(config_file), tmp_path / "run")
    trainer.save()
    with torch.no_grad():
        trainer.model.embed.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(UserError, match=r"non-finite steps in a row at step 4.*step_0"):
        for _ in range(10):
            trainer.train_step()
    after = trainer.model.state_dict()
    for name, tensor in before.items():  # skipped steps leave every weight untouched
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, equal_nan=True)


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path, config_file, monkeypatch):
    trainer = Trainer(load_config(config_file), tmp_path / "run")
    good = trainer.save()
    trainer.train_step()

    def no_space(*_args, **_kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module, "save_file", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        trainer.save()
    assert list_checkpoints(tmp_path / "run") == [good]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))
    assert (good / "model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("damage", ["truncate", "delete_state", "other_arch"])
def test_damaged_checkpoints_give_one_clear_error(tmp_path, config_file, damage):
    trainer = Trainer(load_config(config_file), tmp_path / "run")
    path = trainer.save()
    overrides = []
    if damage == "truncate":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete_state":
        (path / "state.json").unlink()
    else:
        overrides = ["model.d_model=32"]
    cfg = load_config(tmp_path / "run" / "config.json", overrides)
    with pytest.raises(UserError, match="cannot read weights|incomplete|does not fit"):
        Trainer(cfg, tmp_path / "run", resume=True)


def test_keep_last_prunes_only_after_commit(tmp_path, config_file):
    trainer = Trainer(load_config(config_file, ["train.keep_last=2"]), tmp_path / "run")
    for _ in range(4):
        trainer.train_step()
        trainer.save()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_3", "step_4"]


def test_async_save_commits_the_same_checkpoints_as_a_blocking_save(tmp_path, config_file):
    sets = ["train.steps=20", "train.keep_last=3"]
    Trainer(load_config(config_file, sets), tmp_path / "sync").run()
    trainer = Trainer(load_config(config_file, [*sets, "train.async_save=true"]), tmp_path / "a")
    for _ in range(10):
        trainer.train_step()
    trainer.save()
    assert list_checkpoints(tmp_path / "a") == []  # in flight: committed at the next save
    assert trainer.run()["step"] == 20
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step_10", "step_20"]
    for step in (10, 20):
        a, b = _weights(tmp_path / "sync", step), _weights(tmp_path / "a", step)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer state staged at step 10 (not the one of later steps) went to disk
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_20")
    resumed = Trainer(load_config(tmp_path / "b" / "config.json"), tmp_path / "b", resume=True)
    resumed.run()
    a, b = _weights(tmp_path / "sync", 20), _weights(tmp_path / "b", 20)
    assert all(torch.equal(a[k], b[k]) for k in a)
