"""Poisson sampling of batches, the sampling that Opacus' accountants assume.

At every step each example is included independently with probability ``q``, so batch sizes
vary (and can be 0). The randomness must be *secret*: privacy amplification by subsampling
holds only when nobody can recompute which examples were drawn, so the generator is seeded
from the OS (see :class:`~fopro_kd.privacy.local_dp.DPContext`), never from ``cfg.seed``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fopro_kd.data.dataset import ImageSet

__all__ = ["PoissonBatchLoader"]


class PoissonBatchLoader:
    """Iterate ``(images_uint8, labels, indices)`` batches drawn by Poisson sampling.

    Same triple as :class:`fopro_kd.data.batches.BatchLoader`, so the trainer's loop is shared.
    One "epoch" is ``steps_per_epoch`` independent draws; **empty batches are yielded** (with
    0-length tensors) because the accountant counts every step: the caller makes a
    noise-only update for them (what DP-SGD releases for an empty batch).

    Parameters
    ----------
    data : the image set.
    sample_rate : inclusion probability q of each example at each step.
    steps_per_epoch : draws per epoch (Opacus: the number of batches of the non-private loader).
    generator : CPU generator, seeded secretly.
    """

    def __init__(self, data: ImageSet, sample_rate: float, steps_per_epoch: int, generator: torch.Generator) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        self.data = data
        self.sample_rate = float(sample_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.generator = generator
        self.epoch = 0

    @property
    def expected_batch_size(self) -> float:
        return len(self.data) * self.sample_rate

    def set_epoch(self, epoch: int) -> None:
        """Kept for interface parity with BatchLoader; Poisson draws never depend on the epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        images, labels = self.data.images, self.data.labels
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(n, generator=self.generator) < self.sample_rate
            idx = mask.nonzero(as_tuple=False).reshape(-1)
            yield images.index_select(0, idx.to(images.device)), labels.index_select(0, idx.to(labels.device)), idx
        self.epoch += 1
