"""A stopped single-site run continues after its last complete epoch with the result it would have had."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import fopro_kd.training.single_site as single_site
from fopro_kd.config import config_from_dict
from fopro_kd.training.resume import RESUME_FILE
from fopro_kd.training.trainer import LocalTrainer

# the hardest case: FoPro-KD two-stage, one exploration epoch (prototype objective with its own draw
# stream), then cached targets; a stop after epoch 2 resumes past both the exploration and the cache
VALUES = {
    "data": {"kind": "synthetic", "image_size": 32, "num_classes": 3, "max_per_class": 16},
    "split": {"val_per_class": 3, "test_per_class": 3},
    "student": {"arch": "test_resnet"},
    "teacher": {"arch": "test_resnet", "source": "none", "input_size": 32},
    "augment": {"affine_scale": [1.0, 1.0], "affine_translate": 0.0, "rotation_degrees": 0.0,
                "color_jitter": [0.0, 0.0, 0.0, 0.0], "teacher_view": "flips"},
    "prompt": {"param": "radial", "radial_bands": 4, "schedule": "two_stage", "explore_epochs": 1, "lr": 0.01},
    "akd": {"mode": "prototype", "support_per_class": 4, "support_per_step": 2},
    "train": {"method": "fopro-kd", "epochs": 3, "batch_size": 8, "num_threads": 1},
}


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    for plot in ("plot_per_class_recall", "plot_history", "plot_prompt_mask"):
        monkeypatch.setattr(single_site, plot, lambda *args, **kwargs: None)


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as handle:
        return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
                for row in csv.DictReader(handle)]


@pytest.mark.parametrize(("explore_epochs", "stop_before"), [(1, 3), (2, 2)])
def test_a_stopped_run_resumed_gives_the_uninterrupted_result(tmp_path: Path, monkeypatch, explore_epochs,
                                                               stop_before) -> None:
    """Stopped after the exploration and the cache (1, 3) or in the middle of the exploration (2, 2)."""
    cfg = config_from_dict({**VALUES, "prompt": {**VALUES["prompt"], "explore_epochs": explore_epochs}})
    reference = single_site.train_single_site(cfg, tmp_path / "straight", progress=False)
    assert not (tmp_path / "straight" / RESUME_FILE).exists(), "a finished run keeps no resume state"

    real_train, calls = LocalTrainer.train, []

    def stop_at_the_third_epoch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop_before:
            raise KeyboardInterrupt("session over")
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "train", stop_at_the_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        single_site.train_single_site(cfg, tmp_path / "stopped", progress=False)
    assert (tmp_path / "stopped" / RESUME_FILE).is_file() and not (tmp_path / "stopped" / "metrics.json").exists()
    monkeypatch.setattr(LocalTrainer, "train", real_train)

    with pytest.raises(ValueError, match=f"{RESUME_FILE} belongs to a run with another config"):
        single_site.train_single_site(config_from_dict({**cfg.to_dict(), "seed": 1}), tmp_path / "stopped",
                                      progress=False, resume=True)
    resumed = single_site.train_single_site(cfg, tmp_path / "stopped", progress=False, resume=True)
    assert resumed["balanced_accuracy"] == reference["balanced_accuracy"]
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert history(tmp_path / "stopped") == history(tmp_path / "straight"), "every epoch once, the same losses"
    saved = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert saved["per_class_recall"] == reference["per_class_recall"]
    assert not (tmp_path / "stopped" / RESUME_FILE).exists()


def test_resume_without_a_stopped_run_trains_from_the_start(tmp_path: Path) -> None:
    cfg = config_from_dict({**VALUES, "train": {**VALUES["train"], "epochs": 2}, "akd": {"mode": "off"},
                            "prompt": {"schedule": "joint"}})
    fresh = single_site.train_single_site(cfg, tmp_path / "a", progress=False)
    again = single_site.train_single_site(cfg, tmp_path / "b", progress=False, resume=True)
    assert again["balanced_accuracy"] == fresh["balanced_accuracy"]
