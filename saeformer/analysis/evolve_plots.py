"""Evolution plots of one bottleneck (matplotlib PNG): stability, density, entropy, births."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saeformer.analysis.evolve import LOG_DENSITY_BINS, SiteEvolution


def plot_site_evolution(site: SiteEvolution, bid: str, out: Path) -> Path:
    """Four panels over training steps; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = site.steps["step"].to_numpy()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    ax = axes[0]
    ax.plot(steps, site.steps["stable_frac"], marker="o", ms=3, label="stable (cos to final ≥ τ)")
    ax.plot(steps, site.steps["dead_frac"], marker="o", ms=3, label="dead on the probe set")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("fraction of features")
    ax.legend(fontsize=7)

    ax = axes[1]
    hist = np.stack(site.steps["log10_density_hist"].to_numpy()).T.astype(float)
    hist /= np.maximum(hist.sum(axis=0, keepdims=True), 1)
    edges = _step_edges(steps)
    mesh = ax.pcolormesh(edges, LOG_DENSITY_BINS, hist, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="share of live features")
    occupied = np.flatnonzero(hist.sum(axis=1))
    if len(occupied):
        ax.set_ylim(LOG_DENSITY_BINS[occupied[0]], 0)
    ax.set_ylabel("log10 firing frequency")
    ax.set_title("density histogram")

    ax = axes[2]
    ax.plot(steps, site.steps["median_token_entropy"], marker="o", ms=3)
    ax.set_ylabel("bits")
    ax.set_title("median token entropy (top activations)")

    ax = axes[3]
    births = site.features["birth_step"].to_numpy()
    stable = site.features["stable_step"].to_numpy()
    ax.hist([births[births >= 0], stable[stable >= 0]], bins=edges, label=["birth", "stable"])
    ax.set_title("features born / stabilised at step")
    ax.legend(fontsize=7)

    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if steps.min() > 0 and steps.max() / steps.min() > 50:
            ax.set_xscale("log")
    fig.suptitle(f"{bid}: feature evolution ({site.method} matching)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each snapshot step, for the histogram image."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[:-1] + steps[1:]) / 2
    first = max(steps[0] - (mids[0] - steps[0]), steps[0] / 2)
    return np.concatenate([[first], mids, [steps[-1] + (steps[-1] - mids[-1])]])
