"""Convergence strategies: schedules at chosen steps, AuxK, decoder norm, distillation, hints."""

import math

import pytest
import torch

from saeformer.errors import UserError
from saeformer.model import AuxRequest, Bottleneck
from saeformer.train.config import StrategyConfig, TrainConfig, load_config
from saeformer.train.schedules import bottleneck_lr_scale, lr_at
from saeformer.train.strategy import distill_loss
from saeformer.train.trainer import Trainer


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(
        steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2
    )
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert [lr_at(s, cfg) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_at(90, cfg) == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_a_decay_branched_off_the_stable_phase_continues_it_exactly():
    common = {"lr": 1.0, "warmup_steps": 10, "schedule": "wsd"}
    stable = TrainConfig(steps=300, decay_fraction=0.0, **common)
    branch = TrainConfig(steps=340, decay_fraction=40 / 340, **common)
    assert [lr_at(s, branch) for s in range(300)] == [lr_at(s, stable) for s in range(300)]
    assert lr_at(320, branch) == pytest.approx(1.0 - 0.9 * 20 / 40)


def test_bottleneck_warmup_factor():
    cfg = StrategyConfig(bottleneck_warmup_steps=4)
    assert [bottleneck_lr_scale(s, cfg) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert bottleneck_lr_scale(0, StrategyConfig()) == 1.0


def test_bottleneck_lr_warmup_reaches_the_optimizer_groups(tmp_path, config_file):
    over = ["strategy.bottleneck_warmup_steps=4", "strategy.bottleneck_lr_mult=0.5"]
    trainer = Trainer(load_config(config_file, over), tmp_path / "run")
    # train.lr = 3e-3 with warmup_steps = 5: the scheduled lr at step s < 5 is 3e-3·(s+1)/5.
    for step, bottleneck_factor in [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (4, 1.0)]:
        stats = trainer.train_step()
        lr = 3e-3 * (step + 1) / 5
        groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert groups["decay"] == pytest.approx(lr)
        assert groups["no_decay"] == pytest.approx(lr)
        assert groups["bottleneck"] == pytest.approx(lr * 0.5 * bottleneck_factor)
        assert stats["train/bottleneck_lr"] == pytest.approx(groups["bottleneck"])


def test_alpha_and_k_schedules_per_bottleneck(tmp_path, config_file):
    trainer = Trainer(load_config(config_file), tmp_path / "run")
    # α over 10 steps at resid sites only; k from 32 to 8 over 20 steps in 4 geometric levels:
    # 32·(8/32)^(level/4) = 32, 22.6, 16, 11.3, then 8.
    expected = {0: (0.0, 32), 5: (0.5, 23), 10: (1.0, 16), 15: (1.0, 11), 20: (1.0, 8)}
    for step, (alpha, k) in expected.items():
        alphas, ks = trainer.schedule(step)
        assert alphas == {"resid.0": alpha}
        assert ks == {"resid.0": k, "mlp.1": k}


def _auxk(dead: torch.Tensor) -> float:
    torch.manual_seed(1)
    bottleneck = Bottleneck(d_model=16, width=64, k=4)
    h = torch.randn(32, 16, requires_grad=True)
    _, site = bottleneck(h, aux=AuxRequest(dead_mask=dead, k_aux=8))
    return site.auxk_loss.item()


def test_auxk_is_zero_without_dead_features_and_positive_with_some():
    assert _auxk(torch.zeros(64, dtype=torch.bool)) == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:10]] = True
    assert _auxk(dead) > 0.0


@pytest.mark.parametrize("unit_norm", [True, False])
def test_decoder_rows_stay_unit_norm_after_steps(tmp_path, config_file, unit_norm):
    cfg = load_config(config_file, [f"strategy.unit_norm_decoder={str(unit_norm).lower()}"])
    trainer = Trainer(cfg, tmp_path / "run")
    for _ in range(5):
        trainer.train_step()
    norms = trainer.model.bottleneck("resid.0").W_dec.norm(dim=1)
    if unit_norm:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:  # the switch is what keeps them there
        assert (norms - 1).abs().max() > 1e-3


def test_b_dec_moves_to_the_batch_mean_of_its_input(tmp_path, config_file):
    """After one step b_dec = b' + rate·(mean h − b'), b' the optimizer's b_dec (rate 0)."""
    sets = ["train.grad_accum=2", "strategy.b_dec_mean_rate="]
    trainers = {
        r: Trainer(load_config(config_file, [sets[0], sets[1] + r]), tmp_path / r)
        for r in ("0", "0.25")
    }
    seen: list[torch.Tensor] = []
    bottleneck = trainers["0.25"].model.bottleneck("resid.0")
    bottleneck.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    for trainer in trainers.values():
        trainer.train_step()
    assert len(seen) == 2  # one per micro-batch
    mean = torch.cat([h.reshape(-1, h.shape[-1]) for h in seen]).double().mean(0)
    moved = trainers["0"].model.bottleneck("resid.0").b_dec.detach().double()
    want = moved + 0.25 * (mean - moved)
    torch.testing.assert_close(bottleneck.b_dec.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert (bottleneck.b_dec.detach() - moved).norm() > 1e-3  # far beyond the tolerance
    with pytest.raises(UserError, match="b_dec_mean_rate"):
        load_config(
            config_file, ["model.vocab_size=512", "strategy.b_dec_mean_rate=1.5"]
        ).validate()


def test_distill_loss_against_a_hand_computed_kl():
    student, teacher, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11), 2.0
    p = torch.softmax(teacher / t, dim=-1)
    q = torch.softmax(student / t, dim=-1)
    expected = t * t * (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distill_loss(student, teacher, t), expected)
    assert distill_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_term_is_zero_for_an_identical_teacher_and_positive_otherwise(
    tmp_path, config_file
):
    dense = ["model.bottleneck=[]"]
    teacher = Trainer(load_config(config_file, dense), tmp_path / "teacher")
    teacher.save()  # step 0: the same weights a same-seed student starts from
    kd = [f"strategy.teacher_run={tmp_path / 'teacher'}", "strategy.kd_coef=0.5"]
    same = Trainer(load_config(config_file, dense + kd), tmp_path / "same")
    assert same.train_step()["train/kd_loss"] == 0.0
    assert same.train_step()["train/kd_loss"] > 0.0  # the student moved, the teacher did not
    other = Trainer(load_config(config_file, dense + kd + ["train.seed=1"]), tmp_path / "other")
    first = other.train_step()
    assert first["train/kd_loss"] > 0.0
    assert math.isfinite(first["train/loss"])
    assert not any(p.requires_grad for p in other.distiller.model.parameters())


def test_distillation_needs_a_teacher_and_a_positive_temperature(config_file):
    kd = ["model.vocab_size=512", "strategy.kd_coef=1.0"]
    for over in ([], ["strategy.teacher_run=x", "strategy.temperature=0"]):
        with pytest.raises(UserError, match="teacher_run"):
            load_config(config_file, kd + over).validate()


def test_keep_last_dense_hint_is_printed_not_raised(tmp_path, config_file, capsys):
    Trainer(load_config(config_file), tmp_path / "late")  # mlp.1 sits in the last of 2 blocks
    assert "mlp.1 in the last 1 block(s)" in capsys.readouterr().out
    Trainer(load_config(config_file, ["strategy.keep_last_dense=0"]), tmp_path / "silent")
    assert "hint" not in capsys.readouterr().out
    early = load_config(config_file, ["model.bottleneck.1.layer=0"])
    assert early.hints() == []
    early.strategy.keep_last_dense = 2
    assert "resid.0, mlp.0 in the last 2 block(s)" in early.hints()[0]


def test_dead_features_encoder_bias_rises_by_the_rate_and_live_ones_stay(tmp_path, config_file):
    """After one step b_enc = b' + rate·[dead], b' the optimizer's b_enc (rate 0), dead meaning
    no firing for dead_tokens tokens, counted after the step."""
    trainers = {
        r: Trainer(load_config(config_file, [f"strategy.dead_bias_rate={r}"]), tmp_path / r)
        for r in ("0", "0.25")
    }
    for trainer in trainers.values():
        half = len(trainer.since_fired["resid.0"]) // 2
        trainer.since_fired["resid.0"][:half] = 10**9  # long dead, and negative on every token:
        with torch.no_grad():
            trainer.model.bottleneck("resid.0").b_enc[:half] = -30.0
        trainer.train_step()
    trainer = trainers["0.25"]
    dead = trainer.since_fired["resid.0"] >= trainer.cfg.strategy.dead_tokens
    assert dead[: len(dead) // 2].all() and not dead[len(dead) // 2 :].all()
    moved = trainers["0"].model.bottleneck("resid.0").b_enc.detach()
    raised = trainer.model.bottleneck("resid.0").b_enc.detach()
    torch.testing.assert_close(raised - moved, 0.25 * dead.float(), rtol=0, atol=1e-5)
