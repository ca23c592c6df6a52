"""Post-hoc TopK SAEs on a frozen host: the joint bottleneck module at α = 1, trained on its
activations (one host forward feeds every hook point), with AuxK, unit-norm decoder rows,
checkpoints, resume, TensorBoard and SAELens export."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from saeformer.analysis.activations import ActivationStream, StreamConfig, special_token_ids
from saeformer.analysis.formats import export_saelens
from saeformer.analysis.hooks import HookPoint, Host, HostConfig, load_host
from saeformer.analysis.metrics import dead_fraction, dead_mask, fvu, l0
from saeformer.atomic import write_json
from saeformer.configio import load_typed, to_dict
from saeformer.errors import UserError
from saeformer.model import AuxRequest, Bottleneck
from saeformer.train.checkpoint import (
    Checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    start_checkpoint,
)
from saeformer.train.config import TrainConfig
from saeformer.train.data import TokenData
from saeformer.train.distributed import DistContext
from saeformer.train.optim import set_lr
from saeformer.train.schedules import lr_at
from saeformer.train.strategy import (
    normalize_decoders,
    remove_parallel_decoder_grads,
    update_dead_counters,
)
from saeformer.train.trainer import pick_device

FIT_ROWS = 4096  # activations used to fit the encoder scale at initialisation


@dataclass
class SaeSpec:
    """One SAE: its hook point, width F and k."""

    hook: str
    width: int
    k: int


@dataclass
class PosthocTrainConfig:
    """Optimisation and cadence; a step is `batch_tokens` activations at every hook."""

    steps: int = 2000
    batch_tokens: int = 4096
    lr: float = 4e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0: off
    eval_every: int = 250
    eval_tokens: int = 16_384  # held-out activations from the validation split
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    threads: int = 0


@dataclass
class PosthocStrategy:
    """AuxK, decoder constraint and decoder-bias initialisation."""

    aux_coef: float = 1 / 32
    k_aux: int = 256
    dead_tokens: int = 1_000_000
    unit_norm_decoder: bool = True
    data_init: bool = True  # b_dec = mean of the first buffer, encoder scale fitted to it


@dataclass
class PosthocConfig:
    """Everything a post-hoc SAE run needs: `[host]`, `[data]`, `[[sae]]`, `[train]`, ..."""

    host: HostConfig = field(default_factory=HostConfig)
    data: StreamConfig = field(default_factory=StreamConfig)
    sae: list[SaeSpec] = field(default_factory=list)
    train: PosthocTrainConfig = field(default_factory=PosthocTrainConfig)
    strategy: PosthocStrategy = field(default_factory=PosthocStrategy)

    def validate(self) -> None:
        """Raise UserError for a config that cannot train (before loading anything big)."""
        if not self.sae:
            raise UserError("add at least one [[sae]] table (hook, width, k)")
        hooks = [HookPoint.parse(s.hook) for s in self.sae]
        if len(set(hooks)) != len(hooks):
            raise UserError("two [[sae]] tables name the same hook")
        for s in self.sae:
            if not 0 < s.k <= s.width:
                raise UserError(f"sae {s.hook}: need 0 < k <= width, got k={s.k}, width={s.width}")
        t = self.train
        for name in ("steps", "batch_tokens", "eval_every", "eval_tokens", "log_every"):
            if getattr(t, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.ckpt_every <= 0 or t.keep_last <= 0 or t.lr <= 0 or t.grad_clip < 0:
            raise UserError("train.ckpt_every, keep_last and lr must be positive, grad_clip >= 0")
        s = self.strategy
        if min(s.aux_coef, s.k_aux, s.dead_tokens) < 0:
            raise UserError("strategy.aux_coef, k_aux and dead_tokens must be non-negative")
        self.data.validate()


def load_posthoc_config(path: Path, overrides: list[str] | None = None) -> PosthocConfig:
    """Read a post-hoc TOML (or resolved JSON) config with `--set` overrides, and validate it."""
    cfg = load_typed(PosthocConfig, path, overrides)
    cfg.validate()
    return cfg


class SaeSet(nn.Module):
    """The run's SAEs, under `resid` so the joint trainer's decoder upkeep applies unchanged."""

    def __init__(self, names: list[str], dims: list[tuple[int, int, int]]) -> None:
        super().__init__()
        self.names = names
        self.resid = nn.ModuleDict({str(i): Bottleneck(*d) for i, d in enumerate(dims)})

    @torch.no_grad()
    def init_from_data(self, acts: list[Tensor]) -> None:
        """b_dec = mean activation; W_enc scaled so that ĥ − b_dec best fits h − b_dec.

        TopK of ReLU is positively homogeneous in the encoder scale s, so ĥ − b_dec scales with
        s and the least-squares s is ⟨h − b, ĥ − b⟩ / ‖ĥ − b‖² (on the first `FIT_ROWS` rows).
        """
        for sae, h in zip(self.resid.values(), acts, strict=True):
            sae.b_dec.copy_(h.mean(dim=0))
            centred = h[:FIT_ROWS] - sae.b_dec
            recon = sae(h[:FIT_ROWS])[0] - sae.b_dec
            scale = (centred * recon).sum() / recon.pow(2).sum().clamp_min(1e-12)
            sae.W_enc.mul_(scale.clamp_min(1e-3))

    def train_step(
        self,
        acts: list[Tensor],
        optimizer: torch.optim.Optimizer,
        since_fired: list[Tensor],
        strategy: PosthocStrategy,
        grad_clip: float,
    ) -> dict[str, float]:
        """One optimizer step of every SAE on its batch of activations (FVU + AuxK)."""
        stats: dict[str, float] = {}
        total = torch.zeros((), device=acts[0].device)
        for i, (name, h) in enumerate(zip(self.names, acts, strict=True)):
            sae = self.resid[str(i)]
            aux = AuxRequest(rec=True)
            dead = dead_mask(since_fired[i], strategy.dead_tokens)
            n_dead = int(dead.sum()) if strategy.aux_coef > 0 else 0
            if n_dead > 0:  # AuxK over at most as many latents as are dead
                aux.dead_mask, aux.k_aux = dead, min(strategy.k_aux, n_dead)
            _, site = sae(h, aux=aux)
            total = total + site.rec_loss
            stats[f"{name}/fvu"] = site.rec_loss.item()
            stats[f"{name}/l0"] = site.l0.item()
            if site.auxk_loss is not None:
                total = total + strategy.aux_coef * site.auxk_loss
                stats[f"{name}/auxk_loss"] = site.auxk_loss.item()
            update_dead_counters(since_fired[i], site.counts, len(h))
            stats[f"{name}/dead_frac"] = dead_fraction(since_fired[i], strategy.dead_tokens)
        total.backward()
        if strategy.unit_norm_decoder:
            remove_parallel_decoder_grads(self)
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if strategy.unit_norm_decoder:
            normalize_decoders(self)
        stats["train/loss"] = total.item()
        return stats


class PosthocTrainer:
    """Trains the SAEs of a PosthocConfig into a run directory."""

    def __init__(self, cfg: PosthocConfig, run_dir: Path, *, resume: bool = False) -> None:
        cfg.validate()
        self.cfg, self.run_dir = cfg, run_dir
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        self.data = TokenData(cfg.data.dir)
        self.hooks = [HookPoint.parse(s.hook) for s in cfg.sae]
        self.host: Host = load_host(cfg.host, self.device)
        if self.host.vocab_size < self.data.vocab_size:
            raise UserError(
                f"{cfg.data.dir} was tokenised with {self.data.vocab_size} ids but the host has "
                f"{self.host.vocab_size}: prepare the data with the host's tokenizer"
            )
        dims = [
            (self.host.width(h), s.width, s.k) for h, s in zip(self.hooks, cfg.sae, strict=True)
        ]
        self._prepare_run_dir(resume)
        torch.manual_seed(t.seed)
        self.saes = SaeSet([h.name for h in self.hooks], dims).to(self.device)
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.saes.parameters()), "lr_mult": 1.0}],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            eps=6.25e-10,
        )
        self.stream, self.val = self._streams()
        self.since_fired = [
            torch.zeros(s.width, dtype=torch.int64, device=self.device) for s in cfg.sae
        ]
        self.step, self.position, self.tokens = 0, (0, 0), 0
        if resume:
            self._resume()
        elif cfg.strategy.data_init:
            first = self.stream.buffer(0)
            self.saes.init_from_data([first[h].float() for h in self.hooks])
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=self.step or None)
        self.stop_signal: int | None = None
        self.last_eval: dict[str, float] = {}
        self.throughput = 0.0

    # ----- set-up -------------------------------------------------------------------------

    def _streams(self) -> tuple[ActivationStream, dict[HookPoint, Tensor]]:
        """The training stream, and the held-out activations of the validation split."""
        cfg, seed = self.cfg, self.cfg.train.seed
        special = special_token_ids(self.data.tokenizer_path)
        tokens = self.data.split(cfg.data.split)
        stream = ActivationStream(self.host, self.hooks, tokens, special, cfg.data, seed)
        val_cfg = StreamConfig(
            **{**vars(cfg.data), "buffer_tokens": cfg.train.eval_tokens, "cache_dir": None}
        )
        val_tokens = self.data.split("val")
        val = ActivationStream(self.host, self.hooks, val_tokens, special, val_cfg, seed)
        return stream, val.buffer(0)

    def _prepare_run_dir(self, resume: bool) -> None:
        if resume:
            if latest_checkpoint(self.run_dir) is None:
                raise UserError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
            remove_stale_temporaries(self.run_dir)
            return
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise UserError(
                f"run directory {self.run_dir} already exists: pass --resume to continue it, "
                "or choose another --run-dir"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", to_dict(self.cfg))

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        ckpt = load_checkpoint(path, self.saes, self.optimizer)
        state = ckpt.state["posthoc"]
        self.step, self.tokens = state["step"], state["tokens"]
        self.position = tuple(state["position"])
        for i, counter in enumerate(self.since_fired):
            counter.copy_(ckpt.tensors[f"since_fired.{i}"])
        tqdm.write(f"resumed from {path} at step {self.step}")

    # ----- one step -----------------------------------------------------------------------

    def _schedule(self) -> TrainConfig:
        t = self.cfg.train
        return TrainConfig(
            steps=t.steps, lr=t.lr, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio
        )

    def train_step(self) -> dict[str, float]:
        """One Adam step on `batch_tokens` activations at every hook point."""
        t = self.cfg.train
        lr = lr_at(self.step, self._schedule())
        set_lr(self.optimizer, lr)
        batch, self.position = self.stream.batch(self.position, t.batch_tokens)
        acts = [batch[h].to(self.device) for h in self.hooks]
        stats = self.saes.train_step(
            acts, self.optimizer, self.since_fired, self.cfg.strategy, t.grad_clip
        )
        stats["train/lr"] = lr
        self.step += 1
        self.tokens += t.batch_tokens
        if not math.isfinite(stats["train/loss"]):
            raise UserError(f"non-finite loss at step {self.step}: lower train.lr")
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """FVU and L0 of every SAE on the held-out validation activations."""
        stats = {}
        for i, hook in enumerate(self.hooks):
            sae = self.saes.resid[str(i)]
            h = self.val[hook].float().to(self.device)
            code = sae.encode(h, sae.k)
            stats[f"val/{hook.name}/fvu"] = fvu(h, sae.decode(code.values, code.indices)).item()
            stats[f"val/{hook.name}/l0"] = l0(code.values).item()
        return stats

    # ----- logging, checkpoints, export ---------------------------------------------------

    def log(self, stats: dict[str, float]) -> None:
        """Write scalars to TensorBoard and to metrics.jsonl."""
        for tag, value in stats.items():
            self.writer.add_scalar(tag, value, self.step)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": self.step, "tokens": self.tokens, **stats}) + "\n")

    def save(self) -> Path:
        """Commit a checkpoint of the current step."""
        state = {"posthoc": {"step": self.step, "tokens": self.tokens, "position": self.position}}
        tensors = {f"since_fired.{i}": c for i, c in enumerate(self.since_fired)}
        pending = start_checkpoint(
            self.run_dir,
            self.step,
            self.saes,
            self.optimizer,
            Checkpoint(state=state, tensors=tensors),
            to_dict(self.cfg),
            DistContext(),
        )
        return commit_checkpoint(pending, self.cfg.train.keep_last, DistContext())

    def export(self) -> list[Path]:
        """Write every SAE in the SAELens layout under RUN/saes/<hook>/."""
        cfg = self.cfg
        return [
            export_saelens(
                self.saes.resid[str(i)],
                self.run_dir / "saes" / hook.name,
                hook=hook.name,
                model_name=cfg.host.path,
                context_size=cfg.data.context,
                dataset_path=str(cfg.data.dir),
            )
            for i, hook in enumerate(self.hooks)
        ]

    # ----- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to train.steps (or until SIGINT/SIGTERM), export, and return the summary."""
        t = self.cfg.train
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=t.steps, initial=self.step, desc="posthoc", unit="step", dynamic_ncols=True
        )
        try:
            self._loop(bar)
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.writer.close()
        self.export()
        return self.summary()

    def _loop(self, bar: tqdm) -> None:
        t = self.cfg.train
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < t.steps:
            stats = self.train_step()
            window_tokens += t.batch_tokens
            bar.update(1)
            done = self.step == t.steps
            if self.step % t.log_every == 0 or done:
                self.throughput = window_tokens / (time.perf_counter() - window_start)
                stats["train/activations_per_s"] = self.throughput
                self.log(stats)
                bar.set_postfix(loss=f"{stats['train/loss']:.3f}", act_s=f"{self.throughput:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if self.step % t.eval_every == 0 or done:
                self.last_eval = self.evaluate()
                self.log(self.last_eval)
            if self.step % t.ckpt_every == 0 or done or self.stop_signal is not None:
                self.save()
            if self.stop_signal is not None:
                tqdm.write(f"stopped by signal {self.stop_signal} at step {self.step}")
                return

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def summary(self) -> dict[str, Any]:
        """Final numbers of the run, also written to summary.json."""
        s = self.cfg.strategy
        saes = {
            h.name: {
                "width": spec.width,
                "k": spec.k,
                "fvu": self.last_eval.get(f"val/{h.name}/fvu"),
                "l0": self.last_eval.get(f"val/{h.name}/l0"),
                "dead_frac": dead_fraction(self.since_fired[i], s.dead_tokens),
                "saelens": str(self.run_dir / "saes" / h.name),
            }
            for i, (h, spec) in enumerate(zip(self.hooks, self.cfg.sae, strict=True))
        }
        summary = {
            "step": self.step,
            "tokens": self.tokens,
            "activations_per_s": self.throughput,
            "dead_threshold_tokens": s.dead_tokens,
            "saes": saes,
            "tensorboard": str(self.run_dir / "tb"),
            "stopped_by_signal": self.stop_signal,
        }
        write_json(self.run_dir / "summary.json", summary)
        return summary


def print_summary(summary: dict[str, Any]) -> None:
    """Print per-SAE validation FVU, L0 and dead fraction, throughput and output paths."""
    print(f"\nposthoc run finished at step {summary['step']} ({summary['tokens']:,} activations)")
    print(f"  throughput   {summary['activations_per_s']:,.0f} activations/s (all hooks per step)")
    for hook, s in summary["saes"].items():
        fvu_text = "n/a" if s["fvu"] is None else f"{s['fvu']:.3f}"
        l0_text = "n/a" if s["l0"] is None else f"{s['l0']:.1f}"
        print(
            f"  {hook:<18} F {s['width']}  k {s['k']}  val FVU {fvu_text}  L0 {l0_text}  "
            f"dead {s['dead_frac']:.1%}  → {s['saelens']}"
        )
    print(f"  TensorBoard  tensorboard --logdir {summary['tensorboard']}")
