"""Teacher feature cache: compute the frozen teacher's features once per image.

Valid only when the teacher's input does not change between epochs: no prompt (method
``ekd``) and no augmentation on the teacher's input (``augment.teacher_sees_augmented:
false`` or augmentation off). The student still sees augmented views. With a ResNet-50
teacher the teacher forward is a large share of an EKD step, so this trades one pass
over the data for every later epoch's teacher forwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.transforms import to_float_on
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.training.teacher_view import teacher_targets


def feature_cache_problem(method: str, teacher_sees_augmented: bool, augment_enabled: bool) -> str | None:
    """Why cached features would be wrong for this configuration, or None when they are valid."""
    if method == "fopro-kd":
        return "the prompt changes the teacher's input every step (method 'fopro-kd')"
    if method not in ("ekd",):
        return f"method {method!r} has no teacher"
    if augment_enabled and teacher_sees_augmented:
        return "the teacher sees augmented images; set augment.teacher_sees_augmented: false"
    return None


class TeacherFeatureCache:
    """Features of ``teacher`` on every image of ``data`` (un-augmented), looked up by index."""

    def __init__(self, teacher: FrozenTeacher, data: ImageSet, batch_size: int, device: torch.device) -> None:
        features = []
        for start in range(0, len(data), batch_size):
            x = to_float_on(data.images[start : start + batch_size], device)
            features.append(teacher_targets(teacher, x, None, "raw").float().cpu())
        self.features: Tensor = (
            torch.cat(features) if features else torch.zeros(0, teacher.feature_dim, dtype=torch.float32)
        )
        self.num_images = len(data)

    def lookup(self, indices: Tensor) -> Tensor:
        return self.features.index_select(0, indices.cpu())
