"""Every prompt objective moves the prompt at the default prompt learning rate, in its formula's direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fopro_kd.config import Config, ConfigError, config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.data.transforms import to_float
from fopro_kd.models.student import build_student
from fopro_kd.models.teacher import build_teacher
from fopro_kd.prompt import build_prompt
from fopro_kd.prompt_objectives import PROMPT_OBJECTIVES, support_fold
from fopro_kd.training.trainer import LocalTrainer

SIZE = 32
STEPS = 25


def cfg_of(mode: str, **akd) -> Config:
    return config_from_dict({
        "data": {"image_size": SIZE, "num_classes": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": SIZE},
        "train": {"batch_size": 8, "epochs": 1, "method": "fopro-kd"},
        "akd": {"mode": mode, "support_per_class": 4, "support_per_step": 4, **akd},
    })


@pytest.fixture(scope="module")
def data():
    return make_synthetic_imageset([16, 12, 8], SIZE, seed=0)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher(cfg_of("off").teacher)


def objective_value(trainer: LocalTrainer, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, projection) -> float:
    """The objective (without the regulariser) at the current prompt, with a fixed prototype draw."""
    obj = trainer.objective
    if hasattr(obj, "generator"):
        obj.generator = np.random.default_rng(123)
    with torch.no_grad():
        if getattr(obj, "records_teacher_forward", False):
            obj.start_recording()
        try:
            from fopro_kd.training.teacher_view import teacher_features

            feats = teacher_features(trainer.teacher, x, trainer.prompt, "raw").float()
        finally:
            if getattr(obj, "records_teacher_forward", False):
                obj.stop_recording()
        loss, _ = obj(feats, y, keep, projection)
    return float(loss)


@pytest.mark.parametrize("mode", sorted(PROMPT_OBJECTIVES))
def test_objective_moves_the_prompt_in_its_direction(mode, data, teacher) -> None:
    cfg = cfg_of(mode)
    torch.manual_seed(0)
    student = build_student(cfg.student, 3, teacher.feature_dim)
    prompt = build_prompt(cfg.prompt, SIZE)
    trainer = LocalTrainer(cfg, student, teacher, prompt, data.class_counts(), torch.device("cpu"))
    trainer._build_objective(data)
    idx = torch.arange(0, len(data), 2)  # a fixed batch of every class
    x, y = to_float(data.images[idx]), data.labels[idx]
    student_in = x
    keep = torch.ones(len(idx), dtype=torch.bool)
    if trainer.objective_excluded is not None:
        keep = ~torch.isin(idx, trainer.objective_excluded)
    projection = None
    if getattr(trainer.objective, "needs_student", False):
        with torch.no_grad():
            projection = student.forward_train(student_in).projection.float()
    before = objective_value(trainer, x, y, keep, projection)
    start = [p.detach().clone() for p in prompt.parameters()]
    for _ in range(STEPS):
        trainer._prompt_steps(student_in, x, y, idx)
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(prompt.parameters(), start))
    after = objective_value(trainer, x, y, keep, projection)
    assert moved > 0.5 * STEPS * cfg.prompt.lr, f"{mode}: the prompt barely moved ({moved:.2e})"
    # every objective is descended: minmax's is -discrepancy, so the discrepancy rises
    assert after < before, f"{mode}: objective went from {before:.5f} to {after:.5f}"


def test_support_fold_takes_whole_groups_and_at_most_half(data) -> None:
    grouped = data.subset(list(range(len(data))))
    grouped.groups = [f"g{i // 2}" for i in range(len(data))]  # pairs of images share a group
    support = support_fold(grouped, per_class=100, seed=0)
    groups = np.asarray(grouped.groups)
    labels = grouped.labels.numpy()
    inside = set(groups[support])
    outside = set(groups[np.setdiff1d(np.arange(len(data)), support)])
    assert not inside & outside  # no group on both sides
    for c in range(3):
        members = np.flatnonzero(labels == c)
        assert 0 < np.isin(members, support).sum() <= len(members) // 2 + 1


def test_prototype_needs_two_groups_per_class(teacher) -> None:
    one_group = make_synthetic_imageset([4, 4, 4], SIZE, seed=1)
    one_group.groups = [f"c{int(c)}" for c in one_group.labels]
    with pytest.raises(ValueError, match="support fold"):
        support_fold(one_group, per_class=4, seed=0)


def test_new_objectives_refused_with_dp_prompt() -> None:
    with pytest.raises(ConfigError, match="akd.mode"):
        config_from_dict({
            "train": {"method": "fopro-kd"}, "akd": {"mode": "prototype"},
            "privacy": {"mode": "local", "prompt": "dp", "target_epsilon": 8.0},
        })


def test_bn_hooks_are_removed_after_the_step(data, teacher) -> None:
    cfg = cfg_of("bn_stats")
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, build_student(cfg.student, 3, teacher.feature_dim), teacher,
                           build_prompt(cfg.prompt, SIZE), data.class_counts(), torch.device("cpu"))
    trainer._build_objective(data)
    x = to_float(data.images[:8])
    trainer._prompt_steps(x, x, data.labels[:8], torch.arange(8))
    assert all(not norm._forward_pre_hooks for norm in trainer.objective.norms)


def test_a_class_with_one_group_gets_no_prototype_and_is_not_scored(teacher, caplog) -> None:
    """One patient with a rare disease at a site: the others keep their prototypes, that class is left out."""
    site = make_synthetic_imageset([8, 8, 4], SIZE, seed=2)
    labels = site.labels.numpy()
    site.groups = [f"c{c}-g{i % 4}" if c < 2 else "c2-only-patient" for i, c in enumerate(labels)]
    with caplog.at_level("WARNING", logger="fopro_kd.prompt"):
        support = support_fold(site, per_class=4, seed=0)
    assert set(labels[support]) == {0, 1} and "'class_2' (1 group)" in caplog.text
    cfg = cfg_of("prototype")
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, build_student(cfg.student, 3, teacher.feature_dim), teacher,
                           build_prompt(cfg.prompt, SIZE), site.class_counts(), torch.device("cpu"))
    trainer._build_objective(site)
    rest = torch.as_tensor(np.setdiff1d(np.arange(len(site)), support))
    x, y = to_float(site.images[rest]), site.labels[rest]
    only_rare = y == 2
    with torch.no_grad():
        from fopro_kd.training.teacher_view import teacher_features

        feats = teacher_features(teacher, x, trainer.prompt, "raw").float()
    loss, _ = trainer.objective(feats, y, torch.ones(len(y), dtype=torch.bool))
    assert torch.isfinite(loss)
    loss_rare, terms = trainer.objective(feats, y, only_rare)  # only class-2 images kept: nothing to score
    assert float(loss_rare) == 0.0 and terms["prompt_proto_loss"] == 0.0
