"""Partitioning one dataset into virtual hospitals: disjointness, determinism and skew profiles."""

from __future__ import annotations

import numpy as np
import pytest

from fopro_kd.config import PartitionConfig
from fopro_kd.data.partition import (
    list_partitioners,
    partition_indices,
    site_column_values,
    site_histograms,
    split_local_test,
)

NUM_CLASSES = 5
LABELS = np.random.default_rng(123).integers(0, NUM_CLASSES, size=600)
COVERING_KINDS = ["iid", "dirichlet", "quantity", "site_column"]
SITES = np.array(["hospital-b", "hospital-a", "hospital-c"])[np.arange(600) % 3]


def config(kind: str, **kwargs) -> PartitionConfig:
    if kind == "imbalance":
        kwargs.setdefault("site_imbalance_factors", [1.0, 10.0, 100.0])
    return PartitionConfig(kind=kind, **kwargs)


def parts_for(kind: str, seed: int = 0, **kwargs) -> list[np.ndarray]:
    return partition_indices(LABELS, 3, config(kind, **kwargs), seed, sites=SITES)


def mean_site_entropy(parts: list[np.ndarray]) -> float:
    hist = site_histograms(LABELS, parts, NUM_CLASSES).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(ent.mean())


def test_every_kind_is_registered():
    assert list_partitioners() == ["dirichlet", "iid", "imbalance", "quantity", "site_column"]


@pytest.mark.parametrize("kind", list_partitioners())
def test_parts_are_disjoint_sorted_and_deterministic(kind):
    parts = parts_for(kind, seed=5)
    assert len(parts) == 3
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = parts_for(kind, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("kind", COVERING_KINDS)
def test_covering_kinds_use_every_sample(kind):
    assert np.array_equal(np.sort(np.concatenate(parts_for(kind))), np.arange(len(LABELS)))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity"])
def test_different_seeds_give_different_splits(kind):
    assert not all(np.array_equal(a, b) for a, b in zip(parts_for(kind, seed=0), parts_for(kind, seed=1)))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    skewed = np.mean([mean_site_entropy(parts_for("dirichlet", seed=s, alpha=0.1)) for s in range(3)])
    mild = np.mean([mean_site_entropy(parts_for("dirichlet", seed=s, alpha=100.0)) for s in range(3)])
    assert skewed < mild - 0.3
    assert mild > 0.95 * np.log(NUM_CLASSES)


def test_dirichlet_respects_min_per_site():
    labels = np.repeat(np.arange(4), 10)  # 40 samples, 8 sites
    parts = partition_indices(labels, 8, PartitionConfig(kind="dirichlet", alpha=0.01, min_per_site=5), seed=0)
    assert min(len(p) for p in parts) >= 5
    assert sum(len(p) for p in parts) == 40


def test_quantity_sizes_vary_and_labels_stay_iid():
    sizes = [len(p) for p in parts_for("quantity", quantity_sigma=1.5, seed=2)]
    assert max(sizes) > 1.5 * min(sizes)
    assert min(sizes) >= 10
    assert [len(p) for p in parts_for("quantity", quantity_sigma=0.0)] == [200, 200, 200]


def test_imbalance_profile_follows_each_site_factor():
    labels = np.repeat(np.arange(3), [300, 200, 100])  # global order: class 0, 1, 2
    cfg = PartitionConfig(kind="imbalance", site_imbalance_factors=[1.0, 4.0])
    parts = partition_indices(labels, 2, cfg, seed=0)
    hist = site_histograms(labels, parts, 3)
    shares = site_histograms(labels, partition_indices(labels, 2, PartitionConfig(kind="iid"), seed=0), 3)
    # factor 1: nothing dropped beyond the availability cap
    np.testing.assert_array_equal(hist[0], np.minimum(shares[0], shares[0][0]))
    # factor 4 over C = 3 classes: targets a0 * [1, 1/2, 1/4]
    a0 = shares[1][0]
    expected = np.minimum(shares[1], np.floor(a0 * np.array([1.0, 0.5, 0.25])).astype(int))
    np.testing.assert_array_equal(hist[1], expected)


def test_imbalance_needs_one_factor_per_site():
    with pytest.raises(ValueError, match="one factor per site"):
        partition_indices(LABELS, 3, PartitionConfig(kind="imbalance", site_imbalance_factors=[2.0]), seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        partition_indices(LABELS, 2, PartitionConfig(kind="imbalance", site_imbalance_factors=[0.5, 2.0]), seed=0)


def test_site_column_groups_by_sorted_site_value():
    parts = parts_for("site_column")
    assert site_column_values(SITES) == ["hospital-a", "hospital-b", "hospital-c"]
    for name, part in zip(site_column_values(SITES), parts):
        assert set(SITES[part]) == {name}


def test_site_column_errors_name_the_problem():
    with pytest.raises(ValueError, match="site column"):
        partition_indices(LABELS, 3, PartitionConfig(kind="site_column"), seed=0)
    with pytest.raises(ValueError, match="3 distinct values"):
        partition_indices(LABELS, 2, PartitionConfig(kind="site_column"), seed=0, sites=SITES)


def test_bad_site_counts_raise():
    with pytest.raises(ValueError, match="num_sites"):
        partition_indices(LABELS, 0, PartitionConfig(kind="iid"), seed=0)
    with pytest.raises(ValueError, match="cannot split 3 samples into 4 sites"):
        partition_indices(np.array([0, 1, 0]), 4, PartitionConfig(kind="iid"), seed=0)
    with pytest.raises(ValueError, match="1-D"):
        partition_indices(np.zeros((2, 2), int), 1, PartitionConfig(kind="iid"), seed=0)


def test_split_local_test_is_stratified_and_disjoint():
    site = parts_for("iid")[0]
    train, test = split_local_test(site, LABELS, 0.2, seed=0)
    assert len(test) == round(0.2 * len(site))
    assert np.array_equal(np.sort(np.concatenate([train, test])), site)
    counts_site = np.bincount(LABELS[site], minlength=NUM_CLASSES)
    counts_test = np.bincount(LABELS[test], minlength=NUM_CLASSES)
    assert np.all(np.abs(counts_test - 0.2 * counts_site) < 1.0)
    again = split_local_test(site, LABELS, 0.2, seed=0)
    assert np.array_equal(again[1], test)


def test_split_local_test_keeps_a_training_sample_per_class():
    labels = np.array([0, 1, 1, 2, 2, 2])
    train, test = split_local_test(np.arange(6), labels, 0.5, seed=0)
    assert set(labels[train]) == {0, 1, 2}
    assert len(test) == 3
    assert split_local_test(np.arange(6), labels, 0.0, seed=0)[1].size == 0
    with pytest.raises(ValueError, match="fraction"):
        split_local_test(np.arange(6), labels, 1.0, seed=0)


def test_site_histograms_shape_and_error():
    hist = site_histograms(np.array([0, 1, 1, 2]), [np.array([0, 1]), np.array([2, 3])], 4)
    np.testing.assert_array_equal(hist, [[1, 1, 0, 0], [0, 1, 1, 0]])
    with pytest.raises(ValueError, match="num_classes"):
        site_histograms(np.array([0, 5]), [np.array([0, 1])], 3)
