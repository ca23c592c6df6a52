"""Training curves of a run (from its metrics.jsonl) as one PNG figure."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from saeformer.errors import UserError


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalar series by tag from metrics.jsonl; a resumed step's later value wins."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl (not a run directory?)")
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        step = record.pop("step")
        record.pop("tokens", None)
        for tag, value in record.items():
            series[tag][step] = value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Plot loss, and per bottleneck L0, FVU and dead fraction; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    sites = sorted(
        {tag.split("/")[0] for tag in series if tag.split("/")[0][:5] in ("resid", "mlp.")}
    )
    panels = [("loss", ["train/loss", "val/loss"])] + [
        (metric, [f"{bid}/{metric}" for bid in sites]) for metric in ("l0", "fvu", "dead_frac")
    ]
    panels = [(title, [t for t in tags if t in series]) for title, tags in panels]
    panels = [(title, tags) for title, tags in panels if tags]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, tags) in zip(axes[0], panels, strict=True):
        for tag in tags:
            steps, values = zip(*series[tag], strict=True)
            ax.plot(steps, values, label=tag, marker="o" if tag.startswith("val") else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = out or run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
