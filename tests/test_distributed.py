"""torchrun with gloo on CPU: DDP and FSDP2 match one process; DCP resumes on another world size."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeformer.train.config import load_config
from saeformer.train.trainer import Trainer

# The FVU-normalised auxiliary losses are batch statistics, so they differ per rank by design;
# equality with one process is checked with them off.
SAME_AS_ONE = [
    "strategy.aux_coef=0",
    "strategy.rec_coef=0",
    "strategy.b_dec_mean_rate=0.1",  # its all-reduced means and, on FSDP2, sharded b_dec
    "train.steps=20",
]


def torchrun(
    nproc: int, args: list[str], env: dict[str, str] | None = None, timeout: int = 240
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "saeformer.cli",
        *args,
    ]
    return subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def train_args(config: Path, run: Path, overrides: list[str]) -> list[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return ["train", str(config), "--run-dir", str(run), *sets]


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


def assert_same_run(a: Path, b: Path, step: int = 20) -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for s in la:
        assert la[s] == pytest.approx(lb[s], abs=1e-5), (s, la[s], lb[s])
    wa, wb = weights(a, step), weights(b, step)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A one-process reference run and its config file."""
    root = tmp_path_factory.mktemp("single")
    from conftest import TINY_RUN

    config = root / "tiny.toml"
    config.write_text(TINY_RUN.format(data=data_dir))
    Trainer(load_config(config, SAME_AS_ONE), root / "run").run()
    return config, root / "run"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, single, mode):
    config, reference = single
    run = tmp_path / mode
    done = torchrun(2, train_args(config, run, [*SAME_AS_ONE, f"train.parallel={mode}"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(reference, run)


def test_save_on_two_ranks_resume_on_one_and_on_four(tmp_path, single):
    config, reference = single
    run = tmp_path / "two"
    # async saves: optimizer shards written from a background gloo group, committed later
    sets = [*SAME_AS_ONE, "train.parallel=fsdp", "train.async_save=true"]
    done = torchrun(2, train_args(config, run, sets))
    assert done.returncode == 0, done.stderr[-3000:]
    for nproc in (1, 4):
        resumed = tmp_path / f"resumed_on_{nproc}"
        shutil.copytree(run, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_20")
        args = ["train", "--run-dir", str(resumed), "--resume"]
        done = torchrun(nproc, args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_same_run(reference, resumed)


def test_a_dying_rank_ends_the_job_with_an_error(tmp_path, single):
    config, _ = single
    env = {"SAEFORMER_CRASH_AT": "train.step@5", "SAEFORMER_CRASH_RANK": "1"}
    done = torchrun(
        2,
        train_args(config, tmp_path / "crash", [*SAME_AS_ONE, "train.dist_timeout_s=30"]),
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Signals.SIGKILL" in done.stderr or "exitcode  : -9" in done.stderr


def test_batch_not_divisible_across_ranks_is_one_line(tmp_path, single):
    config, _ = single
    done = torchrun(
        2, train_args(config, tmp_path / "bad", ["train.batch_size=6", "train.grad_accum=2"])
    )
    assert done.returncode != 0
    assert "must be divisible by train.grad_accum (2) × world size (2)" in done.stderr
