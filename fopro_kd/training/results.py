"""What one local training call produces, and the FedMAS per-class statistic of a student.

Both the trainer (:mod:`fopro_kd.training.trainer`) and the DP code
(:mod:`fopro_kd.privacy.local_dp`) need these: the trainer fills an :class:`EpochResult`,
DP mode replaces its per-class sums with released ones and releases :func:`class_rep_prior`
through the Gaussian mechanism. Keeping them here lets both import them without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fopro_kd.config import Config
from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.transforms import resize_batch, to_float_on
from fopro_kd.losses import representation_loss
from fopro_kd.models.student import EKDStudent
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.prompt import FourierPrompt
from fopro_kd.training.precision import autocast_context
from fopro_kd.training.teacher_view import teacher_targets
from fopro_kd.run_plan import student_input_size

__all__ = ["EpochResult", "class_rep_prior"]


@dataclass
class EpochResult:
    """Mean loss terms over the examples seen, plus the per-class statistics FedMAS needs."""

    num_examples: int = 0
    num_steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    class_rep_sum: np.ndarray | None = None
    class_seen: np.ndarray | None = None

    def as_metrics(self) -> dict[str, float]:
        return {"num_examples": float(self.num_examples), **self.losses}


@torch.no_grad()
def class_rep_prior(
    student: EKDStudent,
    teacher: FrozenTeacher,
    prompt: FourierPrompt | None,
    data: ImageSet,
    cfg: Config,
    device: torch.device,
) -> np.ndarray:
    """FedMAS step 1: per-class mean representation distance of ``student`` to the teacher.

    One non-dropping, un-augmented pass (method.md §5 notes: the original under-counted
    classes with a drop-last augmented loader). Classes absent from ``data`` get 0.
    """
    student.eval()
    sums = np.zeros(student.num_classes, dtype=np.float64)
    counts = np.zeros(student.num_classes, dtype=np.int64)
    size = student_input_size(cfg)
    for start in range(0, len(data), cfg.train.eval_batch_size):
        x = to_float_on(data.images[start : start + cfg.train.eval_batch_size], device)
        y = data.labels[start : start + cfg.train.eval_batch_size].numpy()
        with autocast_context(device):
            u = student.forward_train(resize_batch(x, size)).projection.float()
            t = teacher_targets(teacher, x, prompt, cfg.prompt.domain).float()
        rep = representation_loss(u, t).double().cpu().numpy()
        np.add.at(sums, y, rep)
        np.add.at(counts, y, 1)
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
