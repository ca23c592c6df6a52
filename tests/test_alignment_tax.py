"""scripts/alignment_tax.py at smoke scale: tax interpolation, fair continuation, the page."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from alignment_tax import SCALES, Grid, main  # noqa: E402
from alignment_tax_report import flat_budget, tax_from, write_results  # noqa: E402

from saeformer.analysis.curves import read_metrics  # noqa: E402
from saeformer.train.checkpoint import latest_checkpoint  # noqa: E402
from saeformer.train.trainer import Trainer  # noqa: E402


def test_tax_is_interpolated_where_the_loss_crosses_the_dense_loss():
    assert tax_from([(1.0, 5.0), (1.5, 4.0)], 4.5, complete=True) == "1.25×"
    assert tax_from([(1.0, 4.0)], 4.5, complete=True) == "≤ 1.00×"
    assert tax_from([(1.0, 5.0), (2.0, 4.9)], 4.5, complete=True) == "> 2.00×"
    assert tax_from([(1.0, 5.0)], 4.5, complete=False) == "> 1.00× (running)"


def test_a_longer_branch_equals_a_straight_run_of_its_length(tmp_path, data_dir):
    grid = Grid(SCALES["smoke"], 10, tmp_path / "runs", data_dir)
    arm = grid.arm("resid-naive")
    grid.train_branch(arm, 0)  # stable to step 8, then decays to 10; seeds x1.25 at step 8
    grid.train_branch(arm, 1)  # stable 8 → 10, then decays to 12
    cfg = grid.run_config(arm)
    cfg.train.steps, cfg.train.decay_fraction = 12, 2 / 12
    straight = Trainer(cfg, tmp_path / "straight").run()
    branch = grid.branch_dir(arm, 1.25)
    assert json.loads((branch / "summary.json").read_text())["val_loss"] == straight["val_loss"]
    losses = dict(read_metrics(tmp_path / "straight")["train/loss"])
    for step, loss in read_metrics(branch)["train/loss"]:
        assert losses[step] == loss, step
    assert not (branch / "checkpoints").exists() or not any((branch / "checkpoints").iterdir())
    assert (grid.branch_dir(arm, 1.0) / "checkpoints" / "step_10").is_dir()

    dense = grid.arm("dense-s0")  # the loss to put penalties against, at 1× and 1.25×
    grid.train_branch(dense, 0)
    grid.train_branch(dense, 1)
    page = write_results(grid, "smoke", "cmd", tmp_path / "docs" / "results.md", tmp_path / "img")
    text = page.read_text()
    assert "| resid-naive | resid | done | " in text and "| dense-s1 | – | not run |" in text
    cells = []
    for multiple in (1.0, 1.25):
        loss, ref = (grid.summary(a, multiple)["val_loss"] for a in (arm, dense))
        cells.append(f"{loss:.4f} ({100 * (loss - ref) / ref:+.2f}%)")
    assert f"| resid-naive | {cells[0]} | {cells[1]} | – | – | – |" in text
    assert "![resid sites](../img/resid.png)" in text and (tmp_path / "img" / "resid.png").is_file()
    assert (tmp_path / "img" / "resid-trade.png").is_file()


def test_leave_one_out_arms_and_the_default_recipe(tmp_path, data_dir):
    grid = Grid(SCALES["smoke"], 10, tmp_path / "runs", data_dir)
    recipe = grid.arm("resid-combined-no-distill-s0").strategy
    assert "teacher_run" not in recipe and recipe["unit_norm_decoder"] is True
    no_unit_norm = grid.arm("resid-combined-no-distill-no-unit-norm").strategy
    assert no_unit_norm == {**recipe, "unit_norm_decoder": False}
    no_auxk = grid.arm("resid-combined-no-distill-no-auxk").strategy
    assert no_auxk == {k: v for k, v in recipe.items() if k not in ("aux_coef", "k_aux")}
    no_auxk_s1 = grid.arm("resid-combined-no-distill-no-auxk-s1")
    assert no_auxk_s1.strategy == no_auxk and no_auxk_s1.seed == 1
    ablations = {a.name for a in grid.arms if a.kind == "ablation"}
    assert "resid-combined-no-distill-no-unit-norm-s1" not in ablations  # one seed unless listed
    assert "resid-combined-no-distill-no-distill" not in ablations
    assert "mlp-combined-no-distill-no-auxk" not in ablations  # AuxK is a resid strategy here
    default = grid.arm("resid-default-s1").strategy
    assert default == {k: v for k, v in recipe.items() if k != "bottleneck_lr_mult"}
    assert grid.arm("resid-default-s1").seed == 1
    assert [a.name for a in grid.width_ladder("mlp")][:2] == ["mlp-default-s0", "mlp-default-d40"]


def test_the_hand_written_findings_survive_a_rewrite_of_the_page(tmp_path, data_dir):
    grid = Grid(SCALES["smoke"], 10, tmp_path / "runs", data_dir)
    page = write_results(grid, "smoke", "cmd", tmp_path / "results.md", tmp_path / "img")
    assert "No findings written yet." in page.read_text()
    text = page.read_text().replace("No findings written yet.", "AuxK <b>works</b> alone.")
    page.write_text(text.replace("| dense-s0 |", "| stale |"))
    text = write_results(grid, "smoke", "cmd", page, tmp_path / "img").read_text()
    assert "AuxK <b>works</b> alone." in text and "No findings" not in text
    assert "| stale |" not in text and text.count("## Findings") == 1


def test_records_resume_the_grid_and_its_page_without_the_run_folders(tmp_path, data_dir):
    def grid():
        return Grid(SCALES["smoke"], 10, tmp_path / "runs", data_dir, records=tmp_path / "rec")

    def page(g, name):
        return write_results(g, "smoke", "cmd", tmp_path / name, tmp_path / "img").read_text()

    first = grid()
    dense = first.arm("dense-s0")
    first.train_branch(dense, 0)
    first.train_branch(dense, 1)
    summaries = [first.summary(dense, m) for m in (1.0, 1.25)]
    before = page(first, "before.md")
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: only the records are left

    second = grid()
    assert [second.summary(dense, m) for m in (1.0, 1.25)] == summaries
    assert page(second, "after.md") == before
    recorded = {
        k
        for line in (first.record_dir(dense, 1.0) / "metrics.jsonl").open()
        for k in json.loads(line)
    }
    assert recorded == {"step", "val/loss", "train/loss", "train/tokens_per_s"}
    # x1.50 was seeded from x1.25's stable phase, now gone: it trains that phase again from 0
    second.train_branch(dense, 2)
    first_part = dict(read_metrics(second.record_dir(dense, 1.0))["train/loss"])  # to step 8
    stable = {**first_part, **dict(read_metrics(second.record_dir(dense, 1.25))["train/loss"])}
    again = dict(read_metrics(second.branch_dir(dense, 1.5))["train/loss"])
    assert [again[s] for s in range(1, 11)] == [stable[s] for s in range(1, 11)]
    # the distillation teacher needs its weights: retrained, it reproduces its record
    assert latest_checkpoint(second.branch_dir(dense, 1.0)) is None
    assert second.teacher_ready()
    assert latest_checkpoint(second.branch_dir(dense, 1.0)) is not None
    retrained = json.loads((second.branch_dir(dense, 1.0) / "summary.json").read_text())
    assert retrained["val_loss"] == summaries[0]["val_loss"]


def test_a_run_of_another_recipe_is_not_taken_for_the_arm(tmp_path, data_dir):
    def grid(*sets):
        return Grid(
            SCALES["smoke"], 10, tmp_path / "runs", data_dir, list(sets), records=tmp_path / "rec"
        )

    old, new = grid(), grid("strategy.k_aux=16")
    naive = old.arm("resid-naive")
    old.train_branch(naive, 0)
    assert old.summary(naive, 1.0) is not None and new.summary(naive, 1.0) is None
    new.train_branch(naive, 0)  # the old run folder and its record are replaced
    assert new.summary(naive, 1.0) is not None and old.summary(naive, 1.0) is None
    for folder in (new.record_dir(naive, 1.0), new.branch_dir(naive, 1.25)):  # the seeded next
        assert json.loads((folder / "arm.json").read_text()) == new.fingerprint(naive)
    assert (
        json.loads((new.branch_dir(naive, 1.0) / "config.json").read_text())["strategy"]["k_aux"]
        == 16
    )


def test_report_only_keeps_a_page_that_nothing_here_can_regenerate(tmp_path, data_dir, capsys):
    page = tmp_path / "results.md"
    page.write_text("a table from run folders that are gone")
    where = ["--data", str(data_dir), "--out", str(tmp_path / "runs"), "--results", str(page)]
    where += ["--records", str(tmp_path / "rec"), "--img-dir", str(tmp_path / "img")]
    assert main(["--scale", "smoke", "--report-only", *where]) == 0
    assert page.read_text() == "a table from run folders that are gone"
    assert f"kept {page}" in capsys.readouterr().out


def test_flat_budget_recovers_a_power_law_and_where_it_flattens():
    rng = np.random.default_rng()
    e, a, b = rng.uniform(3.5, 4.5), rng.uniform(0.2, 0.6), rng.uniform(0.4, 1.2)
    points = [(m, e + a * m**-b) for m in (1.0, 1.25, 1.5, 2.0, 3.0)]
    fit_e, fit_b, flat = flat_budget(points)
    assert fit_e == pytest.approx(e, rel=1e-4) and fit_b == pytest.approx(b, rel=1e-3)

    def gain(m):  # percent lost by training 1.5× longer from m
        return 100 * (1 - (e + a * (1.5 * m) ** -b) / (e + a * m**-b))

    assert gain(flat) == pytest.approx(1.0, rel=1e-3)
    assert gain(0.9 * flat) > 1.0 > gain(1.1 * flat)
    assert flat_budget(points[:3]) is None  # too few budgets to fit three parameters
