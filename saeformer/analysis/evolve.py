"""Feature evolution across a run's snapshots: lineages, birth, stabilisation, splits, merges.

Features are matched between consecutive snapshots (their lineage) and from every snapshot to
the final one (their stability); results go to `RUN/evolution/<bid>.parquet` (one row per final
feature), `RUN/evolution/<bid>.steps.parquet` (one row per snapshot) and TensorBoard.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saeformer.analysis.matching import Matching, match_features, pairs_above
from saeformer.analysis.snapshot import list_snapshots, load_snapshot, snapshot_bottlenecks
from saeformer.atomic import atomic_dir, write_json
from saeformer.errors import UserError

LOG_DENSITY_BINS = np.linspace(-6.0, 0.0, 25)  # log10 firing frequency, for the histograms


@dataclass
class EvolveConfig:
    """How features are matched and what counts as born, stable, split or merged."""

    method: str = "auto"  # auto, hungarian, sparse or mnn
    exact_max: int = 4096  # auto: Hungarian up to this F, sparse matching above
    candidates: int = 8  # candidates per feature for the sparse matching
    stable_cos: float = 0.9  # stable from the step whose cosine to final stays ≥ this
    split_cos: float = 0.5  # one-to-many partners above this cosine: a split or a merge
    density_floor: float = 1e-4  # alive: fires on at least this fraction of probe tokens


@dataclass
class SiteEvolution:
    """Everything derived for one bottleneck: per-feature and per-snapshot tables."""

    features: pd.DataFrame
    steps: pd.DataFrame
    method: str


def centred(decoder: np.ndarray) -> np.ndarray:
    """Decoder rows minus their mean row: a direction all features share (large at mlp sites,
    whose W_down columns have mean pairwise cosine ≈ 0.4) must not make features look alike."""
    return decoder - decoder.mean(axis=0, keepdims=True)


def from_then_on(mask: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per column of mask [S, F]: the first step from which it stays True to the end, else -1."""
    trailing = np.cumprod(mask[::-1], axis=0).sum(axis=0)
    first = len(steps) - trailing
    return np.where(trailing > 0, steps[np.minimum(first, len(steps) - 1)], -1)


def lineage(targets: list[np.ndarray], width: int) -> np.ndarray:
    """Ancestors [S, F] of each final feature along consecutive matchings (-1: broken)."""
    ancestors = np.full((len(targets) + 1, width), -1, dtype=np.int64)
    ancestors[-1] = np.arange(width)
    for s in range(len(targets) - 1, -1, -1):
        inverse = np.full(width, -1, dtype=np.int64)
        ok = targets[s] >= 0
        inverse[targets[s][ok]] = np.flatnonzero(ok)
        later = ancestors[s + 1]
        ancestors[s] = np.where(later >= 0, inverse[np.maximum(later, 0)], -1)
    return ancestors


def self_partners(x: np.ndarray, threshold: float) -> np.ndarray:
    """How many rows of X (itself included) lie within `threshold` cosine of each row."""
    return np.bincount(pairs_above(x, x, threshold)[0], minlength=len(x))


def one_to_many(
    a: np.ndarray,
    b: np.ndarray,
    threshold: float,
    own_a: np.ndarray | None = None,
    own_b: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits (rows of A) and merges (rows of B) between consecutive decoders A and B.

    A splits when more rows of B than of A itself lie within `threshold` cosine of it (and at
    least two do): its direction is now shared by more features. Merges are the mirror image.
    Near-duplicate features that persist unchanged are therefore no event. `own_a`/`own_b`
    are `self_partners` of A and B when already known.
    """
    i, j = pairs_above(a, b, threshold)
    ahead, behind = np.bincount(i, minlength=len(a)), np.bincount(j, minlength=len(b))
    own_a = self_partners(a, threshold) if own_a is None else own_a
    own_b = self_partners(b, threshold) if own_b is None else own_b
    return (ahead >= 2) & (ahead > own_a), (behind >= 2) & (behind > own_b)


def _gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[s, index[s, f]] per snapshot, NaN where the index is -1."""
    picked = np.take_along_axis(values, np.maximum(index, 0), axis=1).astype(np.float64)
    return np.where(index >= 0, picked, np.nan)


@dataclass
class _Trajectories:
    """What one pass over a bottleneck's snapshots collects (S snapshots, F features)."""

    steps: np.ndarray  # [S]
    tokens: list[int]
    density: np.ndarray  # [S, F] by feature id at each snapshot
    entropy: np.ndarray  # [S, F]
    to_final: list[Matching]  # S matchings, each snapshot → the final one
    consecutive: list[Matching]  # S − 1 matchings, snapshot s → s + 1
    splits: np.ndarray  # [S − 1, F] features at s with ≥ 2 partners at s + 1
    merges: np.ndarray  # [S − 1, F] features at s + 1 with ≥ 2 partners at s


def _collect(run_dir: Path, bid: str, steps: list[int], cfg: EvolveConfig) -> _Trajectories:
    """Stream the snapshots once, keeping two decoders in memory besides the final one."""
    final = load_snapshot(run_dir, steps[-1], bid)
    final_dec = centred(final.tensors["decoder"].float().numpy())
    width = len(final_dec)
    density, entropy, tokens, to_final, consecutive, splits, merges = [], [], [], [], [], [], []
    previous = own_previous = None
    for step in steps:
        snap = final if step == steps[-1] else load_snapshot(run_dir, step, bid)
        dec = centred(snap.tensors["decoder"].float().numpy())
        if len(dec) != width:
            raise UserError(f"{bid}: snapshot of step {step} has {len(dec)} features, not {width}")
        density.append(snap.tensors["frequency"].numpy())
        entropy.append(snap.tensors["token_entropy"].numpy())
        tokens.append(int(snap.meta.get("tokens", 0)))
        to_final.append(_match(dec, final_dec, cfg) if step != steps[-1] else _identity(width))
        own = self_partners(dec, cfg.split_cos)
        if previous is not None:
            consecutive.append(_match(previous, dec, cfg))
            split, merge = one_to_many(previous, dec, cfg.split_cos, own_previous, own)
            splits.append(split)
            merges.append(merge)
        previous, own_previous = dec, own
    empty = np.zeros((0, width), dtype=bool)
    return _Trajectories(
        steps=np.asarray(steps),
        tokens=tokens,
        density=np.stack(density),
        entropy=np.stack(entropy),
        to_final=to_final,
        consecutive=consecutive,
        splits=np.stack(splits) if splits else empty,
        merges=np.stack(merges) if merges else empty,
    )


def _identity(width: int) -> Matching:
    """The final snapshot matched to itself."""
    return Matching("identity", np.arange(width), np.ones(width, dtype=np.float32))


def _match(a: np.ndarray, b: np.ndarray, cfg: EvolveConfig) -> Matching:
    return match_features(a, b, cfg.method, exact_max=cfg.exact_max, candidates=cfg.candidates)


def cosine_to_final(to_final: list[Matching], width: int) -> np.ndarray:
    """[S, F]: cosine between final feature f and its partner at snapshot s (NaN: none)."""
    out = np.full((len(to_final), width), np.nan)
    for s, match in enumerate(to_final):
        ok = match.target >= 0
        out[s, match.target[ok]] = match.cosine[ok]
    return out


def evolve_site(run_dir: Path, bid: str, steps: list[int], cfg: EvolveConfig) -> SiteEvolution:
    """Match one bottleneck's snapshots and derive its per-feature and per-step tables."""
    t = _collect(run_dir, bid, steps, cfg)
    width = t.density.shape[1]
    ancestors = lineage([m.target for m in t.consecutive], width)
    cos_final = cosine_to_final(t.to_final, width)
    stable = np.nan_to_num(cos_final) >= cfg.stable_cos
    density, entropy = _gather(t.density, ancestors), _gather(t.entropy, ancestors)
    alive = density >= max(cfg.density_floor, np.finfo(float).tiny)
    features = pd.DataFrame(
        {
            "feature": np.arange(width),
            "birth_step": from_then_on(alive, t.steps),
            "stable_step": from_then_on(stable, t.steps),
            "density": t.density[-1],
            "token_entropy": t.entropy[-1],
            "n_splits": (_gather(t.splits, ancestors[:-1]) == 1).sum(axis=0),
            "n_merges": (_gather(t.merges, ancestors[1:]) == 1).sum(axis=0),
            "ancestor": list(ancestors.T),
            "density_trajectory": list(density.T),
            "entropy_trajectory": list(entropy.T),
            "cos_to_final": list(cos_final.T),
        }
    )
    steps = pd.DataFrame(
        {
            "step": t.steps,
            "tokens": t.tokens,
            "stable_frac": stable.mean(axis=1),
            "dead_frac": (t.density == 0).mean(axis=1),
            "median_token_entropy": [_nanmedian(e) for e in t.entropy],
            "mean_cos_to_previous": [np.nan] + [float(np.nanmean(m.cosine)) for m in t.consecutive],
            "splits": [0] + t.splits.sum(axis=1).tolist(),
            "merges": [0] + t.merges.sum(axis=1).tolist(),
            "log10_density_hist": [
                np.histogram(np.log10(d[d > 0]), bins=LOG_DENSITY_BINS)[0] for d in t.density
            ],
        }
    )
    method = t.consecutive[-1].method if t.consecutive else "none (one snapshot)"
    return SiteEvolution(features=features, steps=steps, method=method)


def _nanmedian(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if len(finite) else float("nan")


def evolve_run(run_dir: Path, cfg: EvolveConfig | None = None) -> dict[str, Any]:
    """Evolve every bottleneck of a run; write Parquet tables, TensorBoard scalars, a summary."""
    from torch.utils.tensorboard import SummaryWriter

    cfg = cfg or EvolveConfig()
    run_dir = Path(run_dir)
    steps = list_snapshots(run_dir)
    if not steps:
        raise UserError(
            f"{run_dir} has no snapshots: set [snapshot] every in the config, "
            "or run `saeformer snapshot RUN --step N`"
        )
    summary: dict[str, Any] = {"steps": steps, "config": asdict(cfg), "sites": {}}
    with atomic_dir(run_dir / "evolution") as out, atomic_dir(run_dir / "tb" / "evolve") as tb:
        writer = SummaryWriter(str(tb))
        for bid in snapshot_bottlenecks(run_dir, steps[-1]):
            started = time.perf_counter()
            site = evolve_site(run_dir, bid, steps, cfg)
            site.features.to_parquet(out / f"{bid}.parquet", index=False)
            site.steps.to_parquet(out / f"{bid}.steps.parquet", index=False)
            _log_site(writer, bid, site.steps)
            summary["sites"][bid] = {
                "method": site.method,
                "features": len(site.features),
                "stable_frac_final": float(site.steps["stable_frac"].iloc[-1]),
                "seconds": round(time.perf_counter() - started, 3),
            }
        writer.close()
        write_json(out / "summary.json", summary)
    return summary


def _log_site(writer: Any, bid: str, steps: pd.DataFrame) -> None:
    """Per-snapshot curves and log-density histograms, tagged by bottleneck id."""
    for row in steps.itertuples():
        for tag in ("stable_frac", "dead_frac", "median_token_entropy", "splits", "merges"):
            writer.add_scalar(f"{bid}/{tag}", getattr(row, tag), row.step)
        centres = (LOG_DENSITY_BINS[:-1] + LOG_DENSITY_BINS[1:]) / 2
        if row.log10_density_hist.sum():
            writer.add_histogram(
                f"{bid}/log10_density", np.repeat(centres, row.log10_density_hist), row.step
            )


def read_evolution(run_dir: Path, bid: str) -> SiteEvolution:
    """Read the tables `evolve_run` wrote for one bottleneck."""
    folder = Path(run_dir) / "evolution"
    try:
        features = pd.read_parquet(folder / f"{bid}.parquet")
        steps = pd.read_parquet(folder / f"{bid}.steps.parquet")
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        raise UserError(f"no evolution of {bid} in {folder}: run `saeformer evolve`") from None
    return SiteEvolution(features=features, steps=steps, method=summary["sites"][bid]["method"])
