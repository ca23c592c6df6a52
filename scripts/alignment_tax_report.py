"""docs/results.md of the alignment-tax grid (scripts/alignment_tax.py): the table, the width
search, loss-curve plots and the run-time estimate, from whatever runs have finished."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saeformer.analysis.curves import read_metrics
from saeformer.configio import build
from saeformer.model.config import ModelConfig
from saeformer.train.flops import dense_flops_per_token

if TYPE_CHECKING:
    from alignment_tax import Arm, Grid

# Calibration from issue 4: the demo model (configs/tiny-cpu-dense.toml: 6 layers, d = 256,
# context 256, batch 16) takes 5–10 minutes for 300 steps on 2 CPU cores, and bottleneck runs
# step 1.4–2.0 times slower than their dense twin. Other models scale by training FLOPs.
DEMO = {"n_layers": 6, "d_model": 256, "n_heads": 4, "d_ff": 1024, "context": 256}
DEMO_TOKENS_PER_STEP = 16 * 256
DEMO_SECONDS_PER_STEP = (1.0, 2.0)
BOTTLENECK_SLOWDOWN = (1.4, 2.0)
TEACHER_COST = 1 / 3  # a teacher forward pass, as a share of a dense training step


def tax_from(points: list[tuple[float, float]], target: float, complete: bool) -> str:
    """Alignment tax from (budget multiple, final val loss) of successive branches: the multiple
    where the loss crosses `target`, interpolated linearly between branches."""
    if not points:
        return "–"
    for i, (multiple, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return f"≤ {multiple:.2f}×"
            m0, l0 = points[i - 1]
            return f"{m0 + (l0 - target) / (l0 - loss) * (multiple - m0):.2f}×"
    return f"> {points[-1][0]:.2f}×" + ("" if complete else " (running)")


def _tax(grid: Grid, arm: Arm) -> str:
    target = grid.dense_loss()
    if len(arm.multiples) == 1 or target is None or arm.kind == "dense":
        return "–"
    points = []
    for multiple in arm.multiples:
        summary = grid.summary(arm, multiple)
        if summary is None:
            break
        points.append((multiple, summary["val_loss"]))
    return tax_from(points, target, complete=len(points) == len(arm.multiples))


def _status(grid: Grid, arm: Arm) -> str:
    if grid.summary(arm, 1.0) is not None:
        return "done"
    run_dir = grid.metrics_dir(arm, 1.0)
    if run_dir is None:
        return "not run"
    step = max((s for s, _ in read_metrics(run_dir).get("train/loss", [])), default=0)
    return f"unfinished ({step}/{grid.n})"


def _per_site(summary: dict[str, Any], key: str, spec: str) -> str:
    values = [site[key] for site in summary["sites"].values()]
    if not values or all(v is None for v in values):
        return "–"
    return " / ".join("–" if v is None else format(v, spec) for v in values)


def _tokens_per_s(run_dir: Path) -> float | None:
    """Median logged rate: a run that shared the machine for a while keeps its typical speed."""
    points = read_metrics(run_dir).get("train/tokens_per_s", [])
    return statistics.median(v for _, v in points) if points else None


def _change(value: float, reference: float) -> float:
    """Relative change from reference, in percent."""
    return 100 * (value - reference) / reference


def _penalty(loss: float | None, reference: float | None) -> str:
    if loss is None or reference is None:
        return "–"
    return f"{_change(loss, reference):+.2f}%"


def _loss(grid: Grid, name: str) -> float | None:
    summary = grid.summary(grid.arm(name), 1.0)
    return None if summary is None else summary["val_loss"]


def _row(grid: Grid, arm: Arm) -> str:
    summary = grid.summary(arm, 1.0)
    site = arm.site or "–"
    if summary is None:
        return f"| {arm.name} | {site} | {_status(grid, arm)} |" + " – |" * 8
    dense = grid.dense_loss()
    wide = _loss(grid, grid.wide_twin(arm.site)) if arm.site else None
    if arm.site and grid.wide_twin(arm.site) == "dense-s0":
        wide = dense  # the parameter-matched twin is the dense twin itself
    speed = _tokens_per_s(grid.finished_dir(arm, 1.0))
    cells = [
        arm.name,
        site,
        "done",
        f"{summary['val_loss']:.4f}",
        _penalty(summary["val_loss"], dense),
        _penalty(summary["val_loss"], wide),
        _tax(grid, arm),
        _per_site(summary, "l0", ".1f"),
        _per_site(summary, "dead_frac", ".1%"),
        _per_site(summary, "fvu", ".3f"),
        "–" if speed is None else f"{speed:,.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _width_search(grid: Grid, site: str) -> str:
    target = grid.dense_loss()
    if target is None:
        return f"{site}: waiting for the dense twins"
    ladder = grid.width_ladder(site)
    base, tried = grid.params(ladder[0]), []
    for arm in ladder:
        summary = grid.summary(arm, 1.0)
        if summary is None:
            return f"{site}: {', '.join(tried) or 'nothing'} so far (next: {arm.name})"
        growth = 100 * (grid.params(arm) / base - 1)
        tried.append(
            f"d_model {arm.model['d_model']} ({growth:+.0f}% parameters) {summary['val_loss']:.4f}"
        )
        if summary["val_loss"] <= target:
            return f"{site}: {', '.join(tried)} ≤ {target:.4f}: the smallest width that reaches it"
    return f"{site}: {', '.join(tried)}; none reaches the dense twins' {target:.4f}"


FLAT_MOVE = 1.0  # percent: a twin has flattened once 1.5× the tokens lower its loss by less


def flat_budget(points: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """Fit L(m) = E + A·m^−b to (budget multiple, final loss) of the dense twin's branches;
    return (E, b, the multiple from which 1.5× the tokens lower L by less than FLAT_MOVE%)."""
    import numpy as np
    from scipy.optimize import brentq, curve_fit

    if len(points) < 4:
        return None
    m, loss = (np.array(v, dtype=float) for v in zip(*points, strict=True))

    def law(x, e, a, b):
        return e + a * x**-b

    spread = loss.max() - loss.min()
    try:
        (e, a, b), _ = curve_fit(law, m, loss, p0=(loss.min() - spread, spread, 0.5), maxfev=20000)
    except RuntimeError:  # no convergence
        return None
    if a <= 0 or b <= 0:
        return None

    def excess(log_x: float) -> float:  # negative while 1.5× the tokens still gain > FLAT_MOVE
        x = np.exp(log_x)
        return 100 * (law(1.5 * x, e, a, b) / law(x, e, a, b) - 1) + FLAT_MOVE

    low, high = np.log(1e-3), np.log(1e9)
    if excess(low) >= 0:
        return e, b, 1e-3
    return e, b, float(np.exp(brentq(excess, low, high))) if excess(high) > 0 else None


def _dense_flatness(grid: Grid) -> str:
    """Whether the budget lets the dense twin's loss flatten: its late stable-phase slope, and
    its own final loss when continued past the budget."""
    arm = grid.arm("dense-s0")
    if grid.summary(arm, 1.0) is None:
        return "dense-s0 has not finished: the flatness of its loss at this budget is unknown."
    curve = dict(read_metrics(grid.finished_dir(arm, 1.0))["val/loss"])
    stable_end = grid.n - grid.decay
    earlier = min(curve, key=lambda s: abs(s - stable_end * 2 // 3))
    drop = -_change(curve[stable_end], curve[earlier])
    text = (
        f"dense-s0 validation loss: {curve[earlier]:.4f} at step {earlier}, "
        f"{curve[stable_end]:.4f} at the end of the stable phase (step {stable_end}), "
        f"{curve[grid.n]:.4f} after the decay: {drop:.2f}% lower over the last third of the "
        "stable phase (a budget at which the loss has flattened shows well under 1%)."
    )
    longer = [(m, s["val_loss"]) for m in arm.multiples[1:] if (s := grid.summary(arm, m))]
    if longer:
        final = curve[grid.n]
        text += (
            " Continued and decayed later, the same twin ends at "
            + ", ".join(f"{loss:.4f} ({_penalty(loss, final)}) at {m:g}×" for m, loss in longer)
            + " the budget."
        )
    if len(longer) >= 2:
        (m0, l0), (m1, l1) = longer[-2:]
        text += (
            f" From {m0:g}× to {m1:g}× it moves {_penalty(l1, l0)} (a twin that has flattened "
            "moves well under 1%)."
        )
    if (fit := flat_budget([(1.0, curve[grid.n]), *longer])) is not None:
        e, b, flat = fit
        text += (
            f" A fit L = E + A·m^−b over these budgets (E = {e:.3f}, b = {b:.2f}) puts the "
            f"budget from which 1.5× the tokens gain less than {FLAT_MOVE:g}% at {flat:.1f}× "
            f"this one ({flat * grid.n:,.0f} steps)."
        )
    return text


def _curve_styles(arms: list[Arm], palette: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Line styles, one per arm: the dense twins black and grey, the others a colour and dash
    of their own."""
    styles, i = [], 0
    for arm in arms:
        if arm.kind == "dense":
            styles.append({"lw": 2.2, "color": "black", "ls": "-" if arm.seed == 0 else ":"})
        elif arm.kind == "wide":
            styles.append({"lw": 2.2, "color": "grey", "ls": "--"})
        else:
            styles.append({"lw": 1.2, "color": palette[i % 10], "ls": "-" if i < 10 else "--"})
            i += 1
    return styles


def _plot_site(grid: Grid, site: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [
        a
        for a in grid.arms
        if a.kind in ("dense", "wide") or (a.site == site and a.kind not in ("width", "ablation"))
    ]
    arms = [a for a in arms if grid.metrics_dir(a, 1.0) is not None]
    if not arms:
        return None
    fig, (curves, tax) = plt.subplots(1, 2, figsize=(13, 4.8))
    finals = []
    for arm, style in zip(arms, _curve_styles(arms, plt.get_cmap("tab10").colors), strict=True):
        points = read_metrics(grid.metrics_dir(arm, 1.0)).get("val/loss", [])
        steps, losses = zip(*points, strict=True)
        curves.plot([s / grid.n for s in steps], losses, label=arm.name, **style)
        if (summary := grid.summary(arm, 1.0)) is not None:  # unfinished runs set no limits
            finals.append(summary["val_loss"])
        branch = [(m, s["val_loss"]) for m in arm.multiples if (s := grid.summary(arm, m))]
        if len(arm.multiples) > 1 and branch:
            tax.plot(*zip(*branch, strict=True), marker="o", ms=4, label=arm.name, **style)
    if finals:
        curves.set_ylim(min(finals) - 0.05, max(finals) + 0.6)
    curves.set(xlabel="steps / dense budget", ylabel="validation loss", title=f"{site} sites")
    if (target := grid.dense_loss()) is not None:
        tax.axhline(target, color="black", lw=1, label="dense twin (mean)")
    tax.set(xlabel="tokens / dense budget", ylabel="final validation loss", title="alignment tax")
    for ax in (curves, tax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


LABEL_OFFSETS = ((3, 3, "left"), (3, -10, "left"), (-3, 3, "right"), (-3, -10, "right"))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two boxes (left, bottom, right, top) overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _annotate_apart(ax: Any, labelled: list[tuple[str, float, float]]) -> None:
    """Label each point at the first offset whose text box overlaps no label placed before."""
    ax.autoscale_view()
    points_per_pixel = 72 / ax.figure.dpi
    placed: list[tuple[float, float, float, float]] = []
    for name, x, y in labelled:
        px, py = ax.transData.transform((x, y)) * points_per_pixel
        width, height = 4.5 * len(name), 9.0  # the box of 7-point text, in points
        for dx, dy, ha in LABEL_OFFSETS:
            left = px + dx - (width if ha == "right" else 0.0)
            box = (left, py + dy, left + width, py + dy + height)
            if not any(_overlap(box, other) for other in placed):
                break
        placed.append(box)
        ax.annotate(name, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points", ha=ha)


def _plot_trade(grid: Grid, site: str, out: Path) -> Path | None:
    """Penalty against dead features for every finished bottleneck arm of a site: the trade
    the recipe has to win on both axes at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = grid.dense_loss()
    points = [
        (arm, summary)
        for arm in grid.arms
        if arm.site == site and (summary := grid.summary(arm, 1.0)) is not None
    ]
    if dense is None or not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {
        "naive": "red",
        "strategy": "tab:blue",
        "combined": "black",
        "default": "green",
        "teacherless": "tab:cyan",
        "recipe": "tab:purple",
        "ablation": "tab:orange",
        "width": "grey",
    }
    labelled = []
    for arm, summary in points:
        dead = [v["dead_frac"] for v in summary["sites"].values()]
        x = 100 * sum(dead) / len(dead)
        y = _change(summary["val_loss"], dense)
        ax.scatter(x, y, color=colors[arm.kind], s=25)
        labelled.append((arm.name.removeprefix(f"{site}-"), x, y))
    _annotate_apart(ax, labelled)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.axvline(5.0, color="black", lw=0.8, ls="--")
    ax.set(
        xlabel="dead features, mean over bottlenecks (%)",
        ylabel="validation-loss penalty vs dense twins (%)",
        title=f"{site} sites: penalty against dead features (target: below and left of "
        "the dashed lines)",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _longer_budgets(grid: Grid) -> list[str]:
    """Each continued arm's final loss at every budget multiple, against dense-s0's own loss
    at the same multiple: whether the penalty shrinks or grows with more tokens."""
    dense = grid.arm("dense-s0")
    reference = {m: s["val_loss"] for m in dense.multiples if (s := grid.summary(dense, m))}
    arms = [a for a in grid.arms if len(a.multiples) > 1 and grid.summary(a, a.multiples[1])]
    if len(reference) < 2 or not arms:
        return ["No arm has been continued past the budget yet.", ""]
    lines = [
        "| run | " + " | ".join(f"{m:g}×" for m in dense.multiples) + " |",
        "|---|" + "---|" * len(dense.multiples),
    ]
    for arm in arms:
        cells = []
        for m in dense.multiples:
            summary = grid.summary(arm, m) if m in arm.multiples else None
            if summary is None:
                cells.append("–")
            elif arm is dense:
                cells.append(f"{summary['val_loss']:.4f}")
            else:
                pen = _penalty(summary["val_loss"], reference.get(m))
                cells.append(f"{summary['val_loss']:.4f} ({pen})")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _ablation_table(grid: Grid, site: str) -> list[str]:
    """The teacherless recipe less one strategy: loss and dead features against the recipe's."""
    seeds = [
        s
        for a in grid.arms
        if a.site == site and a.kind == "teacherless" and (s := grid.summary(a, 1.0))
    ]
    rows = [a for a in grid.arms if a.site == site and a.kind == "ablation"]
    if not rows:
        return []
    base = sum(s["val_loss"] for s in seeds) / len(seeds) if seeds else None
    lines = [
        f"| {site}: recipe without | val loss | vs recipe | dead % | FVU |",
        "|---|---|---|---|---|",
    ]
    for arm in rows:
        removed = arm.name.split("-no-distill-no-")[1]
        summary = grid.summary(arm, 1.0)
        if summary is None:
            lines.append(f"| {removed} | {_status(grid, arm)} | – | – | – |")
            continue
        lines.append(
            f"| {removed} | {summary['val_loss']:.4f} | {_penalty(summary['val_loss'], base)} "
            f"| {_per_site(summary, 'dead_frac', '.1%')} | {_per_site(summary, 'fvu', '.3f')} |"
        )
    return [*lines, ""]


def estimate_hours(grid: Grid) -> tuple[float, float]:
    """Calibrated run time of the whole grid: (no run needs a continuation nor a wider model,
    every bottleneck run goes to the last branch and every width is tried)."""
    demo = dense_flops_per_token(build(ModelConfig, {**DEMO, "vocab_size": 8192}, "demo"))
    demo *= DEMO_TOKENS_PER_STEP
    low = high = 0.0
    for arm in grid.arms:
        cfg = grid.run_config(arm)
        dense = {**arm.model, "bottleneck": [], "vocab_size": grid.vocab_size}
        flops = dense_flops_per_token(build(ModelConfig, dense, arm.name))
        ratio = flops * cfg.train.batch_size * cfg.model.context / demo
        teacher = TEACHER_COST if cfg.strategy.teacher_run else 0.0
        slow = [1.0, 1.0] if arm.site is None else list(BOTTLENECK_SLOWDOWN)
        stretch = max(arm.multiples) * grid.n + (len(arm.multiples) - 1) * grid.decay
        counted = arm.kind != "width"
        low += counted * grid.n * ratio * DEMO_SECONDS_PER_STEP[0] * (slow[0] + teacher)
        high += stretch * ratio * DEMO_SECONDS_PER_STEP[1] * (slow[1] + teacher)
    return low / 3600, high / 3600


def _machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}"


def _wall_time(grid: Grid) -> str:
    folders = [grid.metrics_dir(arm, m) for arm in grid.arms for m in arm.multiples]
    files = [f / "timing.json" for f in folders if f is not None]
    seconds = sum(json.loads(f.read_text())["seconds"] for f in files if f.is_file())
    return _hours(seconds / 3600)


def _hours(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min"


def _model(model: dict[str, Any]) -> str:
    return (
        f"{model['n_layers']} layers, d_model {model['d_model']}, {model['n_heads']} heads, "
        f"d_ff {model['d_ff']}, context {model['context']}"
    )


FINDINGS = (
    "<!-- findings: written by hand, kept when the page is regenerated -->",
    "<!-- /findings -->",
)


def _findings(page: Path) -> list[str]:
    """The hand-written findings block of the existing page (a placeholder when it has none)."""
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    start, end = text.find(FINDINGS[0]), text.find(FINDINGS[1])
    if start < 0 or end < start:
        return [FINDINGS[0], "", "No findings written yet.", "", FINDINGS[1]]
    return text[start : end + len(FINDINGS[1])].split("\n")


def _default_extra_drops(grid: Grid) -> str:
    """The strategies the default recipe leaves out besides distillation."""
    return ", ".join(d for d in grid.default_drops if d != "distill")


def _trades(grid: Grid) -> list[str]:
    """Strategies left out of the combined recipe (each has a `combined+NAME` arm)."""
    return sorted({a.name.split("combined+")[1] for a in grid.arms if "combined+" in a.name})


def _strategy_table(grid: Grid) -> list[str]:
    lines = ["| arm | [strategy] settings |", "|---|---|"]
    for arm in grid.arms:
        if arm.kind not in ("dense", "wide", "width") and not arm.name.endswith("-s1"):
            settings = ", ".join(
                f"{k} = {v}" for k, v in arm.strategy.items() if k != "teacher_run"
            )
            teacher = " (teacher: dense-s0)" if "teacher_run" in arm.strategy else ""
            lines.append(f"| {arm.name} | {settings}{teacher} |")
    return lines


def write_results(grid: Grid, scale_name: str, command: str, page: Path, img_dir: Path) -> Path:
    """Write the results page and its plots; return the page's path."""
    scale, n = grid.scale, grid.n
    cfg = grid.run_config(grid.arms[0])
    tokens = n * cfg.train.batch_size * cfg.model.context
    low, high = estimate_hours(grid)
    planned = [a for a in grid.arms if a.kind != "width"]
    done = sum(grid.summary(a, 1.0) is not None for a in planned)
    widths = sum(grid.summary(a, 1.0) is not None for a in grid.arms if a.kind == "width")
    lines = [
        "# Results: the alignment tax of joint bottlenecks",
        "",
        "Generated by `scripts/alignment_tax.py` (issue 4) from the runs that have finished; "
        "rerun the command to resume the grid and refresh this page.",
        "",
        f"- **Command:** `{command}`",
        f"- **Scale `{scale_name}`:** {scale.note}. Model: {_model(scale.model)}; dense budget "
        f"N = {n} steps × {cfg.train.batch_size} × {cfg.model.context} = {tokens:,} tokens; "
        f"lr {cfg.train.lr} with warm-up {cfg.train.warmup_steps} steps, stable, then a linear "
        f"decay over the last {grid.decay} steps to {cfg.train.min_lr_ratio}× (WSD).",
        "- **Bottlenecks:** "
        + "; ".join(
            f"{site}: " + ", ".join(f"layer {lay} (F = {w}, k = {k})" for lay, w, k in b)
            for site, b in scale.sites.items()
        )
        + f". Dead = no firing in {scale.dead_tokens:,} tokens.",
        f"- **Alignment tax:** decays branched off the stable phase at "
        f"{', '.join(f'{m:g}' for m in grid.arm('resid-naive').multiples)} times the dense "
        "budget, each continuing the previous one's stable phase; the tax is where "
        "the final validation loss crosses the dense twins' mean, interpolated linearly. "
        f"Arms continued: {', '.join(grid.tax_kinds)} (`--tax-all` continues every one).",
        f"- **Dense budget check:** {_dense_flatness(grid)}",
        f"- **Machine:** {_machine()}. Training time so far: {_wall_time(grid)}; "
        f"{done} of {len(planned)} budget runs finished, and {widths} wider model(s) of the "
        "width search (it stops at the first width that reaches the dense loss).",
        f"- **Estimated run time of the whole grid** on 2 CPU cores: {_hours(low)} to "
        f"{_hours(high)} "
        "(calibration of issue 4: 300 steps of the demo model in 5–10 min, bottleneck steps "
        "1.4–2.0× slower, scaled by training FLOPs; the low end needs no continuation and no "
        "wider model, the high end continues every continued arm to the last branch).",
        "",
        "Targets of issue 4 for the combined recipe: a penalty of at most 1% against the "
        "same-architecture twin at the dense budget with at most 5% dead features, and an "
        "alignment tax of at most 1.15×.",
        "",
        "## Findings",
        "",
        *_findings(page),
        "",
        "## Validation loss at the dense budget, penalty and tax",
        "",
        "Penalty: against the dense twins' mean (`vs dense`) and against the dense twin widened "
        "to the bottleneck model's parameter count (`vs wide`; for mlp sites the parameter "
        "counts already match). L0, dead % and FVU list each bottleneck in depth order; FVU is "
        "measured at resid sites only, and above 1 means ĥ is the model's own sparse state "
        "rather than an approximation of h (DESIGN.md, The bottleneck).",
        "",
        "| run | site | status | val loss | vs dense | vs wide | tax | L0 | dead % | FVU "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(grid, a) for a in grid.arms if a.kind != "width"),
        "",
        "## Longer budgets",
        "",
        "Final validation loss of every continued run at each budget multiple (each decayed "
        "from the previous one's stable phase), with its penalty against dense-s0 continued "
        "the same way: whether more tokens close or widen the gap. A run stops being "
        "continued once it reaches the dense twins' loss at the budget, except the dense twin "
        "and the default recipe, which go to the last branch.",
        "",
        *_longer_budgets(grid),
        "## Width that offsets the penalty",
        "",
        "The default recipe at growing d_model (d_ff scaled alike), until one reaches the dense "
        "twin's loss at the same budget:",
        "",
        *(f"- {_width_search(grid, site)}" for site in scale.sites),
        "",
        "## Leave one out of the teacherless recipe",
        "",
        "The teacherless recipe (`combined-no-distill`) less one strategy at a time, one seed; "
        "`vs recipe` is against the mean of the recipe's two seeds (their spread is the noise "
        "to read these against). The scatter plots put every bottleneck arm on both targets "
        "at once.",
        "",
        *(line for site in scale.sites for line in _ablation_table(grid, site)),
        *(
            f"![{site}: penalty against dead features]({os.path.relpath(plot, page.parent)})\n"
            for site in scale.sites
            if (plot := _plot_trade(grid, site, img_dir / f"{site}-trade.png")) is not None
        ),
        "## Strategy settings",
        "",
        "Naive insertion turns every switch off (the encoder still starts as the decoder's "
        "transpose); each other arm turns one on; the combined recipe turns on all that apply "
        f"except {', '.join(_trades(grid))}, which trade validation loss for live features "
        "(the `combined+` and `combined-no-distill+` arms add them to each); "
        "`combined-no-distill` (two seeds) is the recipe without a dense teacher; `default` (two "
        f"seeds, the configs' recipe) also leaves out {_default_extra_drops(grid)}, whose "
        "leave-one-out row shows it costs loss.",
        "",
        *_strategy_table(grid),
        "",
        "## Loss curves",
        "",
    ]
    for site in scale.sites:
        plot = _plot_site(grid, site, img_dir / f"{site}.png")
        if plot is None:
            lines.append(f"{site}: no runs yet.")
        else:
            lines.append(f"![{site} sites]({os.path.relpath(plot, page.parent)})")
        lines.append("")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines), encoding="utf-8")
    return page
