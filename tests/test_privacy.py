"""Differential privacy: model surgery, DP-SGD in the one trainer loop, accounting, statistics, central DP."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fopro_kd.config import Config, ConfigError, config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.models.student import build_student
from fopro_kd.models.teacher import build_teacher
from fopro_kd.privacy import (
    PrivacyBudgetExhausted,
    budget_reason,
    central_epsilon,
    central_noise_std,
    central_sensitivity,
    clip_update,
    derive_noise_multiplier,
    dp_fedavg_estimate,
    fixed_denominator,
    epsilon_of_history,
    privatize_statistics,
    statistics_policy,
    would_exceed_budget,
)
from fopro_kd.privacy.central import check_weights, replace_one_bound
from fopro_kd.privacy.local_dp import planned_statistics_events, planned_steps_per_round
from fopro_kd.privacy.sampling import PoissonBatchLoader
from fopro_kd.privacy.surgery import make_student_private_compatible, private_compatibility_problems
from fopro_kd.training.components import build_dp_student, build_models
from fopro_kd.training.trainer import LocalTrainer

SIZE = 32
DELTA = 1e-5


def dp_cfg(**sections) -> Config:
    values = {
        "data": {"image_size": SIZE, "num_classes": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": SIZE},
        "train": {"batch_size": 8, "epochs": 1, "method": "ekd"},
        "augment": {"enabled": False},
        "federation": {"num_rounds": 3, "local_epochs": 1},
        "privacy": {"mode": "local", "noise_multiplier": 1.0, "noise_seed": 0},
    }
    for key, val in sections.items():
        values.setdefault(key, {}).update(val)
    return config_from_dict(values)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_imageset([12, 8, 4], SIZE, seed=0)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(dp_cfg().teacher)


def make_trainer(cfg: Config, data, teacher) -> LocalTrainer:
    torch.manual_seed(0)
    uses_teacher = cfg.train.method in ("ekd", "fopro-kd")
    student, prompt = build_models(cfg, 3, teacher if uses_teacher else None)
    return LocalTrainer(cfg, student, teacher if uses_teacher else None, prompt, data.class_counts(), torch.device("cpu"))


# --------------------------------------------------------------------------- config


def test_privacy_config_validation() -> None:
    assert dp_cfg(privacy={"mode": "off", "noise_multiplier": None}).privacy.mode == "off"
    with pytest.raises(ConfigError, match="target_epsilon"):
        config_from_dict({"privacy": {"mode": "local"}})
    with pytest.raises(ConfigError, match=r"privacy.delta"):
        config_from_dict({"privacy": {"delta": 1.0}})
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon"):
        config_from_dict({"privacy": {"mode": "local", "target_epsilon": -1.0}})
    with pytest.raises(ConfigError, match=r"must be one of"):
        config_from_dict({"privacy": {"accountant": "gdp"}})


# --------------------------------------------------------------------------- model surgery


def test_dp_student_has_only_groupnorm_and_no_inplace_ops() -> None:
    cfg = dp_cfg()
    torch.manual_seed(0)
    plain = build_student(cfg.student, 3, 64)
    bn_count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert private_compatibility_problems(plain)  # the plain student is not DP-compatible
    dp = make_student_private_compatible(plain)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules()), "input must stay untouched"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dp.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in dp.modules()) == bn_count
    assert isinstance(dp.projector[1], nn.GroupNorm)  # the projector's BatchNorm1d too
    assert not any(getattr(m, "inplace", False) for m in dp.modules())
    assert private_compatibility_problems(dp) == []
    assert not [k for k in dp.state_dict() if "running_" in k or "num_batches" in k]  # no buffers to aggregate
    # the same init everywhere: the federation aggregates this student
    torch.manual_seed(1)
    a = build_dp_student(cfg, 3, 64)
    torch.manual_seed(1)
    b = build_dp_student(cfg, 3, 64)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # build_models uses it whenever DP is on
    student, _ = build_models(cfg, 3, None)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())


def test_per_sample_gradients_of_all_three_heads_are_exact() -> None:
    """Opacus hooks on the DP student give, for each example, the gradient of its own EKD loss."""
    from opacus import GradSampleModule

    from fopro_kd.losses import EKDLoss, build_classification_loss

    torch.manual_seed(0)
    student = build_dp_student(dp_cfg(), 3, 16)
    student.train()
    wrapped = GradSampleModule(student)
    ekd = EKDLoss(build_classification_loss("bsm", np.array([5, 3, 1]), dp_cfg().train), 3.0)
    x, t, y = torch.rand(3, 3, SIZE, SIZE), torch.randn(3, 16), torch.tensor([0, 1, 2])
    out = student.forward_train(x)
    ekd(out.logits, out.aux_logits, out.projection, t, y)[0].backward()
    samples = {n: p.grad_sample.clone() for n, p in student.named_parameters()}
    assert set(samples) == {n for n, _ in student.named_parameters()}  # every head took part
    wrapped.disable_hooks()
    for i in range(3):
        student.zero_grad()
        out = student.forward_train(x[i : i + 1])
        ekd(out.logits, out.aux_logits, out.projection, t[i : i + 1], y[i : i + 1])[0].backward()
        for name in ("backbone.conv1.0.weight", "backbone.layer1.0.bn1.weight", "projector.1.weight",
                     "classifier.weight", "aux_classifier.weight", "projector.3.weight"):
            param = dict(student.named_parameters())[name]
            assert torch.allclose(samples[name][i], param.grad, atol=1e-5, rtol=1e-4), (name, i)


# --------------------------------------------------------------------------- DP-SGD in LocalTrainer


def test_dp_training_with_frozen_prompt_trains_all_heads_and_keeps_teacher(data, teacher) -> None:
    cfg = dp_cfg(train={"method": "fopro-kd"}, akd={"mode": "discriminative"})
    teacher_before = copy.deepcopy(teacher.state_dict())
    trainer = make_trainer(cfg, data, teacher)
    assert trainer.dp is not None and trainer.akd_mode == "off" and trainer.probe is None  # frozen prompt: no AKD
    assert trainer.teacher not in list(trainer.dp.grad_sample_module.modules())  # teacher outside the wrapped module
    before = copy.deepcopy(trainer.student.state_dict())
    result = trainer.train(data, epochs=1, max_steps=2)
    assert result.num_steps == 2 and np.isfinite(result.losses["loss"])
    assert {"loss_cls", "loss_aux", "loss_rep"} <= set(result.losses)
    changed = {k for k, v in trainer.student.state_dict().items() if not torch.equal(v, before[k])}
    assert {"classifier.weight", "aux_classifier.weight", "projector.0.weight", "projector.1.weight"} <= changed
    m = trainer.prompt.multiplier()
    assert torch.equal(m, torch.ones_like(m)), "a frozen prompt stays the identity"
    assert not teacher.training
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    state = trainer.state_dict()["privacy"]
    json.dumps(state)  # the client stores it as is
    sigma, q = 1.0, 1 / 3
    assert [tuple(e) for e in state["history"]] == [(10.0, 1.0, 1), (sigma, q, 2)]  # class-count release + 2 steps
    assert trainer.dp.metrics()["dp-epsilon"] == pytest.approx(epsilon_of_history(state["history"], DELTA))


def test_epsilon_composes_over_rounds_and_matches_opacus(data, teacher) -> None:
    """Three rounds, each with a fresh trainer restored from the previous round's (JSON) state."""
    from opacus.accountants import RDPAccountant

    cfg = dp_cfg(train={"method": "bsm"}, privacy={"noise_multiplier": 1.3}, federation={"local_steps": 1})
    stored, epsilons, weights = None, [], None
    for _ in range(3):
        trainer = make_trainer(cfg, data, teacher)
        if weights is not None:
            trainer.student.load_state_dict(weights)
        if stored is not None:
            trainer.load_state_dict(stored)
        trainer.train(data, epochs=1, max_steps=1)
        epsilons.append(trainer.dp.metrics()["dp-epsilon"])
        weights = copy.deepcopy(trainer.student.state_dict())
        stored = json.loads(json.dumps({"privacy": trainer.dp.accountant_state()}))
        stored.update({k: v for k, v in trainer.state_dict().items() if k != "privacy"})
    assert epsilons[0] < epsilons[1] < epsilons[2]
    history = stored["privacy"]["history"]
    assert [tuple(e) for e in history] == [(10.0, 1.0, 1), (1.3, 1 / 3, 3)]  # counts released once, reused
    independent = RDPAccountant()
    independent.history = [(10.0, 1.0, 1), (1.3, 1 / 3, 3)]
    assert epsilons[-1] == pytest.approx(independent.get_epsilon(DELTA), rel=1e-9)


def test_over_budget_client_declines_without_spending(data, teacher) -> None:
    history = {"history": [[10.0, 1.0, 1], [1.0, 1 / 3, 9]], "mechanism": "rdp"}
    spent = epsilon_of_history(history["history"], DELTA)
    assert would_exceed_budget(history, 3, 1 / 3, 1.0, DELTA, target_epsilon=spent + 0.01)
    assert not would_exceed_budget(history, 3, 1 / 3, 1.0, DELTA, target_epsilon=spent + 5.0)
    assert not would_exceed_budget(history, 3, 1 / 3, 1.0, DELTA, target_epsilon=None)
    reason = budget_reason(history, 3, 1 / 3, 1.0, DELTA, target_epsilon=spent + 0.01)
    assert "epsilon" in reason and "target epsilon" in reason and "declines" in reason

    cfg = dp_cfg(train={"method": "bsm"}, privacy={"target_epsilon": 2.0, "noise_multiplier": 0.6})
    trainer = make_trainer(cfg, data, teacher)
    assert trainer.dp.check_budget(len(data), 1) is not None
    before = copy.deepcopy(trainer.student.state_dict())
    with pytest.raises(PrivacyBudgetExhausted, match="target epsilon 2"):
        trainer.train(data, epochs=1)
    assert trainer.dp.accountant.history == [] and trainer.dp.epsilon() == 0.0
    assert all(torch.equal(v, before[k]) for k, v in trainer.student.state_dict().items())


def test_derived_noise_multiplier_reaches_target_over_planned_steps(data, teacher) -> None:
    cfg = dp_cfg(train={"method": "bsm"}, privacy={"target_epsilon": 8.0, "noise_multiplier": None},
                 federation={"local_steps": 1})
    trainer = make_trainer(cfg, data, teacher)
    q = 1 / 3
    total = 3 * planned_steps_per_round(cfg, len(data))
    extra = planned_statistics_events(cfg)
    sigma = trainer.dp.noise_multiplier_for(len(data))
    assert sigma == derive_noise_multiplier(8.0, DELTA, q, total, "rdp", extra_events=extra)
    eps = epsilon_of_history([*extra, (sigma, q, total)], DELTA)
    assert 8.0 - 0.01 <= eps <= 8.0
    assert epsilon_of_history([*extra, (sigma * 0.98, q, total)], DELTA) > 8.0
    assert total == 3
    for _ in range(3):  # the planned rounds all fit the budget; a fourth does not
        trainer.train(data, epochs=1, max_steps=1)
    assert trainer.dp.epsilon() == pytest.approx(eps)
    with pytest.raises(PrivacyBudgetExhausted):
        trainer.train(data, epochs=1, max_steps=1)


def test_poisson_sampling_counts_empty_batches(data, teacher) -> None:
    loader = PoissonBatchLoader(data, 0.05, 40, torch.Generator().manual_seed(0))
    sizes = [int(labels.shape[0]) for _, labels, _ in loader]
    assert len(sizes) == 40 and 0 in sizes and max(sizes) >= 1
    small = data.subset(list(range(0, 24, 3)))
    cfg = dp_cfg(train={"method": "bsm", "batch_size": 1})  # q = 1/8: empty and one-image batches
    trainer = make_trainer(cfg, small, teacher)
    before = copy.deepcopy(trainer.student.state_dict())
    result = trainer.train(small, epochs=1)
    assert result.num_steps == 8 and result.num_examples < 16
    assert trainer.dp.accountant.history[-1] == (1.0, 1 / 8, 8)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.student.state_dict().items())


def test_prompt_dp_trains_prompt_and_probe_with_per_sample_gradients(data, teacher) -> None:
    cfg = dp_cfg(train={"method": "fopro-kd"}, akd={"mode": "discriminative"}, privacy={"prompt": "dp"},
                 prompt={"lr": 0.05})
    trainer = make_trainer(cfg, data, teacher)
    dp = trainer.dp
    assert dp.prompt_dp and trainer.akd_mode == "discriminative"
    # per-sample gradients of the prompt objective (vmap) equal the gradients of each example alone
    objective = dp._objective
    x, y = data.images[:3].float() / 255, data.labels[:3]
    params = {k: v.detach() for k, v in objective.named_parameters()}

    def one(p, xi, yi, ui):
        return torch.func.functional_call(objective, p, (xi[None], yi[None], ui[None]))

    grads, _ = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0, 0, 0))(
        params, x, y, torch.zeros(3, 1))
    for i in range(3):
        objective.zero_grad()
        objective(x[i : i + 1], y[i : i + 1], torch.zeros(1, 1))[0].backward()
        for name, param in objective.named_parameters():
            assert torch.allclose(grads[name][i], param.grad, atol=1e-6, rtol=1e-4), (name, i)
    start = trainer.prompt.multiplier().clone()
    trainer.train(data, epochs=1, max_steps=2)
    assert not torch.allclose(trainer.prompt.multiplier(), start)
    # student step + prompt step on one batch: one Gaussian mechanism with sigma / sqrt(2)
    assert trainer.dp.accountant.history[-1] == (1.0 / math.sqrt(2), 1 / 3, 2)


# --------------------------------------------------------------------------- statistics


def test_statistics_are_noised_and_accounted_or_withheld(data, teacher) -> None:
    raw = np.array([12.0, 8.0, 4.0])
    noisy = privatize_statistics(raw, 1.0, 2.0, np.random.default_rng(0))
    assert noisy.shape == raw.shape and not np.allclose(noisy, raw)
    big = privatize_statistics(np.zeros(20000), 0.5, 2.0, torch.Generator().manual_seed(0))
    assert big.std() == pytest.approx(1.0, rel=0.05)  # std = sigma * clip
    with pytest.raises(ValueError, match="noise_multiplier"):
        privatize_statistics(raw, 1.0, 0.0, np.random.default_rng(0))
    assert statistics_policy(dp_cfg(privacy={"mode": "off"})) == "raw"
    assert statistics_policy(dp_cfg()) == "noised"
    assert statistics_policy(dp_cfg(privacy={"statistics": "withheld"})) == "withheld"

    cfg = dp_cfg(train={"method": "ekd"}, federation={"strategy": "fedmas"})
    trainer = make_trainer(cfg, data, teacher)
    counts = trainer.dp.shared_class_counts()
    assert counts is not None and not np.allclose(counts, raw)
    assert trainer.dp.shared_class_counts() == counts  # released once, reused (no extra cost)
    n_events = sum(e[2] for e in trainer.dp.accountant.history)
    from fopro_kd.training.results import class_rep_prior

    exact = class_rep_prior(trainer.student, teacher, None, data, cfg, torch.device("cpu"))
    means, _ = trainer.dp.private_class_rep_prior(data)
    assert not np.allclose(np.nan_to_num(means), exact)
    assert sum(e[2] for e in trainer.dp.accountant.history) == n_events + 1
    result = trainer.train(data, epochs=1, max_steps=1, track_class_rep=True)
    assert result.class_seen is not None and not np.array_equal(result.class_seen, np.array([12, 8, 4]))

    withheld = make_trainer(dp_cfg(privacy={"statistics": "withheld"}), data, teacher)
    result = withheld.train(data, epochs=1, max_steps=1, track_class_rep=True)
    assert result.class_rep_sum is None and result.class_seen is None and withheld.dp.shared_class_counts() is None


# --------------------------------------------------------------------------- central DP


def test_central_clipping_bounds_float_norm_and_ignores_integer_buffers() -> None:
    update = {
        "w": np.full((2, 2), 3.0, dtype=np.float32),
        "b": np.array([4.0], dtype=np.float64),
        "num_batches_tracked": np.array(1000, dtype=np.int64),
    }
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(math.sqrt(4 * 9 + 16))  # the integer buffer is not in the norm
    new_norm = math.sqrt(sum(float(np.sum(clipped[k].astype(np.float64) ** 2)) for k in ("w", "b")))
    assert new_norm == pytest.approx(1.0, rel=1e-6)
    assert clipped["w"].dtype == np.float32 and clipped["num_batches_tracked"] == 1000
    small, small_norm = clip_update({"w": np.array([0.3, 0.4])}, 1.0)
    assert small_norm == pytest.approx(0.5) and np.array_equal(small["w"], np.array([0.3, 0.4]))


def test_central_noise_is_calibrated_to_the_fixed_denominator_and_epsilon_composes_rounds() -> None:
    """DP-FedAvg: W = q·N fixed, sensitivity C/W (add/remove) or 2C/W (replace), noise std σ·C/W."""
    assert fixed_denominator(10, 0.5) == pytest.approx(5.0)
    assert fixed_denominator(4, 1.0) == pytest.approx(4.0)
    assert central_sensitivity(2.0, 4.0) == pytest.approx(0.5)
    assert central_sensitivity(2.0, 4.0, adjacency="replace") == pytest.approx(1.0)
    assert central_noise_std(2.0, 4.0, 1.5) == pytest.approx(1.5 * 2.0 / 4)  # sigma x sensitivity
    for bad in (lambda: fixed_denominator(0, 1.0), lambda: fixed_denominator(3, 0.0),
                lambda: central_sensitivity(1.0, 1.0, adjacency="swap"), lambda: check_weights([0.5, 1.5])):
        with pytest.raises(ValueError):
            bad()
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(1.2, 0.5, 10)]
    assert central_epsilon(1.2, 0.5, 10, DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    assert central_epsilon(1.2, 0.5, 5, DELTA) < central_epsilon(1.2, 0.5, 10, DELTA)
    assert central_epsilon(1.2, 0.2, 10, DELTA) < central_epsilon(1.2, 0.5, 10, DELTA), "Poisson sampling amplifies"
    eps2, delta2 = replace_one_bound(1.0, DELTA)
    assert eps2 == pytest.approx(2.0) and delta2 == pytest.approx((1 + math.e) * DELTA)


def _estimate(updates: list[dict[str, np.ndarray]], clip: float, denominator: float) -> np.ndarray:
    template = {"w": np.zeros(6), "b": np.zeros(2)}
    est, _ = dp_fedavg_estimate(template, updates, np.ones(len(updates)), clip, denominator)
    return np.concatenate([est["w"], est["b"]])


def test_dp_fedavg_estimate_moves_at_most_its_sensitivity_on_neighbouring_rounds() -> None:
    """Hand-made neighbours: remove one client, or replace one by an adversarial update, in many random rounds."""
    rng = np.random.default_rng(0)
    clip, population, q = 1.0, 6, 0.5
    denominator = fixed_denominator(population, q)
    remove_bound = central_sensitivity(clip, denominator)
    replace_bound = central_sensitivity(clip, denominator, adjacency="replace")
    worst_remove = worst_replace = 0.0
    for _ in range(200):
        m = int(rng.integers(1, population + 1))
        updates = [{"w": rng.normal(size=6) * rng.choice([0.1, 1.0, 50.0]), "b": rng.normal(size=2)} for _ in range(m)]
        agg = _estimate(updates, clip, denominator)
        direction = agg / (np.linalg.norm(agg) or 1.0)
        adversary = {"w": -1e6 * direction[:6], "b": -1e6 * direction[6:]}  # pulls against the aggregate
        for k in range(m):
            removed = _estimate(updates[:k] + updates[k + 1:], clip, denominator)
            replaced = _estimate(updates[:k] + [adversary] + updates[k + 1:], clip, denominator)
            worst_remove = max(worst_remove, float(np.linalg.norm(agg - removed)))
            worst_replace = max(worst_replace, float(np.linalg.norm(agg - replaced)))
        added = _estimate(updates + [adversary], clip, denominator)
        worst_remove = max(worst_remove, float(np.linalg.norm(agg - added)))
    assert worst_remove <= remove_bound * (1 + 1e-9) and worst_replace <= replace_bound * (1 + 1e-9)
    assert worst_remove > 0.95 * remove_bound and worst_replace > 0.9 * replace_bound, "the bounds are tight"
    # the empty round (nobody sampled) is defined: the zero estimate, to which the noise is then added
    assert np.array_equal(_estimate([], clip, denominator), np.zeros(8))


def test_renormalised_average_exceeds_the_old_max_weight_bound() -> None:
    """Why the old rule σ·max α·C was wrong: removing one client rescales the others (moves up to 2·α·C)."""
    clip = 1.0
    plus, minus = {"w": np.full(6, 10.0), "b": np.zeros(2)}, {"w": np.full(6, -10.0), "b": np.zeros(2)}

    def renormalised(updates):  # the old estimator: mean over the replying clients
        return _estimate(updates, clip, float(len(updates)))

    d, d_removed = [plus, plus, plus, minus], [plus, plus, plus]
    old_bound = clip * 1 / 4  # max alpha x C with alpha = 1/4
    assert np.linalg.norm(renormalised(d) - renormalised(d_removed)) == pytest.approx(2 * old_bound)
    fixed = fixed_denominator(4, 1.0)
    assert np.linalg.norm(_estimate(d, clip, fixed) - _estimate(d_removed, clip, fixed)) == pytest.approx(
        central_sensitivity(clip, fixed))
