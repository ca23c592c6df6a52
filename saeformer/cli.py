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
    return parser


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
