"""The `saeformer` command: parses arguments and dispatches, nothing more."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saeformer.errors import UserError


def _prepare(args: argparse.Namespace) -> None:
    from saeformer.train.prepare import PrepareConfig, prepare_corpus

    cfg = PrepareConfig(
        out_dir=args.out,
        sources=args.sources,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        max_chars=args.max_chars,
        text_field=args.text_field,
        overwrite=args.overwrite,
    )
    out = prepare_corpus(cfg)
    print(f"prepared token shards in {out}")


def _train(args: argparse.Namespace) -> int:
    from saeformer.train.config import load_config
    from saeformer.train.report import print_summary
    from saeformer.train.trainer import Trainer

    run_dir = args.run_dir or Path("runs") / (args.config.stem if args.config else "run")
    if args.resume:
        cfg = load_config(run_dir / "config.json", args.set)
    elif args.config is None:
        raise UserError("train needs a CONFIG.toml (or --resume with --run-dir)")
    else:
        cfg = load_config(args.config, args.set)
    summary = Trainer(cfg, run_dir, resume=args.resume).run()
    if summary["rank"] == 0:
        print_summary(summary)
    signum = summary["stopped_by_signal"]
    return 0 if signum is None else 128 + signum  # the shell's convention for a signalled stop


def _plot(args: argparse.Namespace) -> None:
    from saeformer.analysis.curves import plot_curves

    print(f"wrote {plot_curves(args.run_dir, args.out)}")


def _posthoc(args: argparse.Namespace) -> int:
    from saeformer.train.posthoc import PosthocTrainer, load_posthoc_config, print_summary

    run_dir = args.run_dir or Path("runs") / (args.config.stem if args.config else "posthoc")
    if args.resume:
        cfg = load_posthoc_config(run_dir / "config.json", args.set)
    elif args.config is None:
        raise UserError("posthoc needs a CONFIG.toml (or --resume with --run-dir)")
    else:
        cfg = load_posthoc_config(args.config, args.set)
    summary = PosthocTrainer(cfg, run_dir, resume=args.resume).run()
    print_summary(summary)
    signum = summary["stopped_by_signal"]
    return 0 if signum is None else 128 + signum


def _compare(args: argparse.Namespace) -> None:
    from saeformer.analysis.compare import compare, load_compare_config, markdown_tables
    from saeformer.atomic import write_json

    cfg = load_compare_config(args.config, args.set)
    rows = compare(cfg)
    print(markdown_tables(rows, cfg.probe), end="")
    if args.json is not None:
        write_json(args.json, rows)
        print(f"wrote {args.json}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per job."""
    parser = argparse.ArgumentParser(
        prog="saeformer",
        description="Pretrain Transformers with TopK sparse bottlenecks; inspect their features.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="turn text into token shards (train/val) and a tokenizer",
        description="Tokenise text into uint16/uint32 shards with a held-out "
        "validation split. Default corpus: the bundled English texts in data/.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    p.add_argument(
        "sources",
        nargs="*",
        default=[],
        help=".txt/.txt.xz/.jsonl/.parquet files or folders, or a HF dataset name",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="an existing tokenizer.json (default: train a byte-level BPE)",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (8192)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="fraction of every source held out for validation (0.02)",
    )
    p.add_argument(
        "--max-chars",
        type=int,
        default=None,
        help="read at most this many characters per source (quick runs)",
    )
    p.add_argument(
        "--text-field", default="text", help="the text column of .jsonl/.parquet/hub sources"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing prepared folder (one that holds a meta.json)",
    )
    p.set_defaults(func=_prepare)

    t = sub.add_parser(
        "train",
        help="train a bottleneck Transformer from a TOML config",
        description="Train from CONFIG.toml into a run directory with "
        "checkpoints, TensorBoard logs and a summary.",
    )
    t.add_argument("config", type=Path, nargs="?", help="the run config (TOML)")
    t.add_argument(
        "--run-dir", type=Path, default=None, help="output directory (default: runs/<config name>)"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its latest checkpoint",
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.lr=3e-4 or model.bottleneck.0.k=64",
    )
    t.set_defaults(func=_train)

    c = sub.add_parser(
        "plot",
        help="plot a run's training curves to a PNG",
        description="Plot loss and per-bottleneck L0, FVU and dead fraction from metrics.jsonl.",
    )
    c.add_argument("run_dir", type=Path, help="the run directory")
    c.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN/curves.png)")
    c.set_defaults(func=_plot)

    h = sub.add_parser(
        "posthoc",
        help="train post-hoc TopK SAEs on a frozen model's activations",
        description="Train TopK SAEs (the bottleneck module at alpha = 1) on activations of a "
        "frozen saeformer run or transformers model, at hook points such as layers.N.output "
        "(= hidden_states[N+1]); exports them in the SAELens layout under RUN/saes/.",
    )
    h.add_argument("config", type=Path, nargs="?", help="the post-hoc config (TOML)")
    h.add_argument(
        "--run-dir", type=Path, default=None, help="output directory (default: runs/<config name>)"
    )
    h.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its checkpoint"
    )
    h.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.lr=3e-4 or sae.0.k=64",
    )
    h.set_defaults(func=_posthoc)

    m = sub.add_parser(
        "compare",
        help="one table of joint bottlenecks and post-hoc SAEs on the same probe text",
        description="Measure FVU, L0, dead %, CE-loss score and KL when spliced in, token "
        "entropy, seed stability and k-sparse probing for every [[entry]] of CONFIG.toml.",
    )
    m.add_argument("config", type=Path, help="the comparison config (TOML)")
    m.add_argument("--json", type=Path, default=None, help="also write all numbers to this file")
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. probe.windows=16",
    )
    m.set_defaults(func=_compare)
    _add_feature_commands(sub)
    return parser


def _snapshot(args: argparse.Namespace) -> None:
    from saeformer.analysis.snapshot import snapshot_checkpoint

    folder = snapshot_checkpoint(args.run_dir, args.step)
    sizes = {
        p.name: sum(f.stat().st_size for f in p.iterdir()) for p in folder.iterdir() if p.is_dir()
    }
    print(f"wrote {folder} ({sum(sizes.values()) / 1e6:.2f} MB)")
    for bid, size in sizes.items():
        print(f"  {bid:<10} {size / 1e6:.2f} MB")


def _evolve(args: argparse.Namespace) -> None:
    from saeformer.analysis.evolve import EvolveConfig, evolve_run

    cfg = EvolveConfig(
        method=args.method,
        exact_max=args.exact_max,
        candidates=args.candidates,
        stable_cos=args.stable_cos,
        split_cos=args.split_cos,
        density_floor=args.density_floor,
    )
    summary = evolve_run(args.run_dir, cfg)
    print(
        f"matched {len(summary['steps'])} snapshots "
        f"(steps {summary['steps'][0]}..{summary['steps'][-1]})"
    )
    for bid, site in summary["sites"].items():
        print(
            f"  {bid:<10} {site['method']} matching, F = {site['features']}, "
            f"stable at the end {site['stable_frac_final']:.1%}, {site['seconds']:.1f} s"
        )
    print(
        f"wrote {args.run_dir / 'evolution'} (Parquet per site) "
        f"and {args.run_dir / 'tb' / 'evolve'} (TensorBoard)"
    )


def _report(args: argparse.Namespace) -> None:
    from saeformer.analysis.report import ReportConfig, build_report, folder_bytes

    page = build_report(
        args.run_dir,
        ReportConfig(out=args.out, cards=args.cards, all_cards=args.all, compare=args.compare),
    )
    print(
        f"wrote {page} ({folder_bytes(page.parent) / 1e6:.2f} MB); "
        f"open it from disk: {page.resolve().as_uri()}"
    )


def _sample_config(args: argparse.Namespace):
    from saeformer.analysis.generate import SampleConfig

    return SampleConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )


def _steer(args: argparse.Namespace) -> None:
    from saeformer import load_run
    from saeformer.analysis.generate import Clamp, check_clamp, generate

    run = load_run(args.run_dir, args.step)
    clamp = Clamp(args.bottleneck, args.feature, args.value)
    check_clamp(run.model, clamp)
    cfg = _sample_config(args)
    print(f"prompt:    {args.prompt!r}")
    print(f"unsteered: {generate(run.model, run.tokenizer, args.prompt, cfg)!r}")
    steered = generate(run.model, run.tokenizer, args.prompt, cfg, clamp)
    print(f"steered:   {steered!r}  ({args.bottleneck} feature {args.feature} = {args.value})")


def _generate(args: argparse.Namespace) -> None:
    from saeformer import load_run
    from saeformer.analysis.generate import generate

    run = load_run(args.run_dir, args.step)
    print(args.prompt + generate(run.model, run.tokenizer, args.prompt, _sample_config(args)))


def _inspect(args: argparse.Namespace) -> None:
    from saeformer import load_run
    from saeformer.analysis.inspect import format_inspection, inspect_text

    run = load_run(args.run_dir, args.step)
    rows = inspect_text(run.model, run.tokenizer, args.text, args.top, args.bottleneck)
    print(format_inspection(rows))


def _eval(args: argparse.Namespace) -> None:
    from saeformer import load_run
    from saeformer.analysis.generate import perplexity

    run = load_run(args.run_dir, args.step)
    result = perplexity(run.model, run.tokenizer, args.file, args.max_tokens)
    print(
        f"{args.file}: {result['tokens']:,} tokens, CE {result['ce']:.4f} nats/token, "
        f"perplexity {result['perplexity']:.2f} (step {run.checkpoint.name.removeprefix('step_')})"
    )


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (40)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy (0.8)"
    )
    p.add_argument(
        "--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all (50)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")


def _add_feature_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands that look at a trained run's features: snapshots, evolution, report, steering."""
    p = sub.add_parser(
        "snapshot",
        help="snapshot every bottleneck's features from a checkpoint",
        description="Write RUN/snapshots/step_N/<bottleneck>/ (features.safetensors, meta.json) "
        "from a checkpoint, on the run's probe set (stored once under RUN/snapshots/probe).",
    )
    _run_arguments(p)
    p.set_defaults(func=_snapshot)

    p = sub.add_parser(
        "evolve",
        help="match features across a run's snapshots: births, stability, splits, merges",
        description="Match features between consecutive snapshots and to the final one on "
        "decoder-row cosine; write RUN/evolution/<bottleneck>.parquet and TensorBoard scalars.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run directory")
    p.add_argument(
        "--method",
        choices=("auto", "hungarian", "sparse", "mnn"),
        default="auto",
        help="auto: exact Hungarian up to --exact-max features, sparse bipartite matching above",
    )
    p.add_argument("--exact-max", type=int, default=4096, help="largest F for Hungarian (4096)")
    p.add_argument("--candidates", type=int, default=8, help="candidates per feature, sparse (8)")
    p.add_argument("--stable-cos", type=float, default=0.9, help="cosine to final that is stable")
    p.add_argument("--split-cos", type=float, default=0.5, help="cosine of split/merge partners")
    p.add_argument(
        "--density-floor", type=float, default=1e-4, help="firing frequency that counts as alive"
    )
    p.set_defaults(func=_evolve)

    p = sub.add_parser(
        "report",
        help="write a browsable HTML report of a run's features (opens from disk)",
        description="Write RUN/report/report.html with data files beside it: run summary, "
        "feature browser, feature cards and evolution plots (snapshots and evolves when needed).",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN", help="the run directory")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: RUN/report)")
    p.add_argument(
        "--cards", type=int, default=100, help="full cards per bottleneck, densest first"
    )
    p.add_argument("--all", action="store_true", help="a full card for every feature")
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="ROWS.json",
        help="add the tables of `saeformer compare --json ROWS.json` as a section",
    )
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "steer",
        help="generate with one feature clamped, beside the unsteered text",
        description="Continue PROMPT twice with the same seed: unsteered, and with a feature of "
        "one bottleneck held at --value on every token.",
    )
    _run_arguments(p)
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--bottleneck", required=True, help="bottleneck id, e.g. resid.2")
    p.add_argument("--feature", type=int, required=True, help="feature id")
    p.add_argument("--value", type=float, required=True, help="activation to clamp it at")
    _sampling_arguments(p)
    p.set_defaults(func=_steer)

    p = sub.add_parser("generate", help="continue a prompt", description="Sample a continuation.")
    _run_arguments(p)
    p.add_argument("prompt", help="the text to continue")
    _sampling_arguments(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "inspect",
        help="show which features fire on each token of a text",
        description="Print, token by token, the strongest features of each bottleneck as id:value.",
    )
    _run_arguments(p)
    p.add_argument("text", help="the text to inspect (its first model.context tokens)")
    p.add_argument("--top", type=int, default=5, help="features shown per token and bottleneck (5)")
    p.add_argument(
        "--bottleneck", action="append", default=None, help="only this bottleneck (repeatable)"
    )
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "eval",
        help="perplexity on a text file",
        description="Mean CE and perplexity on a UTF-8 file.",
    )
    _run_arguments(p)
    p.add_argument("file", type=Path, help="a UTF-8 text file")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.set_defaults(func=_eval)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the subcommand; bad input is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"saeformer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saeformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
