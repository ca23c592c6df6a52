"""The HTML report of a run: a static folder that opens from disk, with no server or network.

`report.html` loads `report.js`, which builds every element from data files beside it
(`data/*.js`, each a `SAEF.add(key, {...})` call, so no fetch is needed under file://). Corpus
text reaches the page only as token ids looked up in `data/vocab.js` and set with
`textContent`; the JSON is written with `<`, `>` and `&` escaped, so it can never close a tag.
Feature cards are split in chunks that load when a card is opened.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from torch import Tensor

from saeformer.analysis.evolve import EvolveConfig, SiteEvolution, evolve_run, read_evolution
from saeformer.analysis.evolve_plots import plot_site_evolution
from saeformer.analysis.snapshot import (
    context_windows,
    list_snapshots,
    load_probe,
    load_snapshot,
    snapshot_bottlenecks,
    snapshot_bytes,
    snapshot_checkpoint,
)
from saeformer.atomic import atomic_dir
from saeformer.errors import UserError

ASSETS = Path(__file__).with_name("report_assets")
CARD_CHUNK = 50  # feature cards per lazily loaded data file
TIMELINE_POINTS = 8  # snapshots whose top contexts a card's timeline shows
TIMELINE_CONTEXTS = 3  # top contexts per timeline snapshot
INDEX_TOKENS = 3  # most frequent top-activation tokens listed per feature in the browser
CONTEXT_NAMES = ("top_values", "top_positions", "window_activations")
JS_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


@dataclass
class ReportConfig:
    """What the report holds and where it goes."""

    out: Path | None = None  # default: RUN/report
    cards: int = 100  # full feature cards per bottleneck: the densest features
    all_cards: bool = False  # a full card for every feature
    compare: Path | None = None  # rows of `saeformer compare --json`: a comparison section
    evolve: EvolveConfig = field(default_factory=EvolveConfig)


def js_data(key: str, value: Any) -> str:
    """A data file: one `SAEF.add(key, value)` call whose JSON cannot break out of a script."""
    text = json.dumps([key, value], ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escaped in JS_ESCAPES.items():
        text = text.replace(char, escaped)
    return f"SAEF.add(...{text});\n"


def _num(x: float, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits, None when not finite."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _step(x: int) -> int | None:
    return None if x < 0 else int(x)


def token_strings(tokenizer: Tokenizer) -> list[str]:
    """Each token id's text as the report shows it (invalid UTF-8 pieces as U+FFFD)."""
    return [
        tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size())
    ]


def _contexts(
    tensors: dict[str, Tensor], feature: int, inputs: Tensor, window: int, limit: int
) -> list[dict[str, Any]]:
    """A feature's top contexts: token ids, activations (0-255) and the top token's index."""
    positions = tensors["top_positions"][feature].long()[:limit]
    positions = positions[positions >= 0]
    ids = context_windows(inputs, positions, window)
    acts = tensors["window_activations"][feature][: len(positions)]
    out = []
    for row, (tok, act) in enumerate(zip(ids, acts, strict=True)):
        keep = tok >= 0
        out.append(
            {
                "tokens": tok[keep].tolist(),
                "acts": act[keep].tolist(),
                "center": int(window - (~keep[:window]).sum()),
                "value": _num(tensors["top_values"][feature, row]),
            }
        )
    return out


def _top_tokens(tensors: dict[str, Tensor], inputs: Tensor) -> list[list[int]]:
    """Per feature, its most frequent tokens at the top activations (most frequent first)."""
    positions = tensors["top_positions"].long()
    ids = inputs.reshape(-1)[positions.clamp_min(0)].masked_fill(positions < 0, -1).tolist()
    return [
        [t for t, _ in Counter(x for x in row if x >= 0).most_common(INDEX_TOKENS)] for row in ids
    ]


@dataclass
class _Site:
    """Inputs for one bottleneck's report pages."""

    steps: list[int]
    evolution: SiteEvolution
    final: dict[str, Tensor]
    meta: dict[str, Any]
    inputs: Tensor


def _index(site: _Site, card_chunk: dict[int, int]) -> dict[str, Any]:
    """The feature browser's columns, one entry per feature."""
    f, t = site.evolution.features, site.final
    return {
        "density": [_num(x) for x in t["frequency"].tolist()],
        "entropy": [_num(x, 3) for x in t["token_entropy"].tolist()],
        "birth": [_step(x) for x in f["birth_step"].tolist()],
        "stable": [_step(x) for x in f["stable_step"].tolist()],
        "top_tokens": _top_tokens(t, site.inputs),
        "card": [card_chunk.get(i, -1) for i in range(len(f))],
    }


def _card(site: _Site, feature: int, history: dict[int, dict[str, Tensor]]) -> dict[str, Any]:
    """Everything a feature card shows."""
    row = site.evolution.features.iloc[feature]
    t, window = site.final, site.meta["window"]
    timeline = []
    for s, step in enumerate(site.steps):
        ancestor = int(row["ancestor"][s])
        if step in history and ancestor >= 0:
            contexts = _contexts(history[step], ancestor, site.inputs, window, TIMELINE_CONTEXTS)
            timeline.append({"step": step, "feature": ancestor, "contexts": contexts})
    return {
        "id": feature,
        "density": _num(t["frequency"][feature]),
        "mean_activation": _num(t["mean_activation"][feature]),
        "entropy": _num(t["token_entropy"][feature], 3),
        "birth": _step(int(row["birth_step"])),
        "stable": _step(int(row["stable_step"])),
        "n_splits": int(row["n_splits"]),
        "n_merges": int(row["n_merges"]),
        "contexts": _contexts(t, feature, site.inputs, window, len(t["top_values"][feature])),
        "promoted": [
            [int(i), _num(v, 3)]
            for i, v in zip(t["promoted_ids"][feature], t["promoted_logits"][feature], strict=True)
        ],
        "trajectory": {
            "density": [_num(x) for x in row["density_trajectory"]],
            "entropy": [_num(x, 3) for x in row["entropy_trajectory"]],
            "cos_to_final": [_num(x, 3) for x in row["cos_to_final"]],
        },
        "timeline": timeline,
    }


def _card_features(site: _Site, cfg: ReportConfig) -> list[int]:
    """Features that get a full card: all, or the densest `cfg.cards`."""
    density = site.final["frequency"].numpy()
    order = np.argsort(-density, kind="stable")
    return order.tolist() if cfg.all_cards else order[: cfg.cards].tolist()


def _timeline_steps(steps: list[int]) -> list[int]:
    """Up to TIMELINE_POINTS snapshot steps, evenly spread, always with the last."""
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, TIMELINE_POINTS)).astype(int))
    return [steps[i] for i in picks]


def _write_site(
    tmp: Path, run_dir: Path, bid: str, steps: list[int], inputs: Tensor, cfg: ReportConfig
) -> dict[str, Any]:
    """Write one bottleneck's index, card chunks and evolution plot; return its summary."""
    final = load_snapshot(run_dir, steps[-1], bid)
    site = _Site(
        steps=steps,
        evolution=read_evolution(run_dir, bid),
        final=final.tensors,
        meta=final.meta,
        inputs=inputs,
    )
    chosen = _card_features(site, cfg)
    card_chunk = {f: i // CARD_CHUNK for i, f in enumerate(chosen)}
    history = {
        step: load_snapshot(run_dir, step, bid, CONTEXT_NAMES).tensors
        for step in _timeline_steps(steps)
    }
    folder = tmp / "data" / bid
    folder.mkdir(parents=True)
    (folder / "index.js").write_text(js_data(f"{bid}/index", _index(site, card_chunk)), "utf-8")
    for c in range(0, len(chosen), CARD_CHUNK):
        cards = {str(f): _card(site, f, history) for f in chosen[c : c + CARD_CHUNK]}
        key = f"{bid}/cards_{c // CARD_CHUNK}"
        (folder / f"cards_{c // CARD_CHUNK}.js").write_text(js_data(key, cards), "utf-8")
    plot_site_evolution(site.evolution, bid, tmp / "img" / f"evolution_{bid}.png")
    m, last = site.meta, site.evolution.steps.iloc[-1]
    kind = "MLP" if m["site"] == "mlp" else "resid"
    return {
        "id": bid,
        "title": f"Layer {m['layer']} {kind}",
        "unit": "Neuron" if m["site"] == "mlp" else "Feature",
        "width": m["width"],
        "k": m["k"],
        "l0": _num(m["l0"]),
        "fvu": _num(m["fvu"]) if m["fvu"] is not None else None,
        "dead_frac": _num(last["dead_frac"]),
        "stable_frac": _num(last["stable_frac"]),
        "median_entropy": _num(last["median_token_entropy"], 3),
        "splits": int(site.evolution.steps["splits"].sum()),
        "merges": int(site.evolution.steps["merges"].sum()),
        "method": site.evolution.method,
        "cards": len(chosen),
        "steps": steps,
        "evolution_png": f"img/evolution_{bid}.png",
    }


def _fresh_evolution(run_dir: Path, steps: list[int]) -> bool:
    """Whether RUN/evolution was computed from exactly these snapshots."""
    file = run_dir / "evolution" / "summary.json"
    return file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("steps") == steps


def _run_info(run_dir: Path, steps: list[int], sites: list[dict[str, Any]]) -> dict[str, Any]:
    """The run summary the report's first section shows."""
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    probe_meta = run_dir / "snapshots" / "probe" / "meta.json"
    evolution = run_dir / "evolution" / "summary.json"
    return {
        "name": run_dir.resolve().name,
        "summary": {k: summary.get(k) for k in ("step", "tokens", "val_loss")},
        "model": {k: config["model"][k] for k in ("n_layers", "d_model", "context", "vocab_size")},
        "probe": json.loads(probe_meta.read_text(encoding="utf-8")),
        "evolution": json.loads(evolution.read_text(encoding="utf-8"))["config"],
        "snapshots": [{"step": s, "bytes": snapshot_bytes(run_dir, s)} for s in steps],
        "sites": sites,
    }


def build_report(run_dir: Path, cfg: ReportConfig | None = None) -> Path:
    """Write the report folder of a run (snapshotting and evolving first when needed)."""
    cfg = cfg or ReportConfig()
    run_dir = Path(run_dir)
    compare = None if cfg.compare is None else _compare_section(cfg.compare)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    if not list_snapshots(run_dir):
        print(f"{run_dir} has no snapshots: snapshotting its latest checkpoint")
        snapshot_checkpoint(run_dir)
    steps = list_snapshots(run_dir)
    if not _fresh_evolution(run_dir, steps):
        evolve_run(run_dir, cfg.evolve)
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    inputs = load_probe(run_dir)[:, :-1]
    out = cfg.out or run_dir / "report"
    with atomic_dir(out) as tmp:
        for asset in ("report.js", "report.css"):
            shutil.copyfile(ASSETS / asset, tmp / asset)
        (tmp / "img").mkdir()
        sites = [
            _write_site(tmp, run_dir, bid, steps, inputs, cfg)
            for bid in snapshot_bottlenecks(run_dir, steps[-1])
        ]
        (tmp / "data" / "vocab.js").write_text(js_data("vocab", token_strings(tokenizer)), "utf-8")
        info = _run_info(run_dir, steps, sites)
        if (run_dir / "metrics.jsonl").is_file():
            from saeformer.analysis.curves import plot_curves

            info["curves_png"] = "img/" + plot_curves(run_dir, tmp / "img" / "curves.png").name
        if compare is not None:
            info["compare"] = compare
        (tmp / "data" / "run.js").write_text(js_data("run", info), "utf-8")
        title = html.escape(f"saeformer report: {info['name']}")
        page = (ASSETS / "report.html").read_text(encoding="utf-8").replace("{{TITLE}}", title)
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"


def _compare_section(path: Path) -> dict[str, Any]:
    """The tables of `saeformer compare`, as the markdown output shows them."""
    from saeformer.analysis.compare import comparison_tables, load_rows, probe_ks

    rows = load_rows(path)
    tables = comparison_tables(rows, probe_ks(rows))
    return {"source": Path(path).name, "tables": [{"header": h, "rows": r} for h, r in tables]}


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
