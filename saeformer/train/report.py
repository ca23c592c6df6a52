"""The end-of-run summary printed to the terminal."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(summary: dict[str, Any]) -> None:
    """Print validation loss, per-site L0/FVU/dead fraction, throughput and output paths."""
    print(f"\nrun finished at step {summary['step']} ({summary['tokens']:,} tokens)")
    print(f"  validation loss   {_fmt(summary['val_loss'], '.4f')}")
    print(f"  throughput        {_fmt(summary['tokens_per_s'], ',.0f')} tokens/s")
    dead_t = summary["dead_threshold_tokens"]
    for bid, site in summary["sites"].items():
        print(
            f"  {bid:<8}  L0 {_fmt(site['l0'], '.1f')} (k = {site['k']})  "
            f"FVU {_fmt(site['fvu'], '.3f')}  dead {_fmt(site['dead_frac'], '.1%')} "
            f"(no firing in {dead_t:,} tokens)"
        )
    print(f"  TensorBoard       tensorboard --logdir {summary['tensorboard']}")
    print(f"  checkpoint        {summary['checkpoint']}")
