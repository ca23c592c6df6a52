"""`saeformer compare`: jointly trained bottlenecks and post-hoc SAEs in one table, measured by
the same code on the same probe text.

Every entry is a host model plus a `Bottleneck` reading one hook point: a joint bottleneck
(`resid.L` of a saeformer run reads `layers.L.output` and is already in the host's forward), or
a post-hoc SAE file (SAELens folder or Qwen-Scope `layer{n}.sae.pt`) spliced in for the
CE-loss score and KL. Special tokens and the first `exclude_first` positions of each window
are excluded from every metric and are never spliced.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor
from tqdm import tqdm

from saeformer.analysis.activations import keep_mask, special_token_ids
from saeformer.analysis.formats import load_sae
from saeformer.analysis.hooks import HookPoint, Host, HostConfig, SaeformerHost, load_host
from saeformer.analysis.matching import match_features
from saeformer.analysis.metrics import ce_loss_score, firing_counts, next_token_kl, token_entropy
from saeformer.analysis.probing import ProbeSet, brown_probe_set, k_sparse_probe
from saeformer.analysis.snapshot import top_activations
from saeformer.configio import load_typed
from saeformer.errors import UserError
from saeformer.model import Bottleneck
from saeformer.train.data import TokenData, fixed_windows

STABLE_COSINE = 0.9


@dataclass
class ProbeConfig:
    """The probe text shared by all entries, and the metric settings."""

    windows: int = 64  # validation windows of the probe text
    context: int = 128
    batch: int = 8
    exclude_first: int = 1
    top_m: int = 16  # top activations per feature for its token entropy
    brown: Path = Path("data/brown-tagged.tsv.xz")  # tagged text for k-sparse probing
    brown_windows: int = 64  # 0: no probing
    brown_words_per_doc: int = 0  # 0: whole files
    probe_k: list[int] = field(default_factory=lambda: [1, 16])
    device: str = "cpu"


@dataclass
class EntryConfig:
    """One row: a host and either a joint bottleneck of it or a post-hoc SAE file."""

    name: str
    host: HostConfig
    data: Path  # the host's prepared tokens: their validation split is the probe text
    bottleneck: str = ""  # a joint bottleneck id of a saeformer host, e.g. resid.2
    sae: str = ""  # or an SAELens folder / Qwen-Scope layer<N>.sae.pt
    k: int = 0  # Qwen-Scope k, when the path has no L0_<k>
    seed_twin: str = ""  # the same kind of SAE (or joint run) trained with another seed


@dataclass
class CompareConfig:
    """`[probe]` and one `[[entry]]` per row."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    entry: list[EntryConfig] = field(default_factory=list)

    def validate(self) -> None:
        """Raise UserError for a config that cannot be compared."""
        if not self.entry:
            raise UserError("add at least one [[entry]] (name, host, data, bottleneck or sae)")
        for e in self.entry:
            if bool(e.bottleneck) == bool(e.sae):
                raise UserError(f"entry {e.name!r}: give exactly one of bottleneck and sae")
            if e.bottleneck and e.host.kind != "saeformer":
                raise UserError(f"entry {e.name!r}: joint bottlenecks live in saeformer runs")
        p = self.probe
        if min(p.windows, p.context, p.batch, p.top_m) <= 0 or not p.probe_k:
            raise UserError("probe.windows, context, batch, top_m and probe_k must be positive")


def load_compare_config(path: Path, overrides: list[str] | None = None) -> CompareConfig:
    """Read and validate a comparison config (TOML) with `--set` overrides."""
    cfg = load_typed(CompareConfig, path, overrides)
    cfg.validate()
    return cfg


@dataclass
class Codes:
    """Sparse codes of the kept probe tokens, with the token ids they were computed on."""

    values: Tensor
    indices: Tensor
    tokens: Tensor


def resolve(entry: EntryConfig, host: Host) -> tuple[HookPoint, Bottleneck, bool]:
    """The entry's hook point, SAE module, and whether it must be spliced into the host."""
    if entry.bottleneck:
        return (*_joint(host, entry.bottleneck, entry.name), False)
    loaded = load_sae(Path(entry.sae), entry.k or None)
    if loaded.hook is None:
        raise UserError(f"entry {entry.name!r}: {entry.sae} does not say its hook point")
    sae = loaded.sae.to(host.device)
    hook = HookPoint.parse(loaded.hook)
    if host.width(hook) != sae.d_model:
        raise UserError(f"entry {entry.name!r}: SAE input {sae.d_model} ≠ {hook.name} width")
    return hook, sae, True


def _joint(host: Host, bid: str, name: str) -> tuple[HookPoint, Bottleneck]:
    site, _, layer = bid.partition(".")
    if site != "resid" or not isinstance(host, SaeformerHost) or layer not in host.model.resid:
        raise UserError(f"entry {name!r}: {host.name} has no resid bottleneck {bid!r}")
    return HookPoint(int(layer), "output"), host.model.resid[layer]


@torch.no_grad()
def measure(
    host: Host,
    hook: HookPoint,
    sae: Bottleneck,
    splice: bool,
    windows: tuple[Tensor, Tensor],
    special: list[int],
    probe: ProbeConfig,
) -> tuple[dict[str, float], Codes]:
    """FVU, L0, dead fraction, CE (clean, spliced, zero-ablated) and KL on probe windows."""
    special_t = torch.tensor(special, dtype=torch.long)
    sums = dict.fromkeys(("err", "sq", "n", "ce_clean", "ce_spliced", "ce_zero", "kl", "pos"), 0.0)
    total_h = torch.zeros(sae.d_model, dtype=torch.float64)
    codes: list[tuple[Tensor, Tensor, Tensor]] = []
    inputs, targets = windows
    for i in range(0, len(inputs), probe.batch):
        x = inputs[i : i + probe.batch].to(host.device)
        y = targets[i : i + probe.batch].to(host.device)
        keep = keep_mask(x, [], special_t, probe.exclude_first, 0.0)
        seen: list[Tensor] = []
        with host.hooked(hook, lambda h, seen=seen: seen.append(h)):
            clean = host.logits(x)
        h = seen[0][keep].float()
        code = sae.encode(h, sae.k)
        h_hat = sae.decode(code.values, code.indices)
        sums["err"] += (h - h_hat).double().pow(2).sum().item()
        sums["sq"] += h.double().pow(2).sum().item()
        sums["n"] += len(h)
        total_h += h.double().sum(0).cpu()
        codes.append((code.values.cpu(), code.indices.cpu(), x[keep].cpu()))
        ce = _ce(clean, y, keep)
        sums["ce_clean"] += ce
        sums["pos"] += keep.sum().item()
        if splice:
            spliced = _spliced_logits(host, hook, x, keep, lambda a: sae(a.float())[0].to(a.dtype))
            zeroed = _spliced_logits(host, hook, x, keep, torch.zeros_like)
            sums["ce_spliced"] += _ce(spliced, y, keep)
            sums["ce_zero"] += _ce(zeroed, y, keep)
            sums["kl"] += next_token_kl(clean[keep], spliced[keep]).sum().item()
    values, indices, tokens = (torch.cat(c) for c in zip(*codes, strict=True))
    variance = sums["sq"] - total_h.pow(2).sum().item() / sums["n"]
    counts = firing_counts(values, indices, sae.width)
    pos = sums["pos"]
    stats = {
        "fvu": sums["err"] / variance,
        "l0": (values != 0).sum(-1).float().mean().item(),
        "dead_frac": (counts == 0).float().mean().item(),
        "probe_tokens": int(sums["n"]),
        "ce_clean" if splice else "ce": sums["ce_clean"] / pos,
    }
    if splice:
        stats["ce_spliced"] = sums["ce_spliced"] / pos
        stats["ce_zero"] = sums["ce_zero"] / pos
        stats["ce_score"] = ce_loss_score(stats["ce_clean"], stats["ce_spliced"], stats["ce_zero"])
        stats["kl"] = sums["kl"] / pos
    return stats, Codes(values, indices, tokens)


def _ce(logits: Tensor, targets: Tensor, keep: Tensor) -> float:
    """Summed next-token CE over the kept positions."""
    return torch.nn.functional.cross_entropy(
        logits[keep].float(), targets[keep], reduction="sum"
    ).item()


def _spliced_logits(host: Host, hook: HookPoint, x: Tensor, keep: Tensor, fn: Any) -> Tensor:
    """Logits with the activation at kept positions replaced by fn(activation)."""

    def replace(h: Tensor) -> Tensor:
        out = h.clone()
        out[keep] = fn(h[keep])
        return out

    with host.hooked(hook, replace):
        return host.logits(x)


def feature_entropy(codes: Codes, width: int, m: int) -> dict[str, float]:
    """Median and quartiles (bits) of per-feature token entropy over each one's top-m tokens."""
    _, positions = top_activations(codes.values.float(), codes.indices, width, m)
    valid = positions >= 0
    ids = codes.tokens[positions.clamp_min(0)]
    entropy = token_entropy(ids, valid)
    alive = entropy[valid.sum(1) == m]
    if len(alive) == 0:
        return {"entropy_median": math.nan, "entropy_q1": math.nan, "entropy_q3": math.nan}
    q = torch.quantile(alive, torch.tensor([0.25, 0.5, 0.75])).tolist()
    return {"entropy_q1": q[0], "entropy_median": q[1], "entropy_q3": q[2]}


def stability(entry: EntryConfig, sae: Bottleneck, host_cfg: HostConfig) -> dict[str, float]:
    """Fraction of features whose match in the seed twin has decoder cosine ≥ 0.9, and the
    median matched cosine (empty without a seed twin)."""
    if not entry.seed_twin:
        return {}
    if entry.bottleneck:
        twin_host = load_host(
            HostConfig(kind="saeformer", path=entry.seed_twin, dtype=host_cfg.dtype)
        )
        twin = _joint(twin_host, entry.bottleneck, entry.name)[1]
    else:
        twin = load_sae(Path(entry.seed_twin), entry.k or None).sae
    a = sae.W_dec.detach().float().cpu().numpy()
    b = twin.W_dec.detach().float().cpu().numpy()
    cosine = match_features(a, b).cosine
    return {
        "stable_frac": float(np.mean(cosine >= STABLE_COSINE)),
        "match_cosine_median": float(np.nanmedian(cosine)),
    }


def probing(
    host: Host, hook: HookPoint, sae: Bottleneck, probe_set: ProbeSet, probe: ProbeConfig
) -> dict[str, float]:
    """k-sparse probe accuracy per task and k on the Brown windows (even windows fit, odd test)."""
    tokens = probe_set.tokens
    values, indices = [], []
    with torch.no_grad():
        for i in range(0, len(tokens), probe.batch):
            x = tokens[i : i + probe.batch].to(host.device)
            h = host.capture(x, [hook])[hook].float()
            code = sae.encode(h.reshape(-1, h.shape[-1]), sae.k)
            values.append(code.values.cpu())
            indices.append(code.indices.cpu())
    values_t, indices_t = torch.cat(values), torch.cat(indices)
    n, t = tokens.shape
    train = (torch.arange(n) % 2 == 0).repeat_interleave(t)
    first = (torch.arange(t) < probe.exclude_first).repeat(n)
    out = {}
    for task, labels in probe_set.labels.items():
        flat = labels.reshape(-1).long().masked_fill(first, -1)
        scores = k_sparse_probe(values_t, indices_t, sae.width, flat, train, probe.probe_k)
        out.update({f"{task}@k={k}": v for k, v in scores.items()})
    return out


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Measure every entry; one dict of metrics per entry, in config order."""
    cfg.validate()
    p = cfg.probe
    rows = []
    probe_sets: dict[Path, ProbeSet] = {}  # tagged text per tokenizer, built once
    loaded: tuple[str, Host] | None = None  # consecutive entries on one host share it
    for entry in tqdm(cfg.entry, desc="compare", unit="entry", disable=None):
        data = TokenData(entry.data)
        if loaded is None or loaded[0] != repr(entry.host):
            loaded = None  # free the previous host first
            loaded = (repr(entry.host), load_host(entry.host, p.device))
        host = loaded[1]
        hook, sae, splice = resolve(entry, host)
        special = special_token_ids(data.tokenizer_path)
        windows = fixed_windows(data.split("val"), p.context, p.windows)
        stats, codes = measure(host, hook, sae, splice, windows, special, p)
        row = {"name": entry.name, "hook": hook.name, "width": sae.width, "k": sae.k, **stats}
        row.update(feature_entropy(codes, sae.width, p.top_m))
        row.update(stability(entry, sae, entry.host))
        if p.brown_windows > 0:
            if data.tokenizer_path not in probe_sets:
                tok = Tokenizer.from_file(str(data.tokenizer_path))
                probe_sets[data.tokenizer_path] = brown_probe_set(
                    p.brown, tok, data.vocab_size, p.context, p.brown_windows, p.brown_words_per_doc
                )
            row.update(probing(host, hook, sae, probe_sets[data.tokenizer_path], p))
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def _mean(row: dict[str, Any], prefix: str, k: int) -> float | None:
    found = [v for key, v in row.items() if key.startswith(prefix) and key.endswith(f"@k={k}")]
    found = [v for v in found if not math.isnan(v)]
    return sum(found) / len(found) if found else None


Table = tuple[list[str], list[list[str]]]  # header, rows of formatted cells


def comparison_tables(rows: list[dict[str, Any]], probe_k: list[int]) -> list[Table]:
    """Two tables: reconstruction and splicing; then feature quality and probing."""
    recon = [
        [
            r["name"], r["hook"], str(r["width"]), str(r["k"]), _fmt(r["fvu"], ".3f"),
            _fmt(r["l0"], ".1f"), _fmt(100 * r["dead_frac"], ".1f"),
            _fmt(r.get("ce_clean"), ".3f"), _fmt(r.get("ce_spliced", r.get("ce")), ".3f"),
            _fmt(r.get("ce_score"), ".3f"), _fmt(r.get("kl"), ".4f"),
        ]
        for r in rows
    ]  # fmt: skip
    probes = [(name, k) for name in ("POS", "genre", "token form", "control") for k in probe_k]
    prefixes = {"POS": "pos:", "genre": "genre:", "token form": "token:", "control": "control:"}
    quality = []
    for r in rows:
        entropy = " / ".join(_fmt(r.get(f"entropy_{q}"), ".2f") for q in ("q1", "median", "q3"))
        stable = "—"
        if "stable_frac" in r:
            stable = f"{r['stable_frac']:.1%} ({r['match_cosine_median']:.2f})"
        cells = [_fmt(_mean(r, prefixes[name], k), ".3f") for name, k in probes]
        quality.append([r["name"], entropy, stable, *cells])
    return [
        (
            ["entry", "hook", "F", "k", "FVU", "L0", "dead %", "CE clean", "CE with SAE",
             "CE score", "KL"],
            recon,
        ),
        (
            ["entry", "token entropy (bits) q1 / median / q3",
             f"stable ≥ {STABLE_COSINE} (median cos)", *(f"{n} k={k}" for n, k in probes)],
            quality,
        ),
    ]  # fmt: skip


def probe_ks(rows: list[dict[str, Any]]) -> list[int]:
    """The k values of the k-sparse probes recorded in rows (keys ending in `@k=N`)."""
    return sorted({int(key.rsplit("@k=", 1)[1]) for r in rows for key in r if "@k=" in key})


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows written by `saeformer compare --json`; UserError when the file is not such rows."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read comparison rows from {path}: {exc}") from None
    needed = {"name", "hook", "width", "k", "fvu", "l0", "dead_frac"}
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and needed <= r.keys() for r in rows
    ):
        raise UserError(f"{path} is not the output of `saeformer compare --json`")
    return rows


def markdown_tables(rows: list[dict[str, Any]], probe: ProbeConfig) -> str:
    """`comparison_tables` as markdown."""
    blocks = []
    for header, cells in comparison_tables(rows, probe.probe_k):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
