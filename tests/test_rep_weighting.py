"""train.rep_weighting: class_balanced, end to end through the trainer (the loss itself: test_losses.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fopro_kd.config import config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.data.transforms import to_float
from fopro_kd.losses import representation_loss
from fopro_kd.models.student import build_student
from fopro_kd.models.teacher import build_teacher
from fopro_kd.training.teacher_view import teacher_targets
from fopro_kd.training.trainer import LocalTrainer

SIZE = 32


def _rep_per_class(weighting: str) -> np.ndarray:
    """Train EKD 3 epochs on counts 60/12/3, then ℓ_rep per class on the training images."""
    cfg = config_from_dict({
        "seed": 0, "data": {"image_size": SIZE, "num_classes": 3}, "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": SIZE},
        "train": {"batch_size": 16, "epochs": 3, "method": "ekd", "lr": 1e-3, "rep_weighting": weighting,
                  "rep_weighting_start": 0.0},
        "augment": {"enabled": False},
    })
    data = make_synthetic_imageset([60, 12, 3], SIZE, seed=0)
    teacher = build_teacher(cfg.teacher)
    torch.manual_seed(0)
    student = build_student(cfg.student, 3, teacher.feature_dim)
    trainer = LocalTrainer(cfg, student, teacher, None, data.class_counts(), torch.device("cpu"))
    assert (trainer.ekd.rep_class_weights is not None) == (weighting == "class_balanced")
    trainer.train(data, epochs=3)
    student.eval()
    with torch.no_grad():
        x = to_float(data.images)
        rep = representation_loss(student.forward_train(x).projection, teacher_targets(teacher, x, None, "raw"))
    labels = data.labels.numpy()
    return np.asarray([rep.numpy()[labels == c].mean() for c in range(3)])


@pytest.mark.filterwarnings("ignore:teacher.source is 'none'")
def test_class_balanced_rep_fits_the_rare_class_relatively_better() -> None:
    """Direction of the effect: with the weights the rarest class's ℓ_rep, relative to the common class's,
    is lower than without them (the distillation is moved towards the rare images)."""
    plain = _rep_per_class("none")
    weighted = _rep_per_class("class_balanced")
    assert weighted[2] / weighted[0] < plain[2] / plain[0]
    assert weighted[2] < weighted[0]  # the rare class is now the best fitted one
