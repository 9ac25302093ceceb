"""The one dataset interface every loader returns: decoded, resized uint8 images in memory.

Decoding JPEGs on 2 cores costs more than a ResNet-18 step, so every loader decodes and
resizes each image once per run (and caches the result on disk); training then only
slices this tensor and augments on tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ImageSet:
    """Images of one split with their labels and provenance.

    Attributes
    ----------
    images : uint8 tensor (N, 3, H, W), contiguous (NCHW).
    labels : int64 tensor (N,), values in ``range(len(class_names))``.
    class_names : names of *all* classes of the task (not only those present here).
    ids : image identifiers (file stem or index), used by split files and error messages.
    groups : lesion / patient identifier per image, or None; splits never cut a group.
    sites : natural site / centre per image, or None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    ids: list[str]
    groups: list[str] | None = None
    sites: list[str] | None = None

    def __post_init__(self) -> None:
        n = int(self.labels.shape[0])
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[0] != n or len(self.ids) != n:
            raise ValueError(f"images ({self.images.shape[0]}), labels ({n}) and ids ({len(self.ids)}) differ in length")
        for name, values in (("groups", self.groups), ("sites", self.sites)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} images")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(
                f"labels must be in [0, {len(self.class_names) - 1}] for classes {self.class_names}, "
                f"got range [{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        self.labels = self.labels.to(torch.int64)
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def class_counts(self) -> np.ndarray:
        """Images per class (length ``num_classes``, zeros for absent classes)."""
        return np.bincount(self.labels.numpy(), minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: np.ndarray | list[int] | torch.Tensor) -> "ImageSet":
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        pick = idx.tolist()
        return ImageSet(
            images=self.images[idx].contiguous(),
            labels=self.labels[idx].clone(),
            class_names=list(self.class_names),
            ids=[self.ids[i] for i in pick],
            groups=None if self.groups is None else [self.groups[i] for i in pick],
            sites=None if self.sites is None else [self.sites[i] for i in pick],
        )


@dataclass
class DatasetSplits:
    """Train / validation (model selection) / test (reporting) splits of one task."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    name: str = "dataset"
    info: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            split: {name: int(c) for name, c in zip(s.class_names, s.class_counts())}
            for split, s in (("train", self.train), ("val", self.val), ("test", self.test))
        }
