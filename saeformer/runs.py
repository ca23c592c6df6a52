"""One loader for run directories, shared by notebooks, the CLI and the analysis code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from saeformer.errors import UserError
from saeformer.model import Transformer
from saeformer.train.checkpoint import latest_checkpoint, load_model_weights
from saeformer.train.config import RunConfig, load_config


@dataclass
class LoadedRun:
    """A trained model with its tokenizer and config, at one checkpoint."""

    model: Transformer
    tokenizer: Tokenizer
    config: RunConfig
    checkpoint: Path


def load_run(path: str | Path, step: int | None = None, device: str = "cpu") -> LoadedRun:
    """Load the model (latest checkpoint, or `step`), tokenizer and config of a run directory."""
    run_dir = Path(path)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    config = load_config(config_file)
    checkpoint = (
        run_dir / "checkpoints" / f"step_{step}" if step is not None else latest_checkpoint(run_dir)
    )
    if checkpoint is None or not checkpoint.is_dir():
        raise UserError(f"{run_dir}: no checkpoint {'at step ' + str(step) if step else 'yet'}")
    model = Transformer(config.model)
    load_model_weights(checkpoint, model)
    model.to(torch.device(device)).eval()
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    return LoadedRun(model=model, tokenizer=tokenizer, config=config, checkpoint=checkpoint)
