"""Checkpoints: `runs/<run>/checkpoints/step_<N>/`, committed atomically, loaded without pickle.

Weights are one full `model.safetensors`; the optimizer state goes through
`torch.distributed.checkpoint` (sharded on several ranks, reshardable to any world size; its
`.metadata` is pickled and trusted as the user's own output).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from saeformer.atomic import commit_dir, temporary_dir_for, write_json
from saeformer.errors import UserError
from saeformer.faults import crash_point
from saeformer.train.distributed import DistContext, barrier, broadcast_object

STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_FILE, OPTIM_DIR, STATE_FILE, TENSORS_FILE = (
    "model.safetensors",
    "optimizer",
    "state.json",
    "trainer.safetensors",
)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the weights: trainer state and its tensors."""

    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def full_model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered on rank 0), tied weights stored once."""
    tensors = get_model_state_dict(model, options=FULL)
    if _tied(model):
        tensors.pop("lm_head.weight", None)
    return {name: t.contiguous() for name, t in tensors.items()}


def _tied(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)
    return bool(getattr(getattr(inner, "cfg", None), "tie_embeddings", False))


@dataclass
class PendingCheckpoint:
    """A checkpoint written to its temporary folder but not committed yet; with an async save
    its optimizer shards may still be in flight."""

    tmp: Path
    final: Path
    step: int
    optimizer_written: Future | None = None


def start_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ckpt: Checkpoint,
    config: dict[str, Any],
    ctx: DistContext,
    async_save: bool = False,
    group: ProcessGroup | None = None,
) -> PendingCheckpoint:
    """Write everything of step_<step> into a temporary folder (a collective). With
    `async_save`, DCP writes the optimizer shards in the background (collectives on `group`)
    from a copy staged in memory, so training can go on."""
    final = run_dir / "checkpoints" / f"step_{step}"
    weights = full_model_tensors(model)
    optim_state = get_optimizer_state_dict(model, optimizer) if optimizer.state else None
    tmp = Path(broadcast_object(str(temporary_dir_for(final)) if ctx.is_main else None, ctx))
    pending = PendingCheckpoint(tmp, final, step)
    with _cleaned_on_error(tmp, final):
        if ctx.is_main:
            save_file(weights, tmp / MODEL_FILE)
            crash_point("checkpoint.model", step)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()},
                tmp / TENSORS_FILE,
            )
            write_json(tmp / STATE_FILE, ckpt.state)
            write_json(tmp / "config.json", config)
        if optim_state is not None:
            with _single_process_quiet():
                if async_save:
                    pending.optimizer_written = dcp.async_save(
                        optim_state, checkpoint_id=tmp / OPTIM_DIR, process_group=group
                    )
                else:
                    dcp.save(optim_state, checkpoint_id=tmp / OPTIM_DIR)
        if ctx.is_main:
            crash_point("checkpoint.optimizer", step)  # written, or (async) being written
    return pending


def commit_checkpoint(pending: PendingCheckpoint, keep_last: int, ctx: DistContext) -> Path:
    """Wait for the optimizer shards, rename the folder into place, prune to `keep_last`."""
    with _cleaned_on_error(pending.tmp, pending.final):
        if pending.optimizer_written is not None:
            pending.optimizer_written.result()
        barrier(ctx)
        if ctx.is_main:
            crash_point("checkpoint.commit", pending.step)
            commit_dir(pending.tmp, pending.final)
    barrier(ctx)
    if ctx.is_main:
        run_dir = pending.final.parent.parent
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return pending.final


@contextlib.contextmanager
def _cleaned_on_error(tmp: Path, final: Path) -> Iterator[None]:
    """A write that fails removes its temporary folder and becomes one clear error."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's notice that it runs without a process group (the single-process case)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoint folders that a killed process left behind."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for tmp in root.glob(".step_*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest committed checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_model_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read model.safetensors and check it fits `model`, with one clear error otherwise."""
    file = path / MODEL_FILE
    try:
        tensors = load_file(file)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise UserError(f"cannot read weights {file}: {exc}") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k.removeprefix("module."): v for k, v in expected.items()}
    if _tied(model):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k, v in tensors.items() if k in expected and v.shape != expected[k]]
    problem = (
        (missing and f"missing {missing[0]}")
        or (unexpected and f"unexpected {unexpected[0]}")
        or (wrong and f"shape of {wrong[0]}")
    )
    if problem:
        raise UserError(f"{file} does not fit this model's architecture ({problem})")
    return tensors


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into `model` (plain, DDP or FSDP2)."""
    tensors = read_model_weights(path, model)
    set_model_state_dict(
        model, tensors, options=StateDictOptions(full_state_dict=True, strict=not _tied(model))
    )


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> Checkpoint:
    """Restore weights (and optimizer state when given); return the trainer state."""
    load_model_weights(path, model)
    try:
        if optimizer is not None and (path / OPTIM_DIR).is_dir():
            state = get_optimizer_state_dict(model, optimizer)
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=path / OPTIM_DIR)
            set_optimizer_state_dict(model, optimizer, state)
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(path / TENSORS_FILE)
    except (FileNotFoundError, SafetensorError, json.JSONDecodeError, RuntimeError, OSError) as exc:
        raise UserError(f"checkpoint {path} is incomplete or corrupt: {exc}") from None
    return Checkpoint(state=state, tensors=tensors)
