"""Group-aware train/val/test splits and long-tail subsampling.

HAM10000 holds several images of one lesion; a split that puts them on both sides of the
train/test line leaks and inflates every score, so all splitters here move whole groups
(``ImageSet.groups``; ``None`` = every image its own group). The FoPro-KD protocol holds
out a *fixed number per class* (balanced val/test, so tail classes are measured with the
same precision as head classes); on small data this would swallow a rare class entirely,
so the hold-out is capped at a fraction of each class and at least one training group is
always left.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .dataset import DatasetSplits, ImageSet

__all__ = [
    "balanced_group_split",
    "check_splits",
    "concat_imagesets",
    "kfold_assignment",
    "kfold_group_split",
    "long_tail_subsample",
    "stratified_group_split",
]

logger = logging.getLogger("fopro_kd.data")


# --------------------------------------------------------------------------- group bookkeeping


def _groups_by_class(data: ImageSet) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Member indices of every group, each group's class (majority label) and size."""
    labels = data.labels.numpy()
    if data.groups is None:
        members = [np.array([i], dtype=np.int64) for i in range(len(labels))]
    else:
        _, inverse = np.unique(np.asarray(data.groups, dtype=object).astype(str), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        members = [m.astype(np.int64) for m in np.split(order, bounds)] if len(order) else []
    group_class = np.array(
        [int(np.bincount(labels[m], minlength=data.num_classes).argmax()) for m in members], dtype=np.int64
    )
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    return members, group_class, sizes


def _pick(
    order: np.ndarray, sizes: np.ndarray, target: int, budget: int, taken: np.ndarray, keep_one: bool
) -> list[int]:
    """Greedily take groups (in ``order``) until ``target`` images, getting as close as possible.

    A group is taken when it brings the count closer to the target and fits in ``budget``;
    with ``keep_one`` the last untaken group of ``order`` is never taken (it stays in training).
    """
    picked: list[int] = []
    count = 0
    remaining = int((~taken[order]).sum())
    for g in order:
        if count >= target or (keep_one and remaining <= 1):
            break
        size = int(sizes[g])
        if taken[g] or size > budget:
            continue
        if abs(count + size - target) < abs(count - target):
            picked.append(int(g))
            taken[g] = True
            count += size
            budget -= size
            remaining -= 1
    return picked


def _split_by_targets(
    data: ImageSet, targets: dict[int, tuple[int, int]], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assign whole groups to test then val per class, aiming at ``targets[c] = (val, test)`` images."""
    members, group_class, sizes = _groups_by_class(data)
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(members), dtype=np.int64)  # 0 train, 1 val, 2 test
    for c in range(data.num_classes):
        groups = np.flatnonzero(group_class == c)
        if len(groups) == 0:
            continue
        order = groups[rng.permutation(len(groups))]
        val_target, test_target = targets.get(c, (0, 0))
        taken = np.zeros(len(members), dtype=bool)
        keep_one = len(groups) >= 2
        budget = val_target + test_target
        test_groups = _pick(order, sizes, test_target, budget, taken, keep_one)
        budget -= int(sizes[test_groups].sum()) if test_groups else 0
        val_groups = _pick(order, sizes, val_target, budget, taken, keep_one)
        assignment[test_groups] = 2
        assignment[val_groups] = 1
    index = [np.sort(np.concatenate([members[g] for g in np.flatnonzero(assignment == k)] or
                                    [np.zeros(0, dtype=np.int64)])) for k in range(3)]
    return index[0], index[1], index[2]


# --------------------------------------------------------------------------- public splitters


def balanced_group_split(
    data: ImageSet,
    val_per_class: int,
    test_per_class: int,
    max_holdout_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hold out about ``val_per_class`` / ``test_per_class`` images of every class, by whole groups.

    Parameters
    ----------
    data : the images with labels and optional groups (a group's class = its majority label).
    val_per_class, test_per_class : target images per class in val and test. With groups of
        several images the counts are approximate (groups are taken while they bring the count
        closer to the target).
    max_holdout_fraction : at most this fraction of a class's images goes to val + test; when
        the targets exceed it both are scaled down proportionally (logged).
    seed : shuffles the groups of each class.

    Returns
    -------
    train, val, test : sorted int64 index arrays into ``data``. A class with >= 2 groups
        always keeps at least one group in train.
    """
    if val_per_class < 0 or test_per_class < 0:
        raise ValueError(f"val_per_class and test_per_class must be >= 0, got {val_per_class}, {test_per_class}")
    if not 0 < max_holdout_fraction <= 1:
        raise ValueError(f"max_holdout_fraction must be in (0, 1], got {max_holdout_fraction}")
    _, group_class, sizes = _groups_by_class(data)
    class_images = np.bincount(group_class, weights=sizes, minlength=data.num_classes).astype(np.int64)
    targets: dict[int, tuple[int, int]] = {}
    for c in range(data.num_classes):
        n = int(class_images[c])
        cap = int(np.floor(max_holdout_fraction * n))
        val_t, test_t = val_per_class, test_per_class
        if val_t + test_t > cap and val_t + test_t > 0:
            ratio = cap / (val_t + test_t)
            val_t, test_t = int(np.floor(val_per_class * ratio)), int(np.floor(test_per_class * ratio))
            if n:
                logger.info(
                    "class %r: %d images; hold-out scaled to val=%d, test=%d (split.max_holdout_fraction=%s)",
                    data.class_names[c], n, val_t, test_t, max_holdout_fraction,
                )
        targets[c] = (val_t, test_t)
    return _split_by_targets(data, targets, seed)


def stratified_group_split(
    data: ImageSet, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hold out about ``val_fraction`` / ``test_fraction`` of every class, by whole groups.

    A per-class group shuffle (greedy, like :func:`balanced_group_split`) rather than
    ``StratifiedGroupKFold``: it gives the exact two fractions in one pass and keeps at least
    one training group for every class with >= 2 groups.

    Returns
    -------
    train, val, test : sorted int64 index arrays into ``data``.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction and test_fraction must be >= 0 with a sum < 1, got {val_fraction}, {test_fraction}"
        )
    _, group_class, sizes = _groups_by_class(data)
    class_images = np.bincount(group_class, weights=sizes, minlength=data.num_classes)
    targets = {
        c: (int(round(val_fraction * n)), int(round(test_fraction * n))) for c, n in enumerate(class_images)
    }
    return _split_by_targets(data, targets, seed)


def _label_view(data: ImageSet, indices: np.ndarray) -> ImageSet:
    """Labels and groups of ``data[indices]`` with 1x1 placeholder images (the splitters never read pixels)."""
    pick = indices.tolist()
    return ImageSet(
        images=torch.zeros(len(pick), 3, 1, 1, dtype=torch.uint8),
        labels=data.labels[torch.as_tensor(indices, dtype=torch.int64)].clone(),
        class_names=list(data.class_names),
        ids=[data.ids[i] for i in pick],
        groups=None if data.groups is None else [data.groups[i] for i in pick],
    )


def kfold_assignment(data: ImageSet, folds: int, seed: int) -> np.ndarray:
    """Fold (0 .. folds-1) of every image: whole groups, stratified by class at group level.

    Per class (a group's class = its majority label), the class's groups are shuffled with
    ``seed`` and then taken largest first (stable, so equal sizes keep the shuffled order); each
    goes to the fold holding the fewest images of that class so far (ties: fewest images in
    all, then the lowest fold). With one image per group this deals the class out round-robin,
    so every fold gets ``floor`` or ``ceil`` of ``n_c / folds`` images of class ``c``; with
    multi-image lesions the per-class counts differ by at most one group's size.

    Raises
    ------
    ValueError
        ``folds < 2``, or a class with images but fewer groups than ``folds`` (some fold's test
        set would have no image of it); the message names ``split.folds``.
    """
    if folds < 2:
        raise ValueError(f"split.folds must be >= 2, got {folds}")
    members, group_class, sizes = _groups_by_class(data)
    rng = np.random.default_rng(seed)
    short = [
        f"{data.class_names[c]!r} ({int((group_class == c).sum())} groups)"
        for c in range(data.num_classes)
        if 0 < int((group_class == c).sum()) < folds
    ]
    if short:
        raise ValueError(
            f"split.folds={folds} but class(es) {', '.join(short)} have fewer groups (lesions / images) than folds; "
            f"every fold's test set needs one: lower split.folds or drop the class"
        )
    fold_of_group = np.zeros(len(members), dtype=np.int64)
    fold_images = np.zeros(folds, dtype=np.int64)
    for c in range(data.num_classes):
        groups = np.flatnonzero(group_class == c)
        if len(groups) == 0:
            continue
        shuffled = groups[rng.permutation(len(groups))]
        order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
        class_images = np.zeros(folds, dtype=np.int64)
        for g in order:
            f = min(range(folds), key=lambda k: (class_images[k], fold_images[k], k))
            fold_of_group[g] = f
            class_images[f] += sizes[g]
            fold_images[f] += sizes[g]
    assignment = np.zeros(len(data), dtype=np.int64)
    for g, m in enumerate(members):
        assignment[m] = fold_of_group[g]
    return assignment


def kfold_group_split(
    data: ImageSet, folds: int, fold: int, val_per_class: int, max_holdout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / val / test of fold ``fold`` of a group-aware stratified k-fold split.

    Test = the images of fold ``fold`` (:func:`kfold_assignment`); so across ``fold = 0 ..
    folds-1`` every image is tested exactly once and out-of-fold predictions can be pooled.
    Val = a *balanced* hold-out of about ``val_per_class`` images per class drawn by whole
    groups from the other folds (capped at ``max_holdout_fraction`` of each class's images
    there, at least one training group kept), as in :func:`balanced_group_split`: model
    selection weighs every class equally, like the balanced protocol. Train = the rest.

    Everything depends on ``seed`` (``split.seed``) and ``fold`` only: identical split seeds
    give identical folds, whatever the run seed.

    Returns
    -------
    train, val, test : sorted int64 index arrays into ``data``.
    """
    if not 0 <= fold < folds:
        raise ValueError(f"split.fold must be in 0..{folds - 1} (split.folds={folds}), got {fold}")
    assignment = kfold_assignment(data, folds, seed)
    test = np.flatnonzero(assignment == fold).astype(np.int64)
    rest = np.flatnonzero(assignment != fold).astype(np.int64)
    # the val draw gets its own stream per fold, derived from the split seed only
    val_seed = int(np.random.default_rng([seed, fold, 0x6B666F6C]).integers(0, 2**31 - 1))
    tr, va, _ = balanced_group_split(_label_view(data, rest), val_per_class, 0, max_holdout_fraction, val_seed)
    return np.sort(rest[tr]), np.sort(rest[va]), test


def long_tail_subsample(
    labels: np.ndarray,
    imbalance_factor: float,
    seed: int,
    class_order: Sequence[int] | None = None,
) -> np.ndarray:
    """Indices of a long-tailed subsample: ``n_i = n_max * IF^(-i/(C-1))`` for the i-th class.

    Parameters
    ----------
    labels : int labels of the pool.
    imbalance_factor : ``n_max / n_min`` of the result (>= 1).
    seed : which images of each class are kept.
    class_order : classes from head to tail; default = present classes by count, descending
        (ties by class index), so the natural head stays the head.

    Returns
    -------
    np.ndarray
        Sorted kept indices. ``n_max`` is the count of the first class; each ``n_i`` is at least 1
        and capped by what the class has.
    """
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor is n_max / n_min and must be >= 1, got {imbalance_factor}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    if class_order is None:
        order = sorted(present.tolist(), key=lambda c: (-counts[c], c))
    else:
        order = [int(c) for c in class_order]
        missing = sorted(set(present.tolist()) - set(order))
        if missing or len(set(order)) != len(order):
            raise ValueError(
                f"class_order {order} must list every class present in labels once; missing {missing}"
            )
        order = [c for c in order if c < len(counts) and counts[c] > 0]
    rng = np.random.default_rng(seed)
    n_max = int(counts[order[0]])
    steps = max(1, len(order) - 1)
    kept = []
    for i, c in enumerate(order):
        target = max(1, int(round(n_max * imbalance_factor ** (-i / steps))))
        pool = np.flatnonzero(labels == c)
        kept.append(rng.choice(pool, size=min(target, len(pool)), replace=False))
    return np.sort(np.concatenate(kept)).astype(np.int64)


# --------------------------------------------------------------------------- checks and helpers


def check_splits(splits: DatasetSplits) -> None:
    """Fail early on splits that cannot train or be evaluated.

    Raises
    ------
    ValueError
        An empty split, differing class lists or image sizes, or a class without any training
        image (the model could never predict it; drop the class or provide images).
    """
    parts = (("train", splits.train), ("val", splits.val), ("test", splits.test))
    for name, part in parts:
        if len(part) == 0:
            raise ValueError(f"{splits.name}: the {name} split is empty; check the split settings (split.*)")
        if part.class_names != splits.train.class_names:
            raise ValueError(f"{splits.name}: the {name} split has classes {part.class_names}, "
                             f"train has {splits.train.class_names}")
        if part.images.shape[-2:] != splits.train.images.shape[-2:]:
            raise ValueError(f"{splits.name}: the {name} split has image size {tuple(part.images.shape[-2:])}, "
                             f"train has {tuple(splits.train.images.shape[-2:])}")
    train_counts = splits.train.class_counts()
    absent = [splits.class_names[c] for c in np.flatnonzero(train_counts == 0)]
    if absent:
        raise ValueError(
            f"{splits.name}: class(es) {absent} have no image in the train split; provide training images or "
            f"remove the class"
        )
    for name, part in parts[1:]:
        absent = [splits.class_names[c] for c in np.flatnonzero(part.class_counts() == 0)]
        if absent:
            logger.warning("%s: class(es) %s have no image in the %s split; their metrics will be undefined",
                           splits.name, absent, name)


def concat_imagesets(sets: Sequence[ImageSet]) -> ImageSet:
    """Concatenate image sets of the same task (used to re-split predefined splits by a split file)."""
    if not sets:
        raise ValueError("concat_imagesets needs at least one ImageSet")
    first = sets[0]
    for s in sets[1:]:
        if s.class_names != first.class_names or s.images.shape[1:] != first.images.shape[1:]:
            raise ValueError("cannot concatenate image sets with different classes or image sizes")
    any_groups = any(s.groups is not None for s in sets)
    any_sites = any(s.sites is not None for s in sets)
    return ImageSet(
        images=torch.cat([s.images for s in sets]).contiguous(),
        labels=torch.cat([s.labels for s in sets]),
        class_names=list(first.class_names),
        ids=[i for s in sets for i in s.ids],
        groups=[g for s in sets for g in (s.groups if s.groups is not None else s.ids)] if any_groups else None,
        sites=[x for s in sets for x in (s.sites if s.sites is not None else ["unknown"] * len(s))]
        if any_sites else None,
    )
