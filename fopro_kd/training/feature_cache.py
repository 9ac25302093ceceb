"""Teacher feature cache: compute the frozen (optionally prompted) teacher's features once.

A distillation target T(FPG(v(x))) depends on the image x, the teacher's view v of it and the
prompt. When the teacher and the prompt are frozen and the view comes from a finite set, every
target can be computed once and looked up afterwards, which turns an EKD or FoPro-KD epoch into
about a BSM epoch (the teacher forward, and for the prompt its backward, leave the loop).

The finite view sets (``augment.teacher_view``):

- ``clean``: one view, the un-augmented image;
- ``flips``: four views, the clean image and its horizontal, vertical and double flips, indexed
  ``hflip + 2 * vflip`` as drawn by :class:`~fopro_kd.data.transforms.BatchAugment` for the
  student, so the teacher sees the student's flips.

The targets are exact (the same tensor an online teacher forward computes, up to float16
storage when ``train.cache_dtype: float16``) for every view in the set. When the student's
augmentation also scales, rotates or jitters colours, the teacher's view is the flipped clean
image, not the student's view: that is a choice of target, documented in the README.
Which configurations may cache is decided by :func:`fopro_kd.config.feature_cache_problem`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.transforms import to_float_on
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.prompt import FourierPrompt
from fopro_kd.training.teacher_view import teacher_targets

__all__ = ["TeacherFeatureCache", "VIEW_COUNTS", "apply_flip_view", "cache_bytes"]

VIEW_COUNTS = {"clean": 1, "flips": 4}
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def apply_flip_view(x: Tensor, views: Tensor) -> Tensor:
    """Flip each image of ``x`` (N, C, H, W) by its view index (bit 0: horizontal, bit 1: vertical)."""
    views = views.to(x.device).view(-1, 1, 1, 1)
    x = torch.where((views % 2) == 1, x.flip(-1), x)
    return torch.where((views // 2) == 1, x.flip(-2), x)


def cache_bytes(num_images: int, num_views: int, feature_dim: int, dtype: str) -> int:
    """Bytes the cache will hold (what ``train.max_cache_gb`` bounds)."""
    return num_images * num_views * feature_dim * torch.empty(0, dtype=_DTYPES[dtype]).element_size()


class TeacherFeatureCache:
    """Features of ``teacher`` (after the frozen ``prompt``) on every image and view of ``data``.

    Parameters
    ----------
    teacher, prompt, domain : the teacher's view of a batch, as in the online path
        (:func:`~fopro_kd.training.teacher_view.teacher_targets`); ``prompt`` None for EKD.
    data : the site's training images (uint8), looked up by their index in ``data``.
    view_set : ``clean`` or ``flips`` (see the module docstring).
    dtype : ``float32`` or ``float16`` storage.
    max_gb : refuse (``ValueError``, before any teacher forward) a cache larger than this.
    """

    def __init__(
        self,
        teacher: FrozenTeacher,
        data: ImageSet,
        batch_size: int,
        device: torch.device,
        prompt: FourierPrompt | None = None,
        domain: str = "raw",
        view_set: str = "clean",
        dtype: str = "float32",
        max_gb: float = 4.0,
    ) -> None:
        if view_set not in VIEW_COUNTS:
            raise ValueError(f"teacher feature cache: view set must be one of {sorted(VIEW_COUNTS)}, got {view_set!r}")
        self.num_views = VIEW_COUNTS[view_set]
        self.num_images = len(data)
        self.view_set = view_set
        self.nbytes = cache_bytes(self.num_images, self.num_views, teacher.feature_dim, dtype)
        if self.nbytes > max_gb * 1e9:
            raise ValueError(
                f"the teacher feature cache would hold {self.nbytes / 1e9:.2f} GB ({self.num_images} images x "
                f"{self.num_views} views x {teacher.feature_dim} features, {dtype}), above train.max_cache_gb = "
                f"{max_gb}; raise train.max_cache_gb, set train.cache_dtype: float16 or augment.teacher_view: clean"
            )
        features = torch.zeros(self.num_views, self.num_images, teacher.feature_dim, dtype=_DTYPES[dtype])
        for start in range(0, self.num_images, batch_size):
            x = to_float_on(data.images[start : start + batch_size], device)
            for view in range(self.num_views):
                xv = apply_flip_view(x, torch.full((x.shape[0],), view)) if view else x
                feats = teacher_targets(teacher, xv, prompt, domain).float().cpu()
                features[view, start : start + x.shape[0]] = feats.to(features.dtype)
        self.features: Tensor = features

    def lookup(self, indices: Tensor, views: Tensor | None = None) -> Tensor:
        """float32 targets of images ``indices`` in views ``views`` (None: view 0)."""
        indices = indices.cpu()
        if views is None or self.num_views == 1:
            return self.features[0].index_select(0, indices).float()
        return self.features[views.cpu().long(), indices].float()
