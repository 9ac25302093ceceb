"""Model building and scoring shared by the ServerApp and the ClientApp (no Flower imports).

* :func:`build_global_student` builds the aggregated model's architecture without loading
  the teacher: the server (and a client's evaluate handler) only needs the teacher's
  *feature size* for the student's projector, never its weights, so a hospital server
  needs no teacher file and the teacher is never part of the global model. In DP mode
  (``privacy.mode`` not ``off``) it is the GroupNorm student every client trains.
* :func:`class_correct_counts` is what a site reports for federated evaluation: per-class
  correct / total counts (plain ints), from which the server derives per-site balanced
  accuracy without seeing any prediction.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fopro_kd.config import Config, MetricsConfig
from fopro_kd.data.dataset import ImageSet
from fopro_kd.metrics import shot_groups
from fopro_kd.models.student import EKDStudent
from fopro_kd.models.weights import create_timm_model, feature_dim_of
from fopro_kd.training.components import build_federated_student, uses_teacher
from fopro_kd.training.trainer import predict
from fopro_kd.run_plan import student_input_size

__all__ = ["build_global_student", "class_correct_counts", "site_metrics_from_counts", "teacher_feature_dim"]


@functools.lru_cache(maxsize=8)
def _feature_dim(arch: str, kwargs: tuple[tuple[str, Any], ...]) -> int:
    model, _ = create_timm_model(arch, source="none", model_kwargs=dict(kwargs), prefix="teacher")
    return feature_dim_of(model)


def teacher_feature_dim(cfg: Config) -> int | None:
    """Feature size D_T of the configured teacher (None for methods without a teacher).

    Read from the architecture with random weights: the size does not depend on them.
    """
    if not uses_teacher(cfg):
        return None
    return _feature_dim(cfg.teacher.arch, tuple(sorted(cfg.teacher.model_kwargs.items())))


def build_global_student(
    cfg: Config, num_classes: int, seed: int | None = None, load_weights: bool = True
) -> EKDStudent:
    """The federated student (heads included) as every site builds it; seeded for the initial model.

    With ``privacy.mode`` ``local`` or ``central`` this is the DP (GroupNorm, out-of-place)
    student of :func:`fopro_kd.training.components.build_dp_student`, the architecture every client's
    :func:`~fopro_kd.training.components.build_models` trains in DP mode (docs/privacy.md).
    ``load_weights=False``: architecture only (the caller loads the global arrays into it).
    """
    if seed is not None:
        torch.manual_seed(int(seed))
    return build_federated_student(cfg, num_classes, teacher_feature_dim(cfg), load_weights=load_weights)


def class_correct_counts(
    student: EKDStudent, data: ImageSet, cfg: Config, device: torch.device
) -> tuple[list[int], list[int]]:
    """Per-class (correct, total) of the main head on ``data`` (un-augmented), as plain ints."""
    num_classes = data.num_classes
    if len(data) == 0:
        return [0] * num_classes, [0] * num_classes
    probs = predict(student, data, cfg.train.eval_batch_size, device, student_input_size(cfg))
    y = data.labels.numpy()
    hit = probs.argmax(axis=1) == y
    total = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y[hit], minlength=num_classes)
    return [int(v) for v in correct], [int(v) for v in total]


def site_metrics_from_counts(
    correct: Sequence[int],
    total: Sequence[int],
    class_names: list[str],
    train_counts: Sequence[int],
    metrics_cfg: MetricsConfig,
) -> dict[str, Any]:
    """Balanced accuracy, shot-group recall and per-class recall of one site from its counts.

    Classes without local test samples have no recall (None) and are left out of the means,
    as in :func:`fopro_kd.metrics.compute_metrics`. Shot groups come from the federation's
    training counts (``train_counts``), so "few-shot" means the same classes at every site.

    Examples
    --------
    >>> m = site_metrics_from_counts([1, 0, 3], [2, 0, 3], ["a", "b", "c"], [200, 50, 5], MetricsConfig())
    >>> m["balanced_accuracy"], m["few_shot"], m["per_class_recall"]["b"]
    (0.75, 1.0, None)
    """
    c = np.asarray(correct, dtype=np.float64)
    t = np.asarray(total, dtype=np.float64)
    if c.shape != t.shape or c.shape[0] != len(class_names):
        raise ValueError(
            f"per-class counts must have one entry per class ({len(class_names)}), got {c.shape[0]} correct and "
            f"{t.shape[0]} total"
        )
    recall = [float(c[i] / t[i]) if t[i] > 0 else None for i in range(len(class_names))]
    present = [r for r in recall if r is not None]
    groups = shot_groups(train_counts, metrics_cfg.many_shot_threshold, metrics_cfg.few_shot_threshold)

    def group_mean(name: str) -> float | None:
        values = [recall[i] for i in groups[name] if recall[i] is not None]
        return float(np.mean(values)) if values else None

    return {
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "accuracy": float(c.sum() / t.sum()) if t.sum() > 0 else None,
        "many_shot": group_mean("many"),
        "medium_shot": group_mean("medium"),
        "few_shot": group_mean("few"),
        "per_class_recall": dict(zip(class_names, recall)),
        "num_samples": int(t.sum()),
    }
