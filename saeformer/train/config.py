"""Run configuration: `[model]`, `[data]`, `[train]`, `[strategy]` tables of a TOML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from saeformer.configio import load_typed
from saeformer.errors import UserError
from saeformer.model.config import ModelConfig


@dataclass
class DataConfig:
    """Where the prepared token shards are (see `saeformer prepare`)."""

    dir: Path = Path("data/prepared/bundled")


@dataclass
class TrainConfig:
    """Optimisation, evaluation, logging and checkpoint cadence."""

    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step (global)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd"] = "cosine"  # after warm-up: cosine, or stable then decay
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to the floor
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    parallel: Literal["ddp", "fsdp"] = "ddp"  # data parallelism under torchrun
    dist_timeout_s: int = 300  # a collective waiting longer than this fails the job
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast for the forward pass
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    async_save: bool = False  # write optimizer shards in the background; commit at next save
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"


@dataclass
class StrategyConfig:
    """Warm-up and convergence strategies for joint training (schedules in steps)."""

    alpha_warmup_steps: int = 0  # bypass fade-in α: 0 → 1 at resid sites
    k_start: int = 0  # k annealing from k_start (0: off) to each site's k ...
    k_anneal_steps: int = 0  # ... over this many steps ...
    k_levels: int = 4  # ... in this many discrete levels
    aux_coef: float = 0.0  # AuxK loss weight (0: off)
    k_aux: int = 256
    dead_tokens: int = 1_000_000  # a feature is dead after this many tokens without firing
    rec_coef: float = 0.0  # λ_rec: reconstruction FVU at resid sites (trains the bottleneck only)
    unit_norm_decoder: bool = True  # renormalise decoder rows, drop the parallel gradient
    b_dec_mean_rate: float = 0.0  # resid sites: b_dec moves this far to the batch mean of h
    dead_bias_rate: float = 0.0  # resid sites: dead features' b_enc rises this much a step
    bottleneck_lr_mult: float = 1.0
    bottleneck_warmup_steps: int = 0  # bottleneck lr ramps up over these steps (0: off)
    teacher_run: Path | None = None  # KL distillation from this (dense) run directory
    kd_coef: float = 0.0  # weight of the distillation KL (needs teacher_run)
    temperature: float = 1.0  # distillation temperature (the loss is scaled by its square)
    keep_last_dense: int = 1  # hint when a bottleneck sits in the last N blocks (0: no hint)


@dataclass
class SnapshotConfig:
    """Feature snapshots on a fixed probe set of validation tokens during training."""

    every: int = 0  # steps between snapshots (0: off)
    log_spaced: bool = False  # also at steps 1, 2, 4, 8, ...
    probe_windows: int = 64  # validation windows (of model.context tokens) in the probe set
    top_m: int = 16  # top activations kept per feature, with their token windows
    window: int = 8  # tokens of context kept on each side of a top activation


@dataclass
class RunConfig:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)

    def validate(self) -> None:
        """Raise UserError for a config that cannot train."""
        self.model.validate()
        t, s = self.train, self.strategy
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "log_every",
            "ckpt_every",
            "keep_last",
        ):
            if getattr(t, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.batch_size % t.grad_accum:
            raise UserError(
                f"train.batch_size ({t.batch_size}) must be divisible by "
                f"train.grad_accum ({t.grad_accum})"
            )
        if t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1:
            raise UserError("train.lr must be positive and train.min_lr_ratio in [0, 1]")
        if not 0 <= t.decay_fraction <= 1:
            raise UserError(f"train.decay_fraction must be in [0, 1], got {t.decay_fraction}")
        if s.k_start and s.k_anneal_steps <= 0:
            raise UserError("strategy.k_start needs strategy.k_anneal_steps > 0")
        snap = self.snapshot
        if min(snap.every, snap.probe_windows, snap.top_m, snap.window) < 0:
            raise UserError("snapshot settings must be non-negative")
        counts = (s.aux_coef, s.rec_coef, s.kd_coef, s.dead_bias_rate, s.k_aux, s.dead_tokens)
        if min(*counts, s.k_levels, s.bottleneck_warmup_steps, s.keep_last_dense) < 0:
            raise UserError("strategy coefficients and counts must be non-negative")
        if not 0 <= s.b_dec_mean_rate <= 1:
            raise UserError(f"strategy.b_dec_mean_rate must be in [0, 1], got {s.b_dec_mean_rate}")
        if (s.kd_coef > 0) != (s.teacher_run is not None) or s.temperature <= 0:
            raise UserError(
                "strategy.kd_coef > 0 and strategy.teacher_run go together, "
                "with strategy.temperature > 0"
            )

    def hints(self) -> list[str]:
        """Advice that is not an error: bottlenecks in the last `keep_last_dense` blocks."""
        n = self.strategy.keep_last_dense
        late = [b.id for b in self.model.bottleneck if b.layer >= self.model.n_layers - n]
        if n <= 0 or not late:
            return []
        return [
            f"hint: {', '.join(late)} in the last {n} block(s); TopK LMs keep the last layers "
            "dense (strategy.keep_last_dense sets N, 0 silences this)"
        ]


def load_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML (or resolved JSON) run config with `--set key=value` overrides (unvalidated)."""
    return load_typed(RunConfig, path, overrides)
