"""Schedules and metrics against hand-computed values."""

import math

import pytest
import torch

from saeformer.analysis.metrics import dead_fraction, firing_counts, fvu, l0
from saeformer.train.config import StrategyConfig, TrainConfig
from saeformer.train.schedules import alpha_at, k_at, lr_at
from saeformer.train.strategy import update_dead_counters


def test_lr_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_alpha_fade_in():
    cfg = StrategyConfig(alpha_warmup_steps=100)
    assert [alpha_at(s, cfg) for s in (0, 25, 100, 500)] == [0.0, 0.25, 1.0, 1.0]
    assert alpha_at(0, StrategyConfig()) == 1.0


def test_k_annealing_in_discrete_geometric_levels():
    cfg = StrategyConfig(k_start=512, k_anneal_steps=100, k_levels=4)
    ks = [k_at(s, 32, 4096, cfg) for s in range(0, 120, 5)]
    assert ks[0] == 512 and ks[-1] == 32
    assert sorted(set(ks), reverse=True) == [512, 256, 128, 64, 32]
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False))
    assert k_at(0, 32, 100, cfg) == 100  # k_start is capped at the width
    assert k_at(0, 32, 4096, StrategyConfig()) == 32


def test_fvu_l0_dead_fraction_by_hand():
    h = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); Σ‖h − mean‖² = 1+1+1+1 = 4
    h_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # Σ‖h − ĥ‖² = 1 + 1 = 2
    assert fvu(h, h_hat).item() == pytest.approx(0.5)
    assert l0(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])).item() == pytest.approx(1.5)
    since = torch.tensor([0, 5, 10, 20])
    assert dead_fraction(since, 10) == pytest.approx(0.5)


def test_firing_counts_and_dead_counters():
    values = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    indices = torch.tensor([[0, 1], [0, 3]])
    counts = firing_counts(values, indices, 5)
    assert counts.tolist() == [2, 0, 0, 1, 0]
    since = torch.tensor([7, 7, 7, 7, 7])
    update_dead_counters(since, counts, n_tokens=4)
    assert since.tolist() == [0, 11, 11, 0, 11]


def test_fvu_denominator_is_detached_when_asked():
    h = torch.randn(8, 3, requires_grad=True)
    h_hat = torch.randn(8, 3)
    fvu(h, h_hat, detach_denominator=True).backward()
    expected = 2 * (h - h_hat) / (h - h.mean(0)).pow(2).sum()
    torch.testing.assert_close(h.grad, expected.detach())
    assert not math.isnan(h.grad.sum().item())
