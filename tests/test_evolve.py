"""Feature matching and evolution against hand-built references on fresh random inputs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from saeformer.analysis.evolve import (
    from_then_on,
    lineage,
    one_to_many,
    read_evolution,
)
from saeformer.analysis.matching import match_features, top_candidates, unit_rows
from saeformer.cli import main
from saeformer.errors import UserError


def _noisy_permutation(rng, width: int, dim: int, noise: float):
    a = rng.standard_normal((width, dim)).astype(np.float32)
    perm = rng.permutation(width)
    b = a[perm] + noise * rng.standard_normal((width, dim)).astype(np.float32)
    return a, b, np.argsort(perm)  # row i of A is row argsort(perm)[i] of B


@pytest.mark.parametrize("method", ["hungarian", "sparse", "mnn"])
def test_matching_recovers_a_noisy_permutation(method):
    rng = np.random.default_rng()
    a, b, expected = _noisy_permutation(rng, 300, 48, noise=0.25)
    match = match_features(a, b, method)
    assert match.method == method
    np.testing.assert_array_equal(match.target, expected)
    ua, ub = unit_rows(a), unit_rows(b)
    np.testing.assert_allclose(match.cosine, (ua * ub[expected]).sum(1), rtol=1e-5)
    assert match.cosine.min() > 0.8  # noise 0.25 in 48 dims: mean cosine ≈ 0.97


def test_sparse_matching_equals_hungarian_and_auto_picks_by_width():
    rng = np.random.default_rng()
    a, b, _ = _noisy_permutation(rng, 400, 24, noise=0.6)  # hard: many near candidates
    exact = match_features(a, b, "hungarian")
    sparse = match_features(a, b, "sparse", candidates=16)
    assert np.nansum(sparse.cosine) == pytest.approx(np.nansum(exact.cosine), rel=1e-3)
    assert match_features(a, b, exact_max=400).method == "hungarian"
    assert match_features(a, b, exact_max=399).method == "sparse"


def test_top_candidates_equal_a_full_sort():
    rng = np.random.default_rng()
    a = unit_rows(rng.standard_normal((1500, 8)))  # more rows than one block
    b = unit_rows(rng.standard_normal((700, 8)))
    scores = a @ b.T
    cand = top_candidates(a, b, 4)
    np.testing.assert_array_equal(cand.row_top, np.argsort(-scores, axis=1)[:, :4])
    np.testing.assert_array_equal(cand.col_top, np.argsort(-scores, axis=0)[:4].T)


def test_birth_and_stabilisation_on_a_synthetic_trajectory():
    steps = np.array([1, 2, 4, 8, 16])
    density = np.array(
        [
            [0.2, 0.0, 0.0, 0.3],
            [0.0, 0.0, 0.1, 0.3],
            [0.1, 0.0, 0.1, 0.3],
            [0.2, 0.0, 0.0, 0.3],
            [0.2, 0.0, 0.2, 0.3],
        ]
    )
    born = from_then_on(density >= 0.05, steps)
    assert born.tolist() == [4, -1, 16, 1]  # alive from then on; feature 1 never
    cos = np.array([[0.5, 0.95, 0.2], [0.91, 0.5, 0.3], [0.92, 0.93, 0.95], [1.0, 1.0, 1.0]])
    assert from_then_on(cos >= 0.9, steps[:4]).tolist() == [2, 4, 4]


def test_lineage_follows_a_chain_of_permutations():
    rng = np.random.default_rng()
    p1, p2 = rng.permutation(10), rng.permutation(10)  # snapshot 0 → 1 → 2
    p2[3] = -1  # feature 3 of snapshot 1 has no match: its descendants lose their past
    ancestors = lineage([p1, p2], 10)
    assert ancestors[2].tolist() == list(range(10))
    for f in range(10):
        parent = np.flatnonzero(p2 == f)
        if len(parent):
            assert ancestors[1, f] == parent[0]
            assert ancestors[0, f] == np.flatnonzero(p1 == parent[0])[0]
        else:
            assert ancestors[1, f] == -1 and ancestors[0, f] == -1


def test_splits_and_merges_are_one_to_many_matches():
    e = np.eye(8)
    unit = unit_rows
    before = e[:4]
    after = unit(np.stack([e[0] + 0.6 * e[4], e[0] + 0.6 * e[5], e[1], e[2] + e[3]]))
    split, merge = one_to_many(before, after, 0.5)
    assert split.tolist() == [True, False, False, False]  # e0 → two features
    assert merge.tolist() == [False, False, False, True]  # e2, e3 → one feature
    same, none = one_to_many(after, after, 0.5)  # near-duplicates that persist: no event
    assert not same.any() and not none.any()


def _write_fake_snapshot(run, step, decoders, density, entropy):
    folder = run / "snapshots" / f"step_{step}"
    for bid, dec in decoders.items():
        (folder / bid).mkdir(parents=True)
        tensors = {
            "decoder": torch.from_numpy(dec).half(),
            "frequency": torch.from_numpy(density[bid]).float(),
            "token_entropy": torch.from_numpy(entropy[bid]).float(),
        }
        save_file(tensors, folder / bid / "features.safetensors")
        (folder / bid / "meta.json").write_text(json.dumps({"step": step, "tokens": 100 * step}))
    (folder / "meta.json").write_text(json.dumps({"bottlenecks": list(decoders)}))


def test_evolve_run_on_synthetic_snapshots(tmp_path, capsys):
    """Feature f turns towards its final row at a known step; rows are shuffled in between."""
    rng = np.random.default_rng()
    width, dim, steps = 24, 64, [10, 20, 30, 40]
    final = unit_rows(rng.standard_normal((width, dim)))
    settle = rng.integers(0, 4, width)  # snapshot index from which feature f is final-like
    silent_until = rng.integers(0, 4, width)
    other = unit_rows(rng.standard_normal((width, dim)))  # each feature's earlier direction
    for s, step in enumerate(steps):
        mix = np.where(s >= settle, 1.0, 0.3)[:, None]
        rows = unit_rows(mix * final + (1 - mix) * other)
        perm = rng.permutation(width) if s < 3 else np.arange(width)
        density = np.where(s >= silent_until, 0.01, 0.0)
        entropy = s + np.arange(width) / 100
        _write_fake_snapshot(
            tmp_path,
            step,
            {"resid.1": rows[perm]},
            {"resid.1": density[perm]},
            {"resid.1": entropy[perm]},
        )
    assert main(["evolve", str(tmp_path), "--method", "hungarian"]) == 0
    assert "hungarian matching" in capsys.readouterr().out
    site = read_evolution(tmp_path, "resid.1")
    f = site.features.set_index("feature")
    expected_stable = np.array(steps)[settle]
    np.testing.assert_array_equal(f["stable_step"].to_numpy(), expected_stable)
    np.testing.assert_array_equal(f["birth_step"].to_numpy(), np.array(steps)[silent_until])
    for row in f.itertuples():  # the lineage follows each feature through the shuffles
        np.testing.assert_allclose(
            row.entropy_trajectory, np.arange(4) + row.Index / 100, rtol=1e-6
        )
    stable_frac = [(settle <= s).mean() for s in range(4)]
    np.testing.assert_allclose(site.steps["stable_frac"], stable_frac)
    assert site.steps["tokens"].tolist() == [1000, 2000, 3000, 4000]
    assert any((tmp_path / "tb" / "evolve").iterdir())
    assert isinstance(
        pd.read_parquet(tmp_path / "evolution" / "resid.1.steps.parquet"), pd.DataFrame
    )


def test_evolve_without_snapshots_is_one_line(tmp_path, capsys):
    assert main(["evolve", str(tmp_path)]) == 2
    assert "no snapshots" in capsys.readouterr().err


def test_an_unknown_matching_method_is_a_user_error():
    with pytest.raises(UserError, match="unknown matching method"):
        match_features(np.eye(3), np.eye(3), "greedy")


def test_a_snapshot_naming_a_path_is_refused(tmp_path, capsys):
    rows = unit_rows(np.random.default_rng().standard_normal((4, 8)))
    _write_fake_snapshot(
        tmp_path, 1, {"resid.0": rows}, {"resid.0": np.ones(4)}, {"resid.0": np.ones(4)}
    )
    meta = tmp_path / "snapshots" / "step_1" / "meta.json"
    meta.write_text(json.dumps({"bottlenecks": ["../../escaped"]}))
    assert main(["evolve", str(tmp_path)]) == 2
    assert "not a bottleneck id" in capsys.readouterr().err
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "evolution").exists()
