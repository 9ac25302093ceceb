"""The local trainer: every method trains, state persists, prompt modes update what they should."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fopro_kd.config import Config, ConfigError, config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.models.student import build_student
from fopro_kd.models.teacher import build_teacher
from fopro_kd.prompt import build_prompt
from fopro_kd.training.results import class_rep_prior
from fopro_kd.training.trainer import LocalTrainer, predict

SIZE = 32


def tiny_cfg(**sections) -> Config:
    values = {
        "data": {"image_size": SIZE, "num_classes": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": SIZE},
        "train": {"batch_size": 8, "epochs": 1},
    }
    for key, val in sections.items():
        values.setdefault(key, {}).update(val)
    return config_from_dict(values)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_imageset([12, 8, 4], SIZE, seed=0)


@pytest.fixture(scope="module")
def teacher():
    cfg = tiny_cfg()
    return build_teacher(cfg.teacher)


def make_trainer(cfg: Config, data, teacher) -> LocalTrainer:
    torch.manual_seed(cfg.seed)
    uses_teacher = cfg.train.method in ("ekd", "fopro-kd")
    student = build_student(cfg.student, 3, teacher.feature_dim if uses_teacher else None)
    prompt = build_prompt(cfg.prompt, teacher.input_size) if cfg.train.method == "fopro-kd" else None
    return LocalTrainer(cfg, student, teacher if uses_teacher else None, prompt, data.class_counts(), torch.device("cpu"))


@pytest.mark.parametrize(
    "method, akd",
    [("ce", "off"), ("bsm", "off"), ("ekd", "off"), ("fopro-kd", "discriminative"), ("fopro-kd", "minmax"), ("fopro-kd", "off")],
)
def test_every_method_trains_and_changes_the_student(method, akd, data, teacher) -> None:
    cfg = tiny_cfg(train={"method": method, "loss": "ce" if method == "ce" else "bsm"}, akd={"mode": akd})
    trainer = make_trainer(cfg, data, teacher)
    before = copy.deepcopy(trainer.student.state_dict())
    result = trainer.train(data, epochs=1)
    assert result.num_examples == len(data)
    assert result.num_steps == 3
    assert np.isfinite(result.losses["loss"])
    changed = [k for k, v in trainer.student.state_dict().items() if not torch.equal(v, before[k])]
    assert "classifier.weight" in changed
    if method in ("ekd", "fopro-kd"):
        assert {"loss_cls", "loss_aux", "loss_rep"} <= set(result.losses)
        assert "projector.0.weight" in changed and "aux_classifier.weight" in changed


def test_teacher_is_never_updated(data, teacher) -> None:
    before = copy.deepcopy(teacher.state_dict())
    cfg = tiny_cfg(train={"method": "fopro-kd"}, akd={"mode": "minmax"})
    make_trainer(cfg, data, teacher).train(data, epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training


@pytest.mark.parametrize("mode", ["discriminative", "minmax"])
def test_prompt_is_trained_by_akd_modes(mode, data, teacher) -> None:
    cfg = tiny_cfg(train={"method": "fopro-kd"}, akd={"mode": mode}, prompt={"lr": 0.05})
    trainer = make_trainer(cfg, data, teacher)
    start = trainer.prompt.multiplier().clone()
    assert torch.allclose(start, torch.ones_like(start))
    trainer.train(data, epochs=1)
    assert not torch.allclose(trainer.prompt.multiplier(), start)


def test_prompt_stays_identity_when_akd_off_and_during_warmup(data, teacher) -> None:
    cfg = tiny_cfg(train={"method": "fopro-kd"}, akd={"mode": "discriminative", "warmup_epochs": 1})
    trainer = make_trainer(cfg, data, teacher)
    trainer.train(data, epochs=1)
    m = trainer.prompt.multiplier()
    assert torch.allclose(m, torch.ones_like(m)), "warm-up epoch must not move the prompt"
    trainer.train(data, epochs=1)
    assert not torch.allclose(trainer.prompt.multiplier(), torch.ones_like(m))


@pytest.mark.parametrize("every, expected_prompt_steps", [(1, 6), (3, 2), (4, 2)])
def test_prompt_every_trains_the_prompt_on_every_kth_batch(every, expected_prompt_steps, data, teacher) -> None:
    cfg = tiny_cfg(train={"method": "fopro-kd"}, akd={"mode": "discriminative", "prompt_every": every})
    trainer = make_trainer(cfg, data, teacher)
    prompt_steps, student_steps = [], []
    original_prompt_step, original_student_step = trainer.prompt_optimizer.step, trainer.optimizer.step
    trainer.prompt_optimizer.step = lambda *a, **k: (prompt_steps.append(1), original_prompt_step(*a, **k))[1]
    trainer.optimizer.step = lambda *a, **k: (student_steps.append(1), original_student_step(*a, **k))[1]
    result = trainer.train(data, epochs=5, max_steps=6)
    assert result.num_steps == 6 and len(student_steps) == 6
    assert len(prompt_steps) == expected_prompt_steps
    assert not torch.allclose(trainer.prompt.multiplier(), torch.ones_like(trainer.prompt.multiplier()))


def test_prompt_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="prompt_every"):
        tiny_cfg(akd={"prompt_every": 0})


def test_same_seed_same_weights(data, teacher) -> None:
    cfg = tiny_cfg(train={"method": "fopro-kd"})
    a = make_trainer(cfg, data, teacher)
    b = make_trainer(cfg, data, teacher)
    a.train(data, epochs=1)
    b.train(data, epochs=1)
    for key, value in a.student.state_dict().items():
        assert torch.equal(value, b.student.state_dict()[key]), key


def test_state_dict_resumes_identically(data, teacher) -> None:
    """Two epochs in one go == one epoch, save state, restore into a fresh trainer, one more epoch."""
    cfg = tiny_cfg(train={"method": "fopro-kd"})
    straight = make_trainer(cfg, data, teacher)
    straight.train(data, epochs=2, total_epochs=2)

    first = make_trainer(cfg, data, teacher)
    first.train(data, epochs=1, total_epochs=2)
    weights = copy.deepcopy(first.student.state_dict())
    state = copy.deepcopy(first.state_dict())
    resumed = make_trainer(cfg, data, teacher)
    resumed.student.load_state_dict(weights)
    resumed.load_state_dict(state)
    resumed.train(data, epochs=1, total_epochs=2)
    for key, value in straight.student.state_dict().items():
        assert torch.allclose(value.float(), resumed.student.state_dict()[key].float(), atol=1e-6), key
    assert torch.equal(straight.prompt.multiplier(), resumed.prompt.multiplier())


def test_max_steps_limits_training(data, teacher) -> None:
    trainer = make_trainer(tiny_cfg(train={"method": "bsm"}), data, teacher)
    assert trainer.train(data, epochs=5, max_steps=2).num_steps == 2


def test_proximal_term_reported_and_requires_anchor(data, teacher) -> None:
    trainer = make_trainer(tiny_cfg(train={"method": "bsm"}), data, teacher)
    with pytest.raises(ValueError, match="global_params"):
        trainer.train(data, epochs=1, proximal_mu=0.1)
    anchor = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    result = trainer.train(data, epochs=1, proximal_mu=0.1, global_params=anchor)
    assert result.losses["loss_prox"] > 0


def test_class_rep_tracking_counts_every_example(data, teacher) -> None:
    trainer = make_trainer(tiny_cfg(train={"method": "ekd"}), data, teacher)
    result = trainer.train(data, epochs=2, track_class_rep=True)
    assert result.class_seen.tolist() == [24, 16, 8]
    assert np.all(result.class_rep_sum > 0)
    prior = class_rep_prior(trainer.student, teacher, None, data, trainer.cfg, torch.device("cpu"))
    assert prior.shape == (3,) and np.all((prior >= 0) & (prior <= 4))


def test_feature_cache_matches_recomputed_targets(data, teacher) -> None:
    """Cached features equal the teacher's features on the clean image; training then uses them."""
    from fopro_kd.data.transforms import to_float
    from fopro_kd.training.teacher_view import teacher_targets

    cfg = tiny_cfg(train={"method": "ekd", "cache_teacher_features": True}, augment={"teacher_view": "clean"})
    cached = make_trainer(cfg, data, teacher)
    result = cached.train(data, epochs=1)
    assert cached.feature_cache is not None and result.num_examples == len(data)
    idx = torch.tensor([5, 0, 17])
    expected = teacher_targets(teacher, to_float(data.images[idx]), None, "raw")
    assert torch.allclose(cached.feature_cache.lookup(idx), expected, atol=1e-4)
    plain = make_trainer(tiny_cfg(train={"method": "ekd"}, augment={"teacher_view": "clean"}), data, teacher)
    plain_result = plain.train(data, epochs=1)
    # same batches, same targets up to float summation order: the losses agree closely
    assert abs(result.losses["loss"] - plain_result.losses["loss"]) < 1e-3


def test_feature_cache_refused_when_invalid() -> None:
    """Refused when the config is read, before any data or model exists."""
    with pytest.raises(ConfigError, match="prompt changes the teacher's input"):
        tiny_cfg(train={"method": "fopro-kd", "cache_teacher_features": True})
    with pytest.raises(ConfigError, match="teacher_view"):
        tiny_cfg(train={"method": "ekd", "cache_teacher_features": True})


def test_predict_returns_probabilities(data, teacher) -> None:
    trainer = make_trainer(tiny_cfg(train={"method": "bsm"}), data, teacher)
    probs = predict(trainer.student, data, 16, torch.device("cpu"), SIZE)
    assert probs.shape == (len(data), 3)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_empty_data_rejected(data, teacher) -> None:
    trainer = make_trainer(tiny_cfg(train={"method": "bsm"}), data, teacher)
    with pytest.raises(ValueError, match="empty"):
        trainer.train(data.subset([]), epochs=1)
