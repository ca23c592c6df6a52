"""Checkpoints: `runs/<run>/checkpoints/step_<N>/`, committed atomically, loaded without pickle."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from saeformer.atomic import atomic_dir, write_json
from saeformer.errors import UserError
from saeformer.faults import crash_point

STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_FILE, OPTIM_FILE, STATE_FILE, TENSORS_FILE = (
    "model.safetensors",
    "optimizer.pt",
    "state.json",
    "trainer.safetensors",
)


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the weights: trainer state and its tensors."""

    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied weights stored once, contiguous, on CPU."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen[tensor.data_ptr()] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ckpt: Checkpoint,
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write step_<step> atomically, then prune all but the newest `keep_last` checkpoints."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step}"
    try:
        with atomic_dir(final) as tmp:
            save_file(model_tensors(model), tmp / MODEL_FILE)
            crash_point("checkpoint.model", step)
            torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
            crash_point("checkpoint.optimizer", step)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in ckpt.tensors.items()},
                tmp / TENSORS_FILE,
            )
            write_json(tmp / STATE_FILE, ckpt.state)
            write_json(tmp / "config.json", config)
            crash_point("checkpoint.commit", step)
    except OSError as exc:
        raise UserError(f"could not write checkpoint {final}: {exc.strerror or exc}") from None
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load model.safetensors into `model`, with one clear error for a foreign or broken file."""
    file = path / MODEL_FILE
    try:
        tensors = load_file(file)
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise UserError(f"cannot read weights {file}: {exc}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not _is_tied(model, k)]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (
            (missing and f"missing {missing[0]}")
            or (unexpected and f"unexpected {unexpected[0]}")
            or f"shape of {wrong[0]}"
        )
        raise UserError(f"{file} does not fit this model's architecture ({detail})")
    model.load_state_dict(tensors, strict=False)


def _is_tied(model: nn.Module, name: str) -> bool:
    return (
        name == "lm_head.weight"
        and getattr(model, "cfg", None) is not None
        and model.cfg.tie_embeddings
    )


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> Checkpoint:
    """Restore weights (and optimizer state when given); return the trainer state."""
    load_model_weights(path, model)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / OPTIM_FILE, weights_only=True))
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(path / TENSORS_FILE)
    except (FileNotFoundError, SafetensorError, json.JSONDecodeError, RuntimeError, OSError) as exc:
        raise UserError(f"checkpoint {path} is incomplete or corrupt: {exc}") from None
    return Checkpoint(state=state, tensors=tensors)
