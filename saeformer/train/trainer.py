"""The joint-training loop: schedules, losses, logging, evaluation and checkpoints."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from saeformer.analysis.metrics import dead_fraction, dead_mask
from saeformer.analysis.snapshot import SnapshotWriter
from saeformer.atomic import write_json
from saeformer.configio import to_dict
from saeformer.errors import UserError
from saeformer.faults import crash_point
from saeformer.model import AuxRequest, Output, Transformer
from saeformer.train.checkpoint import (
    Checkpoint,
    PendingCheckpoint,
    commit_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    start_checkpoint,
)
from saeformer.train.config import RunConfig
from saeformer.train.data import Batches, TokenData, fixed_windows
from saeformer.train.distributed import (
    all_reduce,
    background_group,
    broadcast_object,
    check_divisible,
    init_distributed,
    set_gradient_sync,
    shutdown,
    sum_named,
)
from saeformer.train.flops import bottleneck_flops_per_token, dense_flops_per_token, peak_flops
from saeformer.train.optim import build_optimizer, clip_groups, set_lr
from saeformer.train.parallelize import compute_context, parallelize
from saeformer.train.schedules import bottleneck_lr_scale, bottleneck_schedule, lr_at
from saeformer.train.strategy import (
    Distiller,
    normalize_decoders,
    raise_dead_biases,
    remove_parallel_decoder_grads,
    track_decoder_bias,
    update_dead_counters,
)

MAX_SKIPPED_STEPS = 5


@dataclass
class Progress:
    """Counters that, with the weights, optimizer and RNGs, make a resume exact."""

    step: int = 0
    tokens: int = 0
    position: int = 0
    skipped_in_a_row: int = 0
    last_checkpoint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    """`auto` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device = {name!r} but no CUDA device is available")
    return torch.device(name)


class Trainer:
    """Trains a bottleneck Transformer from a RunConfig into a run directory."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.data = TokenData(cfg.data.dir)
        self._resolve_vocab()
        cfg.validate()
        self.device = pick_device(cfg.train.device)
        self.dist = init_distributed(self.device, cfg.train.dist_timeout_s)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        check_divisible(cfg.train.batch_size, cfg.train.grad_accum, self.dist)
        for hint in cfg.hints():
            self.say(hint)
        self._on_main(lambda: self._prepare_run_dir(resume))
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        self.train_model = parallelize(self.model, cfg.train, self.dist, self.device)
        self.save_group = background_group(self.dist) if cfg.train.async_save else None
        self.pending: PendingCheckpoint | None = None
        self.optimizer = build_optimizer(self.model, cfg)
        self.distiller = (
            Distiller(cfg, self.data.tokenizer_path, self.device)
            if cfg.strategy.teacher_run
            else None
        )
        self.batches = Batches(self.data.split("train"), cfg.model.context, cfg.train.seed)
        val_count = cfg.train.eval_batches * cfg.train.batch_size // cfg.train.grad_accum
        self.val_x, self.val_y = fixed_windows(self.data.split("val"), cfg.model.context, val_count)
        self.progress = Progress()
        self.since_fired = {
            b.id: torch.zeros(b.width, dtype=torch.int64, device=self.device)
            for b in cfg.model.bottleneck
        }
        self.widths = {b.id: b.width for b in cfg.model.bottleneck}
        self.k_final = {b.id: b.k for b in cfg.model.bottleneck}
        if resume:
            self._resume()
        self.writer = (
            SummaryWriter(str(run_dir / "tb"), purge_step=self.progress.step or None)
            if self.dist.is_main
            else None
        )
        self.snapshots = SnapshotWriter(cfg, run_dir, self.data, enabled=self.dist.is_main)
        self.stop_signal: int | None = None
        self.last_eval: dict[str, float] = {}
        self.throughput = 0.0

    # ----- set-up -------------------------------------------------------------------------

    def _on_main(self, work: Callable[[], None]) -> None:
        """Run `work` on rank 0 only; a UserError there is raised on every rank."""
        error = None
        if self.dist.is_main:
            try:
                work()
            except UserError as exc:
                error = str(exc)
        error = broadcast_object(error, self.dist)
        if error is not None:
            raise UserError(error)

    def say(self, message: str) -> None:
        """Print a line above the progress bar (rank 0 only)."""
        if self.dist.is_main:
            tqdm.write(message)

    def _resolve_vocab(self) -> None:
        model = self.cfg.model
        if model.vocab_size == 0:
            model.vocab_size = self.data.vocab_size
        elif model.vocab_size < self.data.vocab_size:
            raise UserError(
                f"model.vocab_size = {model.vocab_size} is smaller than the data's "
                f"vocabulary ({self.data.vocab_size})"
            )

    def _prepare_run_dir(self, resume: bool) -> None:
        run_dir = self.run_dir
        if resume:
            if latest_checkpoint(run_dir) is None:
                raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
            return
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(
                f"run directory {run_dir} already exists: pass --resume to continue it, "
                "or choose another --run-dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", to_dict(self.cfg))
        shutil.copyfile(self.data.tokenizer_path, run_dir / "tokenizer.json")

    def _resume(self) -> None:
        if self.dist.is_main:
            remove_stale_temporaries(self.run_dir)
        path = latest_checkpoint(self.run_dir)
        ckpt = load_checkpoint(path, self.train_model, self.optimizer)
        s = ckpt.state
        self.progress = Progress(**s["progress"])
        random.setstate(_to_tuple(s["rng"]["python"]))
        np.random.set_state(_numpy_from_json(s["rng"]["numpy"]))
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        for bid, counter in self.since_fired.items():
            counter.copy_(ckpt.tensors[f"since_fired.{bid}"])
        self.say(f"resumed from {path} at step {self.progress.step}")

    # ----- one step -----------------------------------------------------------------------

    def schedule(self, step: int) -> tuple[dict[str, float], dict[str, int]]:
        """Per-bottleneck α and k at `step`."""
        return bottleneck_schedule(self.cfg, step)

    def _aux_requests(self) -> dict[str, AuxRequest]:
        s = self.cfg.strategy
        if s.aux_coef <= 0 and s.rec_coef <= 0:
            return {}
        return {
            bid: AuxRequest(
                rec=s.rec_coef > 0,
                dead_mask=dead_mask(self.since_fired[bid], s.dead_tokens)
                if s.aux_coef > 0
                else None,
                k_aux=min(s.k_aux, self.widths[bid]) if s.aux_coef > 0 else 0,
            )
            for bid in self.widths
            if bid.startswith("resid")
        }

    def _loss(self, out: Output, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.cfg.strategy
        loss = out.loss
        logged = {}
        for bid, site in out.sites.items():
            if site.rec_loss is not None:
                loss = loss + s.rec_coef * site.rec_loss
                logged[f"{bid}/rec_loss"] = site.rec_loss.item()
            if site.auxk_loss is not None:
                loss = loss + s.aux_coef * site.auxk_loss
                logged[f"{bid}/auxk_loss"] = site.auxk_loss.item()
        if self.distiller is not None:
            kd = self.distiller.loss(tokens, out.logits)
            loss = loss + s.kd_coef * kd
            logged["train/kd_loss"] = kd.item()
        return loss, logged

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `batch_size` sequences in `grad_accum` micro-batches."""
        t, p = self.cfg.train, self.progress
        lr, bottleneck_scale = lr_at(p.step, t), bottleneck_lr_scale(p.step, self.cfg.strategy)
        set_lr(self.optimizer, lr, bottleneck_scale)
        alpha, ks = self.schedule(p.step)
        aux = self._aux_requests()
        micro = t.batch_size // t.grad_accum
        local = micro // self.dist.world_size
        parts = t.grad_accum * self.dist.world_size
        stats: dict[str, float] = {}
        means: dict[str, Tensor] = {}  # resid sites: batch mean of h, for b_dec tracking
        self.train_model.train()
        for m in range(t.grad_accum):
            set_gradient_sync(self.train_model, m == t.grad_accum - 1)
            start = p.position + m * micro + self.dist.rank * local
            x, y = self.batches.samples(start, local)
            with compute_context(t, self.device):
                out = self.train_model(
                    x.to(self.device), y.to(self.device), alpha=alpha, k=ks, aux=aux
                )
            loss, logged = self._loss(out, x)
            (loss / t.grad_accum).backward()
            _accumulate(stats, {"train/loss": out.loss.item(), **logged}, parts)
            for bid, site in out.sites.items():
                counts = all_reduce(site.counts.clone(), self.dist)
                update_dead_counters(self.since_fired[bid], counts, micro * self.cfg.model.context)
                _accumulate(stats, {f"{bid}/l0": site.l0.item()}, parts)
                if site.fvu is not None:
                    _accumulate(stats, {f"{bid}/fvu": site.fvu.item()}, parts)
                if site.mean_h is not None:
                    means[bid] = means.get(bid, 0) + site.mean_h / parts
        stats = self._sum_over_ranks(stats)
        self._optimizer_step(stats, sum_named(means, self.dist))
        p.step += 1
        p.position += t.batch_size
        p.tokens += t.batch_size * self.cfg.model.context
        stats["train/lr"] = lr
        if self.widths:
            stats["train/bottleneck_lr"] = (
                lr * self.cfg.strategy.bottleneck_lr_mult * bottleneck_scale
            )
        for bid in self.widths:
            stats[f"{bid}/k"] = ks[bid]
            stats[f"{bid}/dead_frac"] = dead_fraction(
                self.since_fired[bid], self.cfg.strategy.dead_tokens
            )
        stats.update({f"{bid}/alpha": a for bid, a in alpha.items()})
        return stats

    def _sum_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """Each rank holds its share of every mean; the sum over ranks is the global mean."""
        if not self.dist.enabled:
            return stats
        f64 = {"dtype": torch.float64, "device": self.device}
        summed = sum_named({k: torch.tensor(v, **f64) for k, v in stats.items()}, self.dist)
        return dict(zip(summed, torch.stack(list(summed.values())).tolist(), strict=True))  # 1 sync

    def _optimizer_step(self, stats: dict[str, float], means: dict[str, Tensor]) -> None:
        if self.cfg.strategy.unit_norm_decoder:
            remove_parallel_decoder_grads(self.model)
        for part, norm in clip_groups(self.optimizer, self.cfg.train.grad_clip).items():
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            stats[f"train/{part}_grad_norm"] = norm.item()
        grad_norm = math.hypot(*(v for k, v in stats.items() if k.endswith("_grad_norm")))
        if not (math.isfinite(stats["train/loss"]) and math.isfinite(grad_norm)):
            self._skip_step()
            return
        self.progress.skipped_in_a_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.strategy.unit_norm_decoder:
            normalize_decoders(self.model)
        if self.cfg.strategy.b_dec_mean_rate > 0:
            track_decoder_bias(self.model, means, self.cfg.strategy.b_dec_mean_rate)
        if (s := self.cfg.strategy).dead_bias_rate > 0:
            raise_dead_biases(self.model, self.since_fired, s.dead_tokens, s.dead_bias_rate)

    def _skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        p = self.progress
        p.skipped_in_a_row += 1
        self.say(f"step {p.step}: non-finite loss or gradient, step skipped")
        if p.skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise UserError(
                f"{p.skipped_in_a_row} non-finite steps in a row at step {p.step}; "
                f"last good checkpoint: {p.last_checkpoint or 'none'}"
            )

    # ----- evaluation, logging, checkpoints -----------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation CE and per-site L0/FVU on the fixed validation windows at current α, k."""
        self.train_model.eval()
        alpha, ks = self.schedule(self.progress.step)
        micro = self.cfg.train.batch_size // self.cfg.train.grad_accum
        local = micro // self.dist.world_size
        chunks = range(0, len(self.val_x), micro)
        parts = len(chunks) * self.dist.world_size
        stats: dict[str, float] = {}
        for i in chunks:
            rows = slice(i + self.dist.rank * local, i + (self.dist.rank + 1) * local)
            x, y = self.val_x[rows].to(self.device), self.val_y[rows].to(self.device)
            with compute_context(self.cfg.train, self.device):
                out = self.train_model(x, y, alpha=alpha, k=ks)
            _accumulate(stats, {"val/loss": out.loss.item()}, parts)
            for bid, site in out.sites.items():
                _accumulate(stats, {f"val/{bid}/l0": site.l0.item()}, parts)
                if site.fvu is not None:
                    _accumulate(stats, {f"val/{bid}/fvu": site.fvu.item()}, parts)
        return self._sum_over_ranks(stats)

    def log(self, stats: dict[str, float]) -> None:
        """Write scalars to TensorBoard and to metrics.jsonl."""
        if not self.dist.is_main:
            return
        step = self.progress.step
        for tag, value in stats.items():
            self.writer.add_scalar(tag, value, step)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "tokens": self.progress.tokens, **stats}) + "\n")

    def save(self) -> Path:
        """Write a checkpoint of the current step. With train.async_save its optimizer shards
        go on writing in the background and it is committed at the next save or at the end."""
        self.commit_pending()
        state = {
            "progress": vars(self.progress),
            "rng": {"python": random.getstate(), "numpy": _numpy_state()},
        }
        tensors = {"rng.torch": torch.get_rng_state()}
        tensors.update({f"since_fired.{bid}": c for bid, c in self.since_fired.items()})
        self.pending = start_checkpoint(
            self.run_dir,
            self.progress.step,
            self.train_model,
            self.optimizer,
            Checkpoint(state=state, tensors=tensors),
            to_dict(self.cfg),
            self.dist,
            self.cfg.train.async_save,
            self.save_group,
        )
        final = self.pending.final
        if not self.cfg.train.async_save:
            self.commit_pending()
        return final

    def commit_pending(self) -> None:
        """Commit the checkpoint still in flight, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            path = commit_checkpoint(pending, self.cfg.train.keep_last, self.dist)
            self.progress.last_checkpoint = str(path)

    # ----- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to cfg.train.steps (or until SIGINT/SIGTERM), then return the run summary."""
        t = self.cfg.train
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=t.steps,
            initial=self.progress.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        try:
            self._loop(bar)
            self.commit_pending()
            return self.summary()
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.close()
            shutdown()

    def _loop(self, bar: tqdm) -> None:
        t, p = self.cfg.train, self.progress
        if p.step == 0:
            self.last_eval = self.evaluate()
            self.log(self.last_eval)
        window_start, window_tokens = time.perf_counter(), 0
        while p.step < t.steps:
            stats = self.train_step()
            window_tokens += t.batch_size * self.cfg.model.context
            bar.update(1)
            done = p.step == t.steps
            if p.step % t.log_every == 0 or done:
                self.throughput = window_tokens / (time.perf_counter() - window_start)
                stats.update(self._speed())
                self.log(stats)
                bar.set_postfix(loss=f"{stats['train/loss']:.3f}", tok_s=f"{self.throughput:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if p.step % t.eval_every == 0 or done:
                self.last_eval = self.evaluate()
                self.log(self.last_eval)
                self.say(f"step {p.step}: val loss {self.last_eval['val/loss']:.4f}")
            self.snapshots.after_step(self.model, p.step, p.tokens)
            crash_point("train.step", p.step)
            stopping = self._agreed_stop()
            if p.step % t.ckpt_every == 0 or done or stopping:
                self.save()
            if stopping:
                self.say(f"stopped by signal {self.stop_signal} at step {p.step}; checkpoint saved")
                return

    def _speed(self) -> dict[str, float]:
        """Throughput, and MFU where the device's peak is known (bottleneck FLOPs apart)."""
        dense = dense_flops_per_token(self.cfg.model)
        extra = bottleneck_flops_per_token(self.cfg.model)
        stats = {
            "train/tokens_per_s": self.throughput,
            "train/bottleneck_flops_frac": extra / (dense + extra),
        }
        peak = peak_flops(self.device)
        if peak is not None:
            stats["train/mfu"] = self.throughput * (dense + extra) / (peak * self.dist.world_size)
        return stats

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def _agreed_stop(self) -> bool:
        """Whether any rank got SIGINT/SIGTERM: every rank then stops after the same step."""
        if not self.dist.enabled:
            return self.stop_signal is not None
        flag = torch.tensor([self.stop_signal or 0], device=self.device)
        signum = int(all_reduce(flag, self.dist).item())
        self.stop_signal = self.stop_signal or (signum if signum else None)
        return signum != 0

    def summary(self) -> dict[str, Any]:
        """Final numbers of the run, also written to summary.json."""
        s = self.cfg.strategy
        sites = {}
        for bid in self.widths:
            sites[bid] = {
                "l0": self.last_eval.get(f"val/{bid}/l0"),
                "k": self.k_final[bid],
                "fvu": self.last_eval.get(f"val/{bid}/fvu"),
                "dead_frac": dead_fraction(self.since_fired[bid], s.dead_tokens),
            }
        summary = {
            "step": self.progress.step,
            "stopped_by_signal": self.stop_signal,
            "tokens": self.progress.tokens,
            "val_loss": self.last_eval.get("val/loss"),
            "tokens_per_s": self.throughput,
            "dead_threshold_tokens": s.dead_tokens,
            "sites": sites,
            "tensorboard": str(self.run_dir / "tb"),
            "checkpoint": self.progress.last_checkpoint,
        }
        if self.dist.is_main:
            write_json(self.run_dir / "summary.json", summary)
        summary["rank"] = self.dist.rank
        return summary


def _accumulate(stats: dict[str, float], values: dict[str, float], n: int) -> None:
    for key, value in values.items():
        stats[key] = stats.get(key, 0.0) + value / n


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _numpy_from_json(state: list[Any]) -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
