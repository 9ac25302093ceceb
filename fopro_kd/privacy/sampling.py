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

__all__ = ["PoissonBatchLoader", "physical_chunks"]


def physical_chunks(num: int, max_physical_batch_size: int | None) -> list[slice]:
    """Slices that cut a logical batch of ``num`` examples into chunks of at most ``max_physical_batch_size``.

    Why: DP-SGD needs large *logical* (Poisson) batches for a good signal-to-noise ratio, but
    per-sample gradients of a large batch do not fit in memory. The chunks' clipped per-sample
    gradients are summed and noised once, so the update (and the accountant's one event) is the
    logical batch's. An empty batch is one empty chunk (it still makes a noise-only step).
    """
    if max_physical_batch_size is None or num <= max_physical_batch_size:
        return [slice(0, num)]
    if max_physical_batch_size < 1:
        raise ValueError(f"privacy.max_physical_batch_size must be >= 1, got {max_physical_batch_size!r}")
    return [slice(start, min(start + max_physical_batch_size, num)) for start in range(0, num, max_physical_batch_size)]


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
    max_physical_batch_size : None (default): one yield per logical batch. An integer: each
        logical batch is yielded in chunks of at most this many examples;
        :attr:`last_chunk` is True while the caller handles the last chunk of a logical batch
        (where the DP optimizer adds the noise and steps, and the accountant counts one step).
    """

    def __init__(self, data: ImageSet, sample_rate: float, steps_per_epoch: int, generator: torch.Generator,
                 max_physical_batch_size: int | None = None) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        self.data = data
        self.sample_rate = float(sample_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.generator = generator
        self.epoch = 0
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"privacy.max_physical_batch_size must be >= 1, got {max_physical_batch_size!r}")
        self.max_physical_batch_size = max_physical_batch_size
        self.last_chunk = True
        self.logical_steps = 0

    @property
    def expected_batch_size(self) -> float:
        return len(self.data) * self.sample_rate

    def set_epoch(self, epoch: int) -> None:
        """Kept for interface parity with BatchLoader; Poisson draws never depend on the epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Logical batches per epoch (physical chunks may be more)."""
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        images, labels = self.data.images, self.data.labels
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(n, generator=self.generator) < self.sample_rate
            idx = mask.nonzero(as_tuple=False).reshape(-1)
            chunks = physical_chunks(int(idx.numel()), self.max_physical_batch_size)
            for k, part in enumerate(chunks):
                sub = idx[part]
                self.last_chunk = k == len(chunks) - 1
                if self.last_chunk:
                    self.logical_steps += 1
                yield images.index_select(0, sub.to(images.device)), labels.index_select(0, sub.to(labels.device)), sub
        self.last_chunk = True
        self.epoch += 1
