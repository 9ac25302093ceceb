"""Mini-batches by slicing the in-memory uint8 tensor: no DataLoader workers, no per-item Python.

Why not ``torch.utils.data.DataLoader``: the images are already decoded in one tensor, so
a batch is one ``index_select``; worker processes would only copy data between processes
on a 2-core machine. Shuffling is seeded per epoch (``seed + epoch``) so a resumed run
sees exactly the batches it would have seen without the interruption.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .dataset import ImageSet

__all__ = ["BatchLoader", "iterate_batches"]


def iterate_batches(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield int64 index tensors that cover ``range(n)`` in batches.

    Parameters
    ----------
    n : number of items.
    batch_size : items per batch (the last one may be smaller unless ``drop_last``).
    shuffle : random order from ``generator`` (required then: unseeded shuffling would make
        runs irreproducible); otherwise ``0..n-1`` in order.
    generator : CPU generator for the permutation.
    drop_last : skip a final incomplete batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if shuffle:
        if generator is None:
            raise ValueError("iterate_batches(shuffle=True) needs a seeded torch.Generator for reproducibility")
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


class BatchLoader:
    """Iterate ``(images_uint8, labels, indices)`` batches of an :class:`ImageSet`.

    Epoch ``k`` (counted by completed ``__iter__`` calls, or set with :meth:`set_epoch`)
    uses the permutation of a generator seeded with ``seed + k``, so epoch ``k`` is the
    same whether it is reached by iterating or by resuming with ``set_epoch(k)``.

    Parameters
    ----------
    data : the image set; batches are slices of its tensors (images stay uint8, on its device).
    batch_size : images per batch.
    shuffle : new random order each epoch.
    seed : base seed of the per-epoch permutations.
    drop_last : skip a final incomplete batch (keeps BatchNorm away from batches of 1).
    """

    def __init__(self, data: ImageSet, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (re-seeds the generator with ``seed + epoch``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self._generator.manual_seed(self.seed + self.epoch)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.set_epoch(self.epoch)
        indices = list(iterate_batches(len(self.data), self.batch_size, self.shuffle, self._generator, self.drop_last))
        self.epoch += 1  # the next iteration is the next epoch, even if this one is not consumed fully
        images, labels = self.data.images, self.data.labels
        for idx in indices:
            dev_idx = idx.to(images.device)
            yield images.index_select(0, dev_idx), labels.index_select(0, idx.to(labels.device)), idx
