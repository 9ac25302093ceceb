"""Single-site training (``fopro-kd train``): reproducibility of the whole run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import fopro_kd.training.single_site as single_site
from fopro_kd.checkpoint import load_checkpoint
from fopro_kd.config import config_from_dict


def tiny_config():
    return config_from_dict({
        "seed": 3,
        "data": {"kind": "synthetic", "image_size": 32, "num_classes": 3, "max_per_class": 16},
        "split": {"val_per_class": 3, "test_per_class": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": 32},
        "train": {"method": "fopro-kd", "epochs": 1, "batch_size": 8},
    })


def best_student(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "best.pt")["state_dict"]


def test_same_run_whether_or_not_obtaining_the_teacher_draws_random_numbers(tmp_path: Path, monkeypatch) -> None:
    """A demo teacher pretrained on a cache miss (or timm's random init) must not change the student."""
    cfg = tiny_config()
    plain = single_site.train_single_site(cfg, tmp_path / "plain", progress=False)
    real_shared_teacher = single_site.shared_teacher

    def teacher_after_drawing_random_numbers(config):
        torch.rand(1000)  # what pretraining the demo teacher on a cache miss does to the global RNG
        return real_shared_teacher(config)

    monkeypatch.setattr(single_site, "shared_teacher", teacher_after_drawing_random_numbers)
    drawn = single_site.train_single_site(cfg, tmp_path / "drawn", progress=False)
    assert drawn["balanced_accuracy"] == pytest.approx(plain["balanced_accuracy"], abs=0)
    a, b = best_student(tmp_path / "plain"), best_student(tmp_path / "drawn")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_local_dp_run_reports_the_epsilon_spent_over_all_epochs(tmp_path: Path) -> None:
    values = tiny_config().to_dict()
    values["train"].update({"epochs": 2, "method": "bsm"})
    values["federation"].update({"local_epochs": 2})
    values["privacy"].update({"mode": "local", "target_epsilon": 8.0, "planned_rounds": 1, "noise_seed": 0})
    metrics = single_site.train_single_site(config_from_dict(values), tmp_path / "dp", progress=False)
    with open(tmp_path / "dp" / "history.csv") as handle:
        eps = [float(row["dp_epsilon"]) for row in csv.DictReader(handle)]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0 + 1e-6
    assert metrics["privacy"]["dp-epsilon"] == pytest.approx(eps[1])
    assert metrics["privacy"]["dp-target-epsilon"] == 8.0 and metrics["privacy"]["accountant"] == "rdp"
