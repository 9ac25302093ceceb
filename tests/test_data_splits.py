"""Group-aware balanced / stratified splits, long-tail subsampling and split checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fopro_kd.data.dataset import DatasetSplits, ImageSet
from fopro_kd.data.splits import (
    balanced_group_split,
    check_splits,
    concat_imagesets,
    long_tail_subsample,
    stratified_group_split,
)


def _imageset(labels, groups=None, num_classes=None) -> ImageSet:
    labels = np.asarray(labels)
    n = len(labels)
    c = num_classes or int(labels.max()) + 1
    return ImageSet(
        images=torch.zeros((n, 3, 1, 1), dtype=torch.uint8),
        labels=torch.as_tensor(labels, dtype=torch.int64),
        class_names=[f"c{k}" for k in range(c)],
        ids=[f"img{i}" for i in range(n)],
        groups=groups,
    )


def _grouped_set(seed=0) -> ImageSet:
    """Like HAM10000: lesions of 1-4 images, one label per lesion, a rare class with few lesions."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c, lesions in enumerate([120, 40, 12]):
        for g in range(lesions):
            for _ in range(int(rng.integers(1, 5))):
                labels.append(c)
                groups.append(f"L{c}_{g}")
    return _imageset(labels, groups)


def _assert_partition(n, train, val, test):
    all_idx = np.concatenate([train, val, test])
    assert len(all_idx) == n and len(np.unique(all_idx)) == n


def _assert_no_group_crosses(data, *parts):
    owner = {}
    for k, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(data.groups[i], k) == k, f"group {data.groups[i]} is in two splits"


def test_balanced_split_without_groups_gives_exact_counts():
    data = _imageset(np.repeat([0, 1, 2], [100, 60, 40]))
    train, val, test = balanced_group_split(data, 5, 10, 0.5, seed=0)
    _assert_partition(len(data), train, val, test)
    assert data.subset(val).class_counts().tolist() == [5, 5, 5]
    assert data.subset(test).class_counts().tolist() == [10, 10, 10]
    assert train.dtype == np.int64 and np.all(np.diff(train) > 0)


def test_balanced_split_never_cuts_a_group_and_counts_are_close():
    data = _grouped_set()
    train, val, test = balanced_group_split(data, 10, 20, 0.5, seed=1)
    _assert_partition(len(data), train, val, test)
    _assert_no_group_crosses(data, train, val, test)
    for part, target in ((val, 10), (test, 20)):
        counts = data.subset(part).class_counts()
        assert np.all(np.abs(counts[:2] - target) <= 3), counts  # groups have <= 4 images


def test_balanced_split_caps_the_holdout_of_rare_classes(caplog):
    data = _imageset(np.repeat([0, 1], [200, 10]))
    with caplog.at_level(logging.INFO, logger="fopro_kd.data"):
        train, val, test = balanced_group_split(data, 20, 50, 0.4, seed=0)
    held = data.subset(np.concatenate([val, test])).class_counts()
    assert held[1] <= 4  # 40% of 10 images
    assert data.subset(val).class_counts()[1] == 1 and data.subset(test).class_counts()[1] == 2  # 20:50 scaled
    assert data.subset(train).class_counts()[1] >= 6
    assert "c1" in caplog.text and "max_holdout_fraction" in caplog.text


def test_balanced_split_leaves_a_training_group_for_every_class():
    # 2 lesions of one class, holdout allowed up to 100%: one lesion must stay in train
    data = _imageset([0] * 10 + [1, 1, 1, 1], groups=[f"a{i}" for i in range(10)] + ["b0", "b0", "b1", "b1"])
    for seed in range(5):
        train, val, test = balanced_group_split(data, 2, 2, 1.0, seed=seed)
        assert data.subset(train).class_counts()[1] >= 2
        _assert_no_group_crosses(data, train, val, test)


def test_balanced_split_depends_on_seed_only():
    data = _grouped_set()
    a = balanced_group_split(data, 5, 10, 0.5, seed=3)
    b = balanced_group_split(data, 5, 10, 0.5, seed=3)
    c = balanced_group_split(data, 5, 10, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])


def test_stratified_split_fractions_and_groups():
    data = _grouped_set(seed=2)
    train, val, test = stratified_group_split(data, 0.1, 0.2, seed=0)
    _assert_partition(len(data), train, val, test)
    _assert_no_group_crosses(data, train, val, test)
    total = data.class_counts()
    for part, fraction in ((val, 0.1), (test, 0.2)):
        counts = data.subset(part).class_counts()
        assert np.all(np.abs(counts - fraction * total) <= 3), (counts, total)
    with pytest.raises(ValueError, match="sum"):
        stratified_group_split(data, 0.5, 0.5, seed=0)


def test_long_tail_subsample_follows_the_profile():
    labels = np.repeat([0, 1, 2, 3, 4], 100)
    keep = long_tail_subsample(labels, 10.0, seed=0)
    counts = np.bincount(labels[keep], minlength=5)
    assert counts.tolist() == [round(100 * 10 ** (-i / 4)) for i in range(5)] == [100, 56, 32, 18, 10]
    assert len(np.unique(keep)) == len(keep)


def test_long_tail_subsample_order_and_cap():
    labels = np.repeat([0, 1, 2], [10, 50, 30])
    counts = np.bincount(labels[long_tail_subsample(labels, 4.0, seed=0)], minlength=3)
    assert counts.tolist() == [10, 50, 25]  # head = class 1 (most images), then 2, then 0 (n=50/4=12.5 capped to 10)
    counts = np.bincount(labels[long_tail_subsample(labels, 2.0, seed=0, class_order=[0, 2, 1])], minlength=3)
    assert counts.tolist() == [10, 5, 7]  # n_max from class 0 = 10 -> 10, 7.07, 5
    with pytest.raises(ValueError, match="class_order"):
        long_tail_subsample(labels, 2.0, seed=0, class_order=[0, 1])


def _splits(train_labels, val_labels, test_labels) -> DatasetSplits:
    return DatasetSplits(
        train=_imageset(train_labels, num_classes=3),
        val=_imageset(val_labels, num_classes=3),
        test=_imageset(test_labels, num_classes=3),
        name="toy",
    )


def test_check_splits_errors_and_warnings(caplog):
    check_splits(_splits([0, 1, 2], [0, 1, 2], [0, 1, 2]))
    with pytest.raises(ValueError, match="'c2'.*train"):
        check_splits(_splits([0, 1, 1], [0, 1, 2], [0, 1, 2]))
    with pytest.raises(ValueError, match="val split is empty"):
        check_splits(_splits([0, 1, 2], [], [0, 1, 2]))
    with caplog.at_level(logging.WARNING, logger="fopro_kd.data"):
        check_splits(_splits([0, 1, 2], [0, 1], [0, 1, 2]))
    assert "c2" in caplog.text and "val" in caplog.text


def test_concat_imagesets_keeps_rows_and_ids():
    a = _imageset([0, 1], groups=["g0", "g1"])
    b = _imageset([1, 0])
    both = concat_imagesets([a, b])
    assert both.labels.tolist() == [0, 1, 1, 0]
    assert both.groups == ["g0", "g1", "img0", "img1"]
