"""Feature snapshots: per-feature statistics of every bottleneck on a fixed probe set.

Layout (DESIGN.md, Data flow): `RUN/snapshots/probe/` holds the probe set once per run;
`RUN/snapshots/step_<N>/<bid>/` holds `features.safetensors` and `meta.json`. A step folder is
built beside its final name and renamed into place, so a snapshot exists whole or not at all.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from saeformer.analysis.metrics import firing_counts, token_entropy
from saeformer.atomic import atomic_dir, write_json
from saeformer.errors import UserError
from saeformer.model import Transformer
from saeformer.train.config import RunConfig
from saeformer.train.data import TokenData, fixed_windows
from saeformer.train.schedules import bottleneck_schedule

FORMAT = "saeformer-snapshot/1"
FEATURES_FILE = "features.safetensors"
PROBE_FILE = "probe.safetensors"
STEP_DIR = re.compile(r"^step_(\d+)$")
BOTTLENECK_ID = re.compile(r"^(resid|mlp)\.\d+$")
N_PROMOTED = 10  # output tokens kept per feature, by direct-path logit
GATHER_BUDGET = 1 << 22  # elements per chunk when gathering window activations
LOGIT_CHUNK = 1024  # decoder rows per chunk when projecting through the unembedding


@dataclass
class Snapshot:
    """One bottleneck's snapshot: its meta.json and its tensors."""

    meta: dict[str, Any]
    tensors: dict[str, Tensor]


def snapshot_root(run_dir: Path) -> Path:
    """The folder that holds a run's probe set and snapshots."""
    return Path(run_dir) / "snapshots"


def snapshot_due(step: int, cfg: RunConfig) -> bool:
    """Whether training writes a snapshot after `step` (every N, log-spaced, and the last)."""
    snap = cfg.snapshot
    if snap.every <= 0 and not snap.log_spaced:
        return False
    every = snap.every > 0 and step % snap.every == 0
    log_spaced = snap.log_spaced and step > 0 and step & (step - 1) == 0
    return every or log_spaced or step == cfg.train.steps


# ----- the probe set --------------------------------------------------------------------------


def load_probe(run_dir: Path) -> Tensor | None:
    """The run's stored probe windows [P, T+1] (inputs and next tokens), or None."""
    file = snapshot_root(run_dir) / "probe" / PROBE_FILE
    if not file.is_file():
        return None
    try:
        return load_file(file)["tokens"].long()
    except (SafetensorError, KeyError, OSError) as exc:
        raise UserError(f"cannot read probe set {file}: {exc}") from None


def ensure_probe(run_dir: Path, cfg: RunConfig, data: TokenData | None = None) -> Tensor:
    """Load the run's probe set, or cut it from the validation split and store it once."""
    tokens = load_probe(run_dir)
    if tokens is not None:
        return tokens
    data = data or TokenData(cfg.data.dir)
    val = data.split("val")
    x, y = fixed_windows(val, cfg.model.context, cfg.snapshot.probe_windows)
    tokens = torch.cat([x, y[:, -1:]], dim=1)
    with atomic_dir(snapshot_root(run_dir) / "probe") as tmp:
        save_file({"tokens": tokens.to(torch.int32).contiguous()}, tmp / PROBE_FILE)
        write_json(
            tmp / "meta.json",
            {
                "format": FORMAT,
                "windows": tokens.shape[0],
                "context": cfg.model.context,
                "tokens": tokens.shape[0] * cfg.model.context,
                "source": f"{cfg.data.dir} (val split, evenly spaced windows)",
            },
        )
    return tokens


# ----- per-feature statistics -----------------------------------------------------------------


@torch.no_grad()
def probe_codes(
    model: Transformer,
    probe: Tensor,
    alpha: dict[str, float],
    ks: dict[str, int],
    batch: int,
) -> tuple[float, dict[str, dict[str, Any]]]:
    """Forward the probe set; return its mean CE and per bottleneck the codes and L0/FVU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, sites = [], {}
    for i in range(0, len(probe), batch):
        rows = probe[i : i + batch].to(device)
        out = model(rows[:, :-1], rows[:, 1:], alpha=alpha, k=ks, keep_codes=True)
        losses.append(out.loss.item() * len(rows))
        for bid, site in out.sites.items():
            acc = sites.setdefault(bid, {"values": [], "indices": [], "l0": [], "fvu": []})
            acc["values"].append(site.values.float().cpu())
            acc["indices"].append(site.indices.cpu())
            acc["l0"].append(site.l0.item())
            if site.fvu is not None:
                acc["fvu"].append(site.fvu.item())
    model.train(was_training)
    codes = {
        bid: {
            "values": torch.cat(acc["values"]),
            "indices": torch.cat(acc["indices"]),
            "l0": sum(acc["l0"]) / len(acc["l0"]),
            "fvu": sum(acc["fvu"]) / len(acc["fvu"]) if acc["fvu"] else None,
        }
        for bid, acc in sites.items()
    }
    return sum(losses) / len(probe), codes


def top_activations(values: Tensor, indices: Tensor, width: int, m: int) -> tuple[Tensor, Tensor]:
    """Each feature's m largest activations [F, m] and their token positions (-1: none)."""
    n, k = values.shape
    flat_v, flat_f = values.reshape(-1), indices.reshape(-1)
    flat_p = torch.arange(n).repeat_interleave(k)
    fired = flat_v > 0
    v, f, p = flat_v[fired], flat_f[fired], flat_p[fired]
    order = torch.sort(v, descending=True, stable=True).indices
    v, f, p = v[order], f[order], p[order]
    order = torch.sort(f, stable=True).indices
    v, f, p = v[order], f[order], p[order]
    counts = torch.bincount(f, minlength=width)
    rank = torch.arange(len(f)) - (counts.cumsum(0) - counts)[f]
    keep = rank < m
    top_v = torch.zeros(width, m)
    top_p = torch.full((width, m), -1, dtype=torch.long)
    top_v[f[keep], rank[keep]] = v[keep]
    top_p[f[keep], rank[keep]] = p[keep]
    return top_v, top_p


def window_index(positions: Tensor, context: int, window: int) -> tuple[Tensor, Tensor]:
    """Flat token positions ±window around `positions` [...], and whether each lies in its row."""
    offsets = torch.arange(-window, window + 1)
    column = (positions % context).unsqueeze(-1) + offsets
    valid = (positions.unsqueeze(-1) >= 0) & (column >= 0) & (column < context)
    return (positions.unsqueeze(-1) + offsets).clamp_min(0) * valid, valid


def context_windows(inputs: Tensor, positions: Tensor, window: int) -> Tensor:
    """Token ids ±window around flat positions into probe inputs [P, T] (-1 outside a row)."""
    index, valid = window_index(positions, inputs.shape[1], window)
    return torch.where(valid, inputs.reshape(-1)[index], -1)


def window_activations(
    values: Tensor, indices: Tensor, positions: Tensor, context: int, window: int
) -> Tensor:
    """Activation of feature f at each token of the windows around its top positions [F, m, W]."""
    index, valid = window_index(positions, context, window)
    width, m, span = index.shape
    out = torch.zeros(width, m, span)
    chunk = max(1, GATHER_BUDGET // (m * span * values.shape[1]))
    for lo in range(0, width, chunk):
        idx = index[lo : lo + chunk]
        feature = torch.arange(lo, lo + len(idx)).view(-1, 1, 1, 1)
        hit = indices[idx] == feature
        out[lo : lo + chunk] = (values[idx] * hit).sum(-1) * valid[lo : lo + chunk]
    return out


@torch.no_grad()
def promoted_tokens(
    model: Transformer, decoder: Tensor, n: int = N_PROMOTED
) -> tuple[Tensor, Tensor]:
    """Output tokens each decoder row promotes most on the direct path: W_U (g ⊙ row)."""
    unembed = model.lm_head.weight.detach().float().cpu()
    gain = model.norm.weight.detach().float().cpu()
    ids, logits = [], []
    for lo in range(0, len(decoder), LOGIT_CHUNK):
        scores = (decoder[lo : lo + LOGIT_CHUNK].float() * gain) @ unembed.T
        top = scores.topk(min(n, scores.shape[1]), dim=1)
        ids.append(top.indices)
        logits.append(top.values)
    return torch.cat(ids).to(torch.int32), torch.cat(logits)


def feature_tensors(
    model: Transformer, bid: str, code: dict[str, Any], inputs: Tensor, top_m: int, window: int
) -> dict[str, Tensor]:
    """The tensors of one bottleneck's features.safetensors."""
    values, indices = code["values"], code["indices"]
    module = model.bottleneck(bid)
    width, n_tokens = module.width, values.shape[0]
    counts = firing_counts(values, indices, width).float()
    sums = torch.zeros(width).index_add_(0, indices.reshape(-1), values.reshape(-1))
    top_v, top_p = top_activations(values, indices, width, top_m)
    acts = window_activations(values, indices, top_p, inputs.shape[1], window)
    scale = top_v[:, :1].clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    at_top = inputs.reshape(-1)[top_p.clamp_min(0)]
    decoder = module.W_dec.detach().float().cpu()
    promoted_ids, promoted_logits = promoted_tokens(model, decoder)
    return {
        "decoder": decoder.half(),
        "frequency": counts / n_tokens,
        "mean_activation": sums / counts.clamp_min(1),
        "top_values": top_v,
        "top_positions": top_p.to(torch.int32),
        "window_activations": (acts / scale * 255).round().clamp(0, 255).to(torch.uint8),
        "token_entropy": token_entropy(at_top, top_p >= 0),
        "promoted_ids": promoted_ids,
        "promoted_logits": promoted_logits,
    }


# ----- writing and reading ----------------------------------------------------------------


def write_snapshot(
    run_dir: Path, model: Transformer, cfg: RunConfig, step: int, tokens: int, probe: Tensor
) -> Path:
    """Snapshot every bottleneck of `model` at `step` into RUN/snapshots/step_<step>/."""
    started = time.perf_counter()
    alpha, ks = bottleneck_schedule(cfg, step)
    batch = max(1, cfg.train.batch_size // cfg.train.grad_accum)
    ce, codes = probe_codes(model, probe, alpha, ks, batch)
    inputs = probe[:, :-1]
    snap = cfg.snapshot
    final = snapshot_root(run_dir) / f"step_{step}"
    sizes = {}
    with atomic_dir(final) as tmp:
        for b in cfg.model.bottleneck:
            folder = tmp / b.id
            folder.mkdir()
            tensors = feature_tensors(model, b.id, codes[b.id], inputs, snap.top_m, snap.window)
            save_file({k: v.contiguous() for k, v in tensors.items()}, folder / FEATURES_FILE)
            sizes[b.id] = (folder / FEATURES_FILE).stat().st_size
            write_json(
                folder / "meta.json",
                {
                    "format": FORMAT,
                    "step": step,
                    "tokens": tokens,
                    "bottleneck": b.id,
                    "site": b.site,
                    "layer": b.layer,
                    "width": b.width,
                    "k": ks[b.id],
                    "alpha": alpha.get(b.id),
                    "d_model": cfg.model.d_model,
                    "probe_tokens": inputs.numel(),
                    "context": inputs.shape[1],
                    "top_m": snap.top_m,
                    "window": snap.window,
                    "probe_ce": ce,
                    "l0": codes[b.id]["l0"],
                    "fvu": codes[b.id]["fvu"],
                    "dead": int((tensors["frequency"] == 0).sum()),
                    "bytes": sizes[b.id],
                    "notes": "decoder rows in float16; window_activations are uint8, "
                    "255 = the feature's top activation (top_values[:, 0])",
                },
            )
        write_json(
            tmp / "meta.json",
            {
                "format": FORMAT,
                "step": step,
                "tokens": tokens,
                "probe_ce": ce,
                "bottlenecks": list(sizes),
                "bytes": sum(sizes.values()),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
    return final


def list_snapshots(run_dir: Path) -> list[int]:
    """Steps of a run's committed snapshots, oldest first."""
    root = snapshot_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))


def load_snapshot(
    run_dir: Path, step: int, bid: str, names: tuple[str, ...] | None = None
) -> Snapshot:
    """Read one bottleneck's snapshot, all tensors or only `names` (nothing is unpickled)."""
    folder = snapshot_root(run_dir) / f"step_{step}" / bid
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        with safe_open(folder / FEATURES_FILE, framework="pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in names or fh.keys()}
    except (FileNotFoundError, SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise UserError(f"cannot read snapshot {folder}: {exc}") from None
    return Snapshot(meta=meta, tensors=tensors)


def snapshot_bottlenecks(run_dir: Path, step: int) -> list[str]:
    """Bottleneck ids stored in the snapshot of `step` (checked: they name output paths)."""
    meta = snapshot_root(run_dir) / f"step_{step}" / "meta.json"
    try:
        ids = json.loads(meta.read_text(encoding="utf-8"))["bottlenecks"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read {meta}: {exc}") from None
    bad = [b for b in ids if not isinstance(b, str) or not BOTTLENECK_ID.match(b)]
    if bad:
        raise UserError(f"{meta}: {bad[0]!r} is not a bottleneck id (resid.L or mlp.L)")
    return ids


def snapshot_bytes(run_dir: Path, step: int) -> int:
    """Size on disk of the snapshot of `step` (all bottlenecks)."""
    folder = snapshot_root(run_dir) / f"step_{step}"
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----- during training and after the fact ----------------------------------------------------


def whole_model(model: Transformer) -> Transformer | None:
    """A plain copy of an FSDP2-sharded model on rank 0 (None elsewhere); every rank must call.

    The copy is built under a forked RNG, so snapshots leave training's random streams alone.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not state:
        return None
    with torch.random.fork_rng(devices=[]):
        copy = Transformer(model.cfg)
    copy.load_state_dict(state, strict=not model.cfg.tie_embeddings)
    return copy.to(next(model.parameters()).device)


def is_sharded(model: Transformer) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


class SnapshotWriter:
    """Writes snapshots on the schedule of `cfg.snapshot` from inside the training loop.

    Every rank calls it (an FSDP2 model is gathered collectively); only `enabled` (rank 0) writes.
    """

    def __init__(
        self, cfg: RunConfig, run_dir: Path, data: TokenData, *, enabled: bool = True
    ) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.on = cfg.snapshot.every > 0 or cfg.snapshot.log_spaced
        self.probe = ensure_probe(run_dir, cfg, data) if self.on and enabled else None

    def after_step(self, model: Transformer, step: int, tokens: int) -> Path | None:
        """Write the snapshot of `step` when one is due; return its folder."""
        if not self.on or not snapshot_due(step, self.cfg):
            return None
        whole = whole_model(model) if is_sharded(model) else model
        if self.probe is None or whole is None:
            return None
        return write_snapshot(self.run_dir, whole, self.cfg, step, tokens, self.probe)


def snapshot_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """Snapshot a run from one of its checkpoints (the latest when `step` is None)."""
    from saeformer.runs import load_run

    run = load_run(run_dir, step)
    state_file = run.checkpoint / "state.json"
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
    progress = state.get("progress", {})
    at = int(progress.get("step", run.checkpoint.name.removeprefix("step_")))
    probe = ensure_probe(run_dir, run.config)
    return write_snapshot(run_dir, run.model, run.config, at, int(progress.get("tokens", 0)), probe)
