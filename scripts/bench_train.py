"""Training-step time of the bottleneck model against its dense twin, interleaved in one process.

Three `Trainer`s are built side by side: the dense twin, the bottleneck model as configured
(AuxK and the reconstruction loss on in the demo config: a second, detached encoder pass per
resid site) and the same model with `strategy.aux_coef = 0` and `strategy.rec_coef = 0`.
Each round runs one `train_step` of each, in rotating order, so that load from other
processes hits all alike; the table gives median step times and their ratios to the dense
twin. Steady state: the step counter starts past the α fade-in and k annealing (α = 1, final
k), and before every step a fixed `--dead-frac` of each site's latents is marked dead, as in a
trained run, so AuxK selects from them.

    PYTHONPATH=. python scripts/bench_train.py --data /tmp/lead_prep     # CPU, the demo size
    PYTHONPATH=. python scripts/bench_train.py --device cuda --data data/prepared/fineweb-edu

`--device cuda` runs GPT-2-small dims (configs/gpt2-small.toml) with two resid bottlenecks of
F = 8·d and k = 32, bf16 autocast and per-block torch.compile, and adds MFU. Results go to stdout
and to this script's section of docs/benchmarks.md (`--doc`, `--no-doc`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_kernels import DOC, Report, _Parser, load_average, machine, record
from tqdm import tqdm

from saeformer.errors import UserError
from saeformer.train.config import RunConfig, load_config
from saeformer.train.flops import bottleneck_flops_per_token, dense_flops_per_token, peak_flops
from saeformer.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "cpu": {
        "config": ROOT / "configs" / "tiny-cpu.toml",
        "dense_config": ROOT / "configs" / "tiny-cpu-dense.toml",
        "overrides": [],
        "warmup": 2,
        "target": 1.15,
    },
    "cuda": {
        "config": ROOT / "configs" / "gpt2-small.toml",
        "dense_config": None,  # the same config with model.bottleneck = []
        "overrides": [
            "train.device=cuda",
            "train.dtype=bf16",
            "train.compile=true",
            "train.batch_size=32",
            "train.grad_accum=1",
            *(f"model.bottleneck.{i}.{key}" for i in (0, 1) for key in ("width=6144", "k=32")),
        ],
        "warmup": 5,
        "target": 1.10,
    },
}
"""Per-device defaults; targets are issue 7's (step time relative to the dense twin)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; config defaults depend on the device."""
    p = _Parser(prog="bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=list(PRESETS), default="cpu")
    p.add_argument("--config", type=Path, help="bottleneck model config (cpu: tiny-cpu.toml)")
    p.add_argument(
        "--dense-config",
        type=Path,
        help="dense twin config (cpu: tiny-cpu-dense.toml; cuda: --config without bottlenecks)",
    )
    p.add_argument("--data", type=Path, help="prepared data directory (sets data.dir)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every model (repeatable)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, help="untimed rounds (cpu: 2; cuda: 5, for compile)")
    p.add_argument(
        "--dead-frac",
        type=float,
        default=0.5,
        help="fraction of latents kept dead (default 0.5; the 300-step demo ends "
        "with 0.57 and 0.31)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--profile", action="store_true", help="also profile one step of each")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file to record results in")
    p.add_argument("--no-doc", action="store_true", help="print only; leave --doc untouched")
    args = p.parse_args(argv)
    preset = PRESETS[args.device]
    args.config = args.config or preset["config"]
    args.dense_config = args.dense_config or preset["dense_config"]
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    if args.repeats < 1 or args.warmup < 0 or args.threads < 0:
        p.error("--repeats must be positive, --warmup and --threads non-negative")
    if not 0 <= args.dead_frac <= 1:
        p.error(f"--dead-frac must be in [0, 1], got {args.dead_frac}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; run it on a GPU machine")
    return args


def variant_configs(args: argparse.Namespace) -> dict[str, RunConfig]:
    """The dense twin, the bottleneck model as configured, and the same without AuxK."""
    common = [*PRESETS[args.device]["overrides"], *args.overrides]
    if args.data is not None:
        common.append(f"data.dir={args.data}")
    if args.threads:
        common.append(f"train.threads={args.threads}")
    if args.dense_config is None:
        dense = load_config(args.config, [*common, "model.bottleneck=[]"])
    else:
        dense = load_config(args.dense_config, common)
    configs = {"dense twin": dense, "bottleneck, AuxK on": load_config(args.config, common)}
    if configs["bottleneck, AuxK on"].strategy.aux_coef <= 0:
        raise UserError(f"{args.config}: strategy.aux_coef is 0; the AuxK-on row needs it > 0")
    configs["bottleneck, AuxK off"] = load_config(
        args.config, [*common, "strategy.aux_coef=0", "strategy.rec_coef=0"]
    )
    return configs


class Variant:
    """A Trainer at steady state, with a fixed set of dead latents per bottleneck."""

    def __init__(self, cfg: RunConfig, run_dir: Path, dead_frac: float) -> None:
        self.trainer = Trainer(cfg, run_dir)
        s = cfg.strategy
        self.trainer.progress.step = max(s.alpha_warmup_steps, s.k_anneal_steps)
        self.dead_tokens = s.dead_tokens
        gen = torch.Generator().manual_seed(0)
        self.dead = {
            bid: (torch.rand(len(c), generator=gen) < dead_frac).to(c.device)
            for bid, c in self.trainer.since_fired.items()
        }
        self.tokens = cfg.train.batch_size * cfg.model.context
        self.flops = dense_flops_per_token(cfg.model) + bottleneck_flops_per_token(cfg.model)

    def step(self) -> float:
        """One optimizer step, in milliseconds (the dead-latent counters are reset untimed)."""
        for bid, counter in self.trainer.since_fired.items():
            counter.copy_(torch.where(self.dead[bid], self.dead_tokens, 0))
        device = self.trainer.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        self.trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3


def run_rounds(variants: dict[str, Variant], args: argparse.Namespace) -> dict[str, list[float]]:
    """Warm-up rounds, then timed rounds; each round runs every variant once, order rotated."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    total = args.warmup + args.repeats
    for r in tqdm(range(total), desc="rounds", unit="round"):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            ms = variants[name].step()
            if r >= args.warmup:
                times[name].append(ms)
    return times


def table(variants: dict[str, Variant], times: dict[str, list[float]], args) -> list[str]:
    """Median step time, ratio to the dense twin (and the spread of per-round ratios)."""
    base_name = next(iter(variants))
    base = statistics.median(times[base_name])
    device = next(iter(variants.values())).trainer.device
    peak = peak_flops(device)
    lines = [
        f"# median of {args.repeats} interleaved rounds; dead latents {args.dead_frac:.0%} of each "
        "site; ratios to the dense twin; per-round ratio quartiles",
        f"# {'model':22} {'step ms':>9} {'ratio':>7} {'quartiles':>13} {'FLOP ratio':>10} "
        f"{'tokens/s':>9}" + (f" {'MFU':>6}" if peak else ""),
    ]
    dense_flops = variants[base_name].flops
    for name, variant in variants.items():
        ms = statistics.median(times[name])
        per_round = [a / b for a, b in zip(times[name], times[base_name], strict=True)]
        q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [ms / base] * 3
        tok_s = variant.tokens / ms * 1e3
        line = (
            f"  {name:22} {ms:9.1f} {ms / base:6.3f}x {q1:6.3f}-{q3:5.3f} "
            f"{variant.flops / dense_flops:10.3f} {tok_s:9.0f}"
        )
        if peak:
            line += f" {tok_s * variant.flops / peak:6.1%}"
        lines.append(line)
    return lines


def verdicts(times: dict[str, list[float]], args: argparse.Namespace) -> list[str]:
    """Issue 7's step-time target for each bottleneck row."""
    names = list(times)
    base = statistics.median(times[names[0]])
    target = PRESETS[args.device]["target"]
    out = []
    for name in names[1:]:
        ratio = statistics.median(times[name]) / base
        verdict = "met" if ratio <= target else "missed"
        out.append(f"{name}: {ratio:.3f}x the dense twin (target <= {target:g}x: {verdict})")
    return out


def profile(variants: dict[str, Variant]) -> None:
    """Print the ops that take the most time in one step of each variant (not recorded)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, variant in variants.items():
        activities = [ProfilerActivity.CPU]
        if variant.trainer.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with torch_profile(activities=activities) as prof:
            variant.step()
        sort = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
        print(f"# profile: {name}")
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40))


def main(argv: list[str] | None = None) -> int:
    """Build the three trainers, time them interleaved, print and record the table."""
    args = parse_args(argv)
    try:
        configs = variant_configs(args)
        with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
            variants = {
                name: Variant(cfg, Path(tmp) / f"run{i}", args.dead_frac)
                for i, (name, cfg) in enumerate(configs.items())
            }
            device = variants["dense twin"].trainer.device
            say = Report()
            header = [
                f"machine: {machine(device)}",
                f"load average (1 min) at start: {load_average()}",
            ]
            times = run_rounds(variants, args)
            for line in table(variants, times, args):
                say(line)
            results = [f"load average (1 min) at end: {load_average()}", *verdicts(times, args)]
            for line in results:
                tqdm.write(line)
            if args.profile:
                profile(variants)
    except UserError as err:
        print(f"bench_train: {err}", file=sys.stderr)
        return 1
    model = configs["bottleneck, AuxK on"].model
    sites = ", ".join(f"{b.id} F={b.width} k={b.k}" for b in model.bottleneck)
    title = f"Training step, bottleneck model vs dense twin ({device.type})"
    header += [
        f"model: {model.n_layers} layers, d={model.d_model}, context {model.context}, "
        f"batch {configs['dense twin'].train.batch_size}; {sites}",
        f"AuxK on: each resid site runs a second, detached encoder pass (dense matmul, top-k, "
        f"top-{configs['bottleneck, AuxK on'].strategy.k_aux} over the dead latents) and an "
        "AuxK decode",
        *results,
    ]
    record(
        None if args.no_doc else args.doc,
        "bench_train.py",
        argv,
        f"bench_train-{device.type}" + (f"-{args.threads}t" if args.threads else ""),
        title,
        header,
        say.lines,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
