"""The alignment-tax experiment of issue 4: what bottlenecks cost a language model, and which
convergence strategies pay it back.

Trains on the bundled corpus the dense twins (the same architecture without bottlenecks, two
seeds, and one widened to the bottleneck model's parameter count), naive insertion (every
strategy off), each strategy alone, the combined recipe (two seeds), the recipe without its
dense teacher (two seeds) and that recipe less one strategy at a time, the configs' default
(two seeds: the teacherless recipe less what its leave-one-out runs found costly), at resid and
at mlp sites, then the default recipe at growing model widths. Protocol
(DESIGN.md, Metrics): a warm-up/stable/decay lr schedule; the penalty at the dense budget N;
the alignment tax from decays branched off each bottleneck run's stable phase at 1.25, 1.5, 2
and 3 times the budget (each branch continues the previous one's stable phase, so a longer
run is a fair continuation), stopping once a branch reaches the dense twin's loss; the dense
twin and the default recipe go to the last branch, to show whether the twin's loss has
flattened at N and how the default's penalty moves with more tokens. Rerunning
the command skips finished runs and resumes unfinished ones; each finished branch is also
recorded (summary, wall time, the curves the page reads) under docs/results-runs/SCALE, kept in
git, so that a fresh clone resumes the grid where the last session left it and regenerates the
page without the run folders. The page (docs/results.md for the headline scale,
docs/results-SCALE.md for the others) is rewritten from whatever has finished.

    python scripts/alignment_tax.py                                  # the small grid (hours)
    python scripts/alignment_tax.py --scale cpu                      # docs/results-cpu.md
    python scripts/alignment_tax.py --scale smoke --budget-steps 20 --data /tmp/prepared
    python scripts/alignment_tax.py --only 'dense-*,resid-naive'     # a subset
    python scripts/alignment_tax.py --report-only                    # rewrite docs/results.md
    python scripts/alignment_tax.py --only 'dense-*,mlp-*' &  # two processes,
    python scripts/alignment_tax.py --only 'resid-*'          # one core each
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from saeformer.atomic import atomic_dir, write_json
from saeformer.configio import apply_override, build, parse_override
from saeformer.errors import UserError
from saeformer.model import Transformer
from saeformer.model.config import ModelConfig
from saeformer.train.checkpoint import latest_checkpoint, list_checkpoints
from saeformer.train.config import RunConfig, load_config
from saeformer.train.data import TokenData
from saeformer.train.prepare import PrepareConfig, prepare_corpus
from saeformer.train.trainer import Trainer

SEEDS = (0, 1)  # the dense twin and the combined recipe run with both
SITES = ("resid", "mlp")
TAX_MULTIPLES = (1.0, 1.25, 1.5, 2.0, 3.0)  # branch budgets, in units of the dense budget
DECAY_FRACTION = 0.2  # of the dense budget: every run ends with a linear decay this long
TAX_KINDS = ("naive", "combined", "default")  # arms continued past the budget (or --tax-all)
# continued to the last branch even once they reach the dense loss: the dense twin (is its loss
# flat?) and the default recipe (does its penalty shrink or grow with more tokens?)
CONTINUED_IN_FULL = ("dense", "default")
TRADES = {"b-dec-mean"}  # traded loss for live features on the combined recipe: not in it, an
# arm of their own adds each to it
# The configs' default: the combined recipe less its dense teacher and less the strategies
# whose removal from the teacherless recipe lowered the loss (its leave-one-out rows)
DEFAULT_DROPS = ("distill", "lr-mult")
# leave-one-out arms whose first seed landed near the seed spread: a second seed decides them
TWO_SEED_ABLATIONS = {"auxk"}


@dataclass(frozen=True)
class Scale:
    """A model size and dense budget for the whole grid."""

    model: dict[str, Any]  # the [model] table without bottlenecks
    sites: dict[str, list[tuple[int, int, int]]]  # (layer, width F, k) of each site's bottlenecks
    train: dict[str, Any]  # [train] settings besides the schedule
    budget_steps: int
    dead_tokens: int  # a feature is dead after this many tokens without firing
    k_aux: int
    widths: tuple[int, ...]  # d_model values the width search tries, smallest first
    vocab_size: int  # of the BPE tokenizer trained on the bundled corpus (see default_data)
    note: str


SCALES = {
    "smoke": Scale(
        model={"n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 128, "context": 32},
        sites={"resid": [(0, 256, 8)], "mlp": [(0, 128, 8)]},
        train={"batch_size": 8, "lr": 3e-3, "eval_batches": 2, "threads": 1},
        budget_steps=20,
        dead_tokens=2_000,
        k_aux=32,
        widths=(40, 48),
        vocab_size=512,
        note="a pipeline check only: nothing in it measures the strategies",
    ),
    "cpu": Scale(
        model={"n_layers": 4, "d_model": 96, "n_heads": 4, "d_ff": 384, "context": 128},
        sites={"resid": [(1, 1536, 32), (2, 1536, 32)], "mlp": [(1, 384, 32), (2, 384, 32)]},
        train={"batch_size": 32, "lr": 3e-3, "eval_batches": 8, "threads": 2},
        budget_steps=600,
        dead_tokens=200_000,
        k_aux=128,
        widths=(104, 112, 128),
        vocab_size=4096,
        note=(
            "a smaller model than the demo's (vocabulary 4096) trained on 0.4 epochs of the "
            "bundled corpus, so that the whole grid fits in a few sessions on 2 CPU cores (15k "
            "tokens/s for the dense twin); the budget check below says how far its loss is "
            "from flat"
        ),
    ),
    "gpu": Scale(
        model={"n_layers": 12, "d_model": 768, "n_heads": 12, "d_ff": 3072, "context": 1024},
        sites={"resid": [(4, 32768, 64), (8, 32768, 64)], "mlp": [(4, 3072, 64), (8, 3072, 64)]},
        train={"batch_size": 64, "lr": 6e-4, "eval_batches": 16, "dtype": "bf16"},
        budget_steps=8000,
        dead_tokens=10_000_000,
        k_aux=512,
        widths=(864, 960, 1152),
        vocab_size=50304,
        note="GPT-2 small; needs a corpus far larger than the bundled one (--data)",
    ),
}


# the cpu grid's model halved in depth and shrunk in width, trained twice as long
SCALES["small"] = replace(
    SCALES["cpu"],
    model={"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 256, "context": 128},
    sites={"resid": [(0, 1024, 32)], "mlp": [(0, 256, 32)]},
    train={**SCALES["cpu"].train, "threads": 1},
    budget_steps=1200,
    widths=(72, 80, 96),
    note=(
        "a two-block model trained longer than `cpu` (0.8 epochs of the bundled corpus at the "
        "budget, 2.4 at 3×), so that its dense twin is nearer flat; one thread a run, so that "
        "two runs share the 2 cores (`--only` splits the grid between processes)"
    ),
)
HEADLINE = "small"  # the default --scale, whose page is docs/results.md


@dataclass(frozen=True)
class Arm:
    """One configuration of the grid, trained as one or more branches (budget multiples)."""

    name: str
    kind: str  # dense | wide | naive | strategy | combined | teacherless | ablation | default
    # | recipe (a trade added to a recipe) | width
    site: str | None
    model: dict[str, Any]
    strategy: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    multiples: tuple[float, ...] = (1.0,)


def strategies(scale: Scale, n: int, teacher: Path) -> dict[str, tuple[set[str], dict[str, Any]]]:
    """Each strategy switch of issue 4 with its schedule, and the sites it applies to."""
    k = max(k for bottlenecks in scale.sites.values() for _, _, k in bottlenecks)
    return {
        "fade-in": ({"resid"}, {"alpha_warmup_steps": 3 * n // 10}),
        "k-anneal": (set(SITES), {"k_start": 8 * k, "k_anneal_steps": 3 * n // 10}),
        "auxk": ({"resid"}, {"aux_coef": 1 / 32, "k_aux": scale.k_aux}),
        "unit-norm": ({"resid"}, {"unit_norm_decoder": True}),
        "b-dec-mean": ({"resid"}, {"b_dec_mean_rate": 0.1}),
        "dead-bias": ({"resid"}, {"dead_bias_rate": 0.03}),
        "lr-mult": (set(SITES), {"bottleneck_lr_mult": 0.5}),
        "bn-warmup": (set(SITES), {"bottleneck_warmup_steps": n // 5}),
        "rec": ({"resid"}, {"rec_coef": 0.1}),
        "distill": (set(SITES), {"teacher_run": str(teacher), "kd_coef": 0.5}),
    }


def widen(model: dict[str, Any], d_model: int) -> dict[str, Any]:
    """The model at width d_model: d_ff scaled alike, mlp bottlenecks as wide as d_ff."""
    d_ff = round(model["d_ff"] * d_model / model["d_model"])
    bottlenecks = [
        {**b, "width": d_ff} if b["site"] == "mlp" and b["width"] == model["d_ff"] else b
        for b in model["bottleneck"]
    ]
    return {**model, "d_model": d_model, "d_ff": d_ff, "bottleneck": bottlenecks}


def n_params(model: dict[str, Any], vocab_size: int) -> int:
    """Parameter count of a [model] table (built on the meta device, nothing allocated)."""
    cfg = build(ModelConfig, {**model, "vocab_size": vocab_size}, where="model")
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def matched_width(dense: dict[str, Any], target: int, vocab_size: int) -> int:
    """The d_model (a multiple of 2·n_heads) whose dense model comes closest to `target` params."""
    d, step = dense["d_model"], 2 * dense["n_heads"]
    while n_params(widen(dense, d + step), vocab_size) <= target:
        d += step
    below, above = (n_params(widen(dense, w), vocab_size) for w in (d, d + step))
    return d if target - below <= above - target else d + step


class Grid:
    """The runs of one scale and budget under one output folder, and how to train them."""

    def __init__(
        self,
        scale: Scale,
        n: int,
        out: Path,
        data: Path,
        sets: list[str] | None = None,
        tax_all: bool = False,
        records: Path | None = None,
    ) -> None:
        self.scale, self.n, self.out, self.data, self.sets = scale, n, out, data, sets or []
        self.records = records  # finished branches' summaries and curves, kept in the repository
        every = (*TAX_KINDS, "strategy", "teacherless", "recipe", "ablation")
        self.tax_kinds = every if tax_all else TAX_KINDS
        self.default_drops = DEFAULT_DROPS
        self.vocab_size = TokenData(data).vocab_size
        self.decay = max(1, round(DECAY_FRACTION * n))
        if n - self.decay < 1:
            raise UserError(f"--budget-steps {n} leaves no stable phase before the decay")
        dense = {**scale.model, "bottleneck": []}
        self.wide_width = {
            site: matched_width(
                dense, n_params(self.site_model(site), self.vocab_size), self.vocab_size
            )
            for site in SITES
        }
        self.arms = self._plan()

    # ----- the plan -----------------------------------------------------------------------

    def site_model(self, site: str) -> dict[str, Any]:
        """The [model] table with this site's bottlenecks."""
        bottlenecks = [
            {"site": site, "layer": layer, "width": width, "k": k}
            for layer, width, k in self.scale.sites[site]
        ]
        return {**self.scale.model, "bottleneck": bottlenecks}

    def wide_twin(self, site: str) -> str:
        """Name of the dense twin widened to this site's bottleneck model's parameter count."""
        d = self.wide_width[site]
        return "dense-s0" if d == self.scale.model["d_model"] else f"dense-d{d}"

    def params(self, arm: Arm) -> int:
        """Parameter count of an arm's model."""
        return n_params(arm.model, self.vocab_size)

    def arm(self, name: str) -> Arm:
        """The arm of this name."""
        return next(a for a in self.arms if a.name == name)

    def _plan(self) -> list[Arm]:
        dense = {**self.scale.model, "bottleneck": []}
        # seed 0 continues past the budget like a tax branch: its own loss there shows whether
        # the budget lets the dense twin flatten
        arms = [Arm("dense-s0", "dense", None, dense, multiples=TAX_MULTIPLES)]
        arms += [Arm(f"dense-s{s}", "dense", None, dense, seed=s) for s in SEEDS[1:]]
        for site in SITES:
            name, d = self.wide_twin(site), self.wide_width[site]
            if name not in {a.name for a in arms}:
                arms.append(Arm(name, "wide", None, widen(dense, d)))
        for site in SITES:
            arms += self._site_arms(site)
        return arms

    def _site_arms(self, site: str) -> list[Arm]:
        """Naive, each strategy alone, the combined recipe with and without its teacher, the
        teacherless recipe less one strategy at a time, the trades and the wider models."""
        model = self.site_model(site)
        off = {"unit_norm_decoder": False, "dead_tokens": self.scale.dead_tokens}
        teacher = (self.out / "dense-s0" / branch_name(1.0)).resolve()
        alone = {
            name: values
            for name, (where, values) in strategies(self.scale, self.n, teacher).items()
            if site in where
        }

        def less(recipe: dict[str, Any], *names: str) -> dict[str, Any]:
            keys = {k for name in names if name in alone for k in alone[name]}
            return {**off, **{k: v for k, v in recipe.items() if k not in keys}}

        kept = [name for name in alone if name not in TRADES]
        combined = {**off, **{k: v for name in kept for k, v in alone[name].items()}}
        teacherless = less(combined, "distill")
        default = less(teacherless, *DEFAULT_DROPS)
        arms = [Arm(f"{site}-naive", "naive", site, model, off, multiples=self.tax("naive"))]
        for name, values in alone.items():
            arms.append(
                Arm(
                    f"{site}-{name}",
                    "strategy",
                    site,
                    model,
                    {**off, **values},
                    multiples=self.tax("strategy"),
                )
            )
        recipes = (
            ("combined", "combined", combined),
            ("teacherless", "combined-no-distill", teacherless),
            ("default", "default", default),
        )
        for kind, label, recipe in recipes:
            for s in SEEDS:
                name = f"{site}-{label}-s{s}"
                arms.append(Arm(name, kind, site, model, recipe, s, self.tax(kind)))
        for name in (n for n in kept if n != "distill"):  # leave one out of the teacherless recipe
            for s in SEEDS if name in TWO_SEED_ABLATIONS else SEEDS[:1]:
                suffix = f"-s{s}" if s else ""  # seed 0 keeps the name its records have
                arms.append(
                    Arm(
                        f"{site}-combined-no-distill-no-{name}{suffix}",
                        "ablation",
                        site,
                        model,
                        less(teacherless, name),
                        s,
                    )
                )
        for name in sorted(TRADES & alone.keys()):  # both recipes with it, for the trade
            for label, recipe in (("combined", combined), ("combined-no-distill", teacherless)):
                traded = {**recipe, **alone[name]}
                arms.append(Arm(f"{site}-{label}+{name}", "recipe", site, model, traded))
        for d in self.scale.widths:  # the default recipe, wider
            arms.append(Arm(f"{site}-default-d{d}", "width", site, widen(model, d), default))
        return arms

    def width_ladder(self, site: str) -> list[Arm]:
        """The default recipe (seed 0) at the scale's width, then at each wider d_model."""
        wider = [a for a in self.arms if a.kind == "width" and a.site == site]
        return [self.arm(f"{site}-default-s0"), *wider]

    def tax(self, kind: str) -> tuple[float, ...]:
        """Branch budgets of an arm of this kind: continued past the budget, or not."""
        return TAX_MULTIPLES if kind in self.tax_kinds else (1.0,)

    # ----- layout -------------------------------------------------------------------------

    def total_steps(self, multiple: float) -> int:
        """Steps of the branch that ends at `multiple` times the dense budget."""
        return round(multiple * self.n)

    def branch_dir(self, arm: Arm, multiple: float) -> Path:
        """Run directory of one branch of an arm."""
        return self.out / arm.name / branch_name(multiple)

    def record_dir(self, arm: Arm, multiple: float) -> Path | None:
        """Where a finished branch is recorded in the repository (None: no records kept)."""
        return None if self.records is None else self.records / arm.name / branch_name(multiple)

    def fingerprint(self, arm: Arm) -> dict[str, Any]:
        """What makes a run this arm's (model, strategies, seed, --set; the teacher named inside
        the grid's folder), kept beside its results so that a run of an older recipe is not
        taken for the arm's."""
        strategy = dict(arm.strategy)
        if "teacher_run" in strategy:
            teacher = Path(strategy["teacher_run"]).relative_to(self.out.resolve())
            strategy["teacher_run"] = teacher.as_posix()
        arm_id = {"model": arm.model, "strategy": strategy, "seed": arm.seed, "sets": self.sets}
        return json.loads(json.dumps(arm_id))  # tuples as lists, as read back

    def holds_arm(self, arm: Arm, folder: Path) -> bool:
        """Whether a run folder or record holds a run of this arm (one older than the
        fingerprints, which has none, is taken for it)."""
        path = folder / ARM_FILE
        return not path.is_file() or json.loads(path.read_text()) == self.fingerprint(arm)

    def clear_stale(self, arm: Arm, folder: Path) -> None:
        """Remove a run folder of this arm's name that ran another recipe."""
        if folder.exists() and not self.holds_arm(arm, folder):
            tqdm.write(f"{arm.name}: {folder} ran another recipe; training it anew")
            shutil.rmtree(folder)

    def _finished(self, arm: Arm, multiple: float) -> tuple[Path, dict[str, Any]] | None:
        """A branch of this arm that has finished its decay: (its run folder, else its record,
        which outlives the run folder; its summary); None while it is unfinished."""
        for folder in (self.branch_dir(arm, multiple), self.record_dir(arm, multiple)):
            if folder is None or not self.holds_arm(arm, folder):
                continue
            if summary := finished_summary(folder, self.total_steps(multiple)):
                return folder, summary
        return None

    def finished_dir(self, arm: Arm, multiple: float) -> Path | None:
        """The folder holding a finished branch (see `_finished`), else None."""
        return None if (done := self._finished(arm, multiple)) is None else done[0]

    def metrics_dir(self, arm: Arm, multiple: float) -> Path | None:
        """The folder to read a branch's curves from: finished, or still running, or None."""
        if (folder := self.finished_dir(arm, multiple)) is not None:
            return folder
        run_dir = self.branch_dir(arm, multiple)
        return run_dir if (run_dir / "metrics.jsonl").is_file() else None

    def summary(self, arm: Arm, multiple: float) -> dict[str, Any] | None:
        """The branch's summary once it has finished its decay, else None."""
        return None if (done := self._finished(arm, multiple)) is None else done[1]

    def record(self, arm: Arm, multiple: float) -> None:
        """Record a branch whose run folder has finished, unless its record already exists."""
        run_dir, record = self.branch_dir(arm, multiple), self.record_dir(arm, multiple)
        steps = self.total_steps(multiple)
        if (
            record is not None
            and finished_summary(run_dir, steps)
            and self.holds_arm(arm, run_dir)
            and not (finished_summary(record, steps) and self.holds_arm(arm, record))
        ):
            record_branch(run_dir, record)

    def record_finished(self) -> None:
        """Record every finished run folder that has no record yet (runs of earlier versions)."""
        for arm in self.arms:
            for multiple in arm.multiples:
                self.record(arm, multiple)

    def run_config(self, arm: Arm) -> RunConfig:
        """The full config of a fresh run of this arm (steps are set per phase)."""
        n = self.n
        train = {
            **self.scale.train,
            "schedule": "wsd",
            "warmup_steps": max(1, n // 20),
            "eval_every": max(1, n // 10),
            "log_every": max(1, n // 50),
            "ckpt_every": max(1, n // 4),
            "keep_last": 2,
            "seed": arm.seed,
        }
        data = {
            "model": arm.model,
            "data": {"dir": str(self.data)},
            "train": train,
            "strategy": {"dead_tokens": self.scale.dead_tokens, **arm.strategy},
        }
        for text in self.sets:
            apply_override(data, *parse_override(text))
        return build(RunConfig, data, where=arm.name)

    # ----- training -----------------------------------------------------------------------

    def train_branch(self, arm: Arm, index: int, rerun: bool = False) -> None:
        """Stable phase up to the decay start (seeding the next branch there), then the decay.
        A branch seeded by nobody (its previous one is only recorded) trains its stable phase
        from step 0, the same run as the previous branch's; `rerun` retrains a recorded one."""
        multiple = arm.multiples[index]
        run_dir = self.branch_dir(arm, multiple)
        self.clear_stale(arm, run_dir)
        total = self.total_steps(multiple)
        done = finished_summary(run_dir, total) if rerun else self.summary(arm, multiple)
        if done is not None:
            return  # finished (its checkpoints may be gone)
        start = total - self.decay
        if checkpoint_step(run_dir) < start:
            self._train(arm, run_dir, start, 0.0)
        if index + 1 < len(arm.multiples):
            self.clear_stale(arm, following := self.branch_dir(arm, arm.multiples[index + 1]))
            seed_branch(run_dir, start, following)
        self._train(arm, run_dir, total, self.decay / total)
        keep = 1 if index == 0 else 0  # the budget run's model stays (the distillation teacher)
        for old in list_checkpoints(run_dir)[: len(list_checkpoints(run_dir)) - keep]:
            shutil.rmtree(old)
        self.record(arm, multiple)

    def teacher_ready(self) -> bool:
        """Train the distillation teacher (dense-s0's budget run) where only its record is left
        or its retraining was cut short; False while dense-s0 has not finished at all."""
        dense = self.arm("dense-s0")
        if self.summary(dense, 1.0) is None:
            return False
        run_dir = self.branch_dir(dense, 1.0)
        trained = finished_summary(run_dir, self.total_steps(1.0)) is not None
        if not (trained and latest_checkpoint(run_dir)):  # a record, or a retraining cut short
            tqdm.write("dense-s0: retraining the distillation teacher (only its record is here)")
            self.train_branch(dense, 0, rerun=True)
        return True

    def _train(self, arm: Arm, run_dir: Path, steps: int, decay_fraction: float) -> None:
        over = [f"train.steps={steps}", f"train.decay_fraction={decay_fraction!r}"]
        if latest_checkpoint(run_dir) is not None:
            cfg = load_config(run_dir / "config.json", over + self.sets)
            trainer = Trainer(cfg, run_dir, resume=True)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # killed before its first checkpoint
            cfg = self.run_config(arm)
            cfg.train.steps, cfg.train.decay_fraction = steps, decay_fraction
            trainer = Trainer(cfg, run_dir)
            write_json(run_dir / ARM_FILE, self.fingerprint(arm))
        began = time.perf_counter()
        summary = trainer.run()
        add_wall_time(run_dir, time.perf_counter() - began)
        if (signum := summary["stopped_by_signal"]) is not None:
            tqdm.write(f"stopped by signal {signum}; rerun the same command to resume")
            raise SystemExit(128 + signum)

    # ----- targets ------------------------------------------------------------------------

    def dense_loss(self) -> float | None:
        """The dense twin's final validation loss, averaged over its finished seeds."""
        losses = [
            s["val_loss"]
            for arm in self.arms
            if arm.kind == "dense" and (s := self.summary(arm, 1.0)) is not None
        ]
        return sum(losses) / len(losses) if losses else None

    def reached(self, arm: Arm, upto: int) -> bool:
        """Whether one of the first `upto` branches of the arm reached the dense twin's loss."""
        target = self.dense_loss()
        losses = [s["val_loss"] for m in arm.multiples[:upto] if (s := self.summary(arm, m))]
        return target is not None and any(loss <= target for loss in losses)


def branch_name(multiple: float) -> str:
    """Folder name of the branch ending at `multiple` times the dense budget."""
    return f"x{multiple:.2f}"


def finished_summary(folder: Path, steps: int) -> dict[str, Any] | None:
    """The summary.json in `folder` when it is that of a run finished at `steps`, else None."""
    path = folder / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary["step"] == steps else None


ARM_FILE = "arm.json"  # a run's fingerprint (Grid.fingerprint), in its folder and its record
RECORDED = ("val/loss", "train/loss", "train/tokens_per_s")  # the curves the page reads


def record_branch(run_dir: Path, record: Path) -> None:
    """Copy a finished branch's summary, wall time and the curves the page reads into its
    record (atomically): the grid resumes from records on a machine without the run folders."""
    with atomic_dir(record) as tmp:
        for name in ("summary.json", "timing.json", ARM_FILE):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        kept = []
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            logged = json.loads(line)
            values = {k: v for k, v in logged.items() if k in RECORDED}
            if values:
                kept.append(json.dumps({"step": logged["step"], **values}))
        (tmp / "metrics.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")


def checkpoint_step(run_dir: Path) -> int:
    """Step of the newest checkpoint of a run directory (-1 when it has none)."""
    latest = latest_checkpoint(run_dir)
    return -1 if latest is None else int(latest.name.removeprefix("step_"))


def seed_branch(run_dir: Path, step: int, target: Path) -> None:
    """Start the next branch from this one's stable-phase checkpoint (once, atomically)."""
    if target.exists():
        return
    with atomic_dir(target) as tmp:
        shutil.copytree(
            run_dir / "checkpoints" / f"step_{step}", tmp / "checkpoints" / f"step_{step}"
        )
        for name in ("config.json", "tokenizer.json", ARM_FILE):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)


def add_wall_time(run_dir: Path, seconds: float) -> None:
    """Accumulate a branch's training wall time in timing.json (it may take several sessions)."""
    path = run_dir / "timing.json"
    before = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    write_json(path, {"seconds": before + seconds})


def default_data(scale: Scale) -> Path:
    """The bundled corpus tokenized at the scale's vocabulary (prepared once, on first use)."""
    out = Path(f"data/prepared/bundled-v{scale.vocab_size}")
    if not (out / "meta.json").is_file():
        tqdm.write(f"preparing the bundled corpus at vocabulary {scale.vocab_size} in {out}")
        prepare_corpus(PrepareConfig(out_dir=out, vocab_size=scale.vocab_size))
    return out


def selected(arms: list[Arm], only: str | None) -> list[Arm]:
    """The arms whose names match one of the comma-separated patterns of --only (all without)."""
    if not only:
        return arms
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [a for a in arms if any(fnmatch.fnmatch(a.name, p) for p in patterns)]


def train_grid(grid: Grid, arms: list[Arm]) -> None:
    """Budget runs first (dense twins before the rest), then the tax branches, then widths."""
    # headline numbers first
    order = (
        "dense",
        "naive",
        "combined",
        "default",
        "teacherless",
        "recipe",
        "ablation",
        "strategy",
        "wide",
    )
    budget = sorted((a for a in arms if a.kind != "width"), key=lambda a: order.index(a.kind))
    branches = [(a, i) for a in budget for i in range(1, len(a.multiples))]
    widths = [a for a in arms if a.kind == "width"]
    bar = tqdm(total=len(budget) + len(branches) + len(widths), desc="grid", unit="run")
    try:
        for arm in budget:
            todo = grid.summary(arm, 1.0) is None
            if todo and arm.strategy.get("teacher_run") and not grid.teacher_ready():
                tqdm.write(f"{arm.name}: skipped until its teacher dense-s0 has finished")
            elif todo:
                bar.set_postfix_str(arm.name)
                grid.train_branch(arm, 0)
            bar.update()
        for arm, index in branches:
            run_dir = grid.branch_dir(arm, arm.multiples[index])
            if arm.kind not in CONTINUED_IN_FULL and grid.reached(arm, index):
                if not (run_dir / "metrics.jsonl").exists():  # seeded, no longer needed
                    shutil.rmtree(run_dir, ignore_errors=True)
            elif grid.summary(arm, arm.multiples[index - 1]) and grid.dense_loss() is not None:
                bar.set_postfix_str(f"{arm.name} {run_dir.name}")
                grid.train_branch(arm, index)
            bar.update()
        for arm in widths:
            ladder = grid.width_ladder(arm.site)
            smaller = ladder[: ladder.index(arm)]  # all finished, none reached: try this width
            ready = grid.dense_loss() is not None and all(grid.summary(a, 1.0) for a in smaller)
            if ready and not any(grid.reached(a, 1) for a in smaller):
                bar.set_postfix_str(arm.name)
                grid.train_branch(arm, 0)
            bar.update()
    finally:
        bar.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scale", choices=SCALES, default=HEADLINE, help=f"grid size (default {HEADLINE})"
    )
    p.add_argument("--budget-steps", type=int, help="the dense budget N in steps (scale default)")
    p.add_argument("--only", help="train only arms matching these comma-separated patterns")
    p.add_argument(
        "--data",
        type=Path,
        help="token shards (default: the bundled corpus, prepared at the scale's vocabulary "
        "into data/prepared/bundled-vVOCAB on first use)",
    )
    p.add_argument(
        "--tax-all",
        action="store_true",
        help="continue every bottleneck arm past the budget (default: naive and combined only)",
    )
    p.add_argument("--out", type=Path, help="run folders (default runs/alignment_tax/SCALE)")
    p.add_argument(
        "--results",
        type=Path,
        help=f"the page (default docs/results.md for --scale {HEADLINE}, else "
        "docs/results-SCALE.md)",
    )
    p.add_argument("--img-dir", type=Path, help="its plots (default docs/img/results/SCALE)")
    p.add_argument(
        "--records",
        type=Path,
        help="finished branches' summaries and curves, kept in git so that the grid resumes "
        "and the page regenerates on a machine without the run folders (default "
        "docs/results-runs/SCALE for the scale's own grid; none with --budget-steps, --data or "
        "--set, which change what the runs are)",
    )
    p.add_argument("--report-only", action="store_true", help="rewrite the page, train nothing")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value of every run, e.g. train.threads=2 or train.device=cuda",
    )
    return p.parse_args(argv)


def grid_command(args: argparse.Namespace) -> str:
    """The command that trains this grid (the options that change what it trains)."""
    parts = ["python scripts/alignment_tax.py", f"--scale {args.scale}"]
    if args.budget_steps:
        parts.append(f"--budget-steps {args.budget_steps}")
    if args.data:
        parts.append(f"--data {args.data}")
    if args.tax_all:
        parts.append("--tax-all")
    if args.out:
        parts.append(f"--out {args.out}")
    return " ".join(parts + [f"--set {text}" for text in args.set])


def main(argv: list[str] | None = None) -> int:
    """Train what is missing of the grid, then rewrite the results page."""
    from alignment_tax_report import write_results

    args = parse_args(argv)
    scale = SCALES[args.scale]
    n = args.budget_steps or scale.budget_steps
    out = args.out or Path("runs/alignment_tax") / args.scale
    page = args.results or Path(
        "docs/results.md" if args.scale == HEADLINE else f"docs/results-{args.scale}.md"
    )
    img_dir = args.img_dir or Path("docs/img/results") / args.scale
    own_grid = not (args.budget_steps or args.data or args.set)
    records = args.records or (Path("docs/results-runs") / args.scale if own_grid else None)
    try:
        data = args.data or default_data(scale)
        grid = Grid(scale, n, out, data, args.set, args.tax_all, records)
        command = grid_command(args)
        try:
            if not args.report_only:
                train_grid(grid, selected(grid.arms, args.only))
        finally:  # also after a stop: the page shows what has finished so far
            grid.record_finished()
            if page.is_file() and not any(grid.summary(a, 1.0) for a in grid.arms):
                print(f"kept {page}: no run of this grid has finished here or in its records")
            else:
                print(f"wrote {write_results(grid, args.scale, command, page, img_dir)}")
    except UserError as exc:
        print(f"alignment_tax: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
