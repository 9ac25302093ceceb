"""Lesion-grouped k-fold splits and the paired bootstrap of fopro_kd.stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from fopro_kd.config import ConfigError, load_config
from fopro_kd.data import build_splits
from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.splits import kfold_assignment, kfold_group_split
from fopro_kd.stats import (
    Predictions,
    align_predictions,
    balanced_accuracy,
    fold_t_interval,
    load_predictions,
    mean_recall,
    paired_bootstrap,
    pool_predictions,
    save_predictions,
    seed_and_image_interval,
)


def _grouped_set(seed: int = 0) -> ImageSet:
    """3 classes, lesions of 1-4 images (the HAM10000 situation), 2 px images."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c, n_lesions in enumerate((30, 12, 7)):
        for lesion in range(n_lesions):
            size = int(rng.integers(1, 5))
            labels += [c] * size
            groups += [f"L{c}-{lesion}"] * size
    n = len(labels)
    return ImageSet(images=torch.zeros(n, 3, 2, 2, dtype=torch.uint8), labels=torch.tensor(labels),
                    class_names=["a", "b", "c"], ids=[f"img{i}" for i in range(n)], groups=groups)


def _kfold_cfg(fold: int, folds: int = 3, split_seed: int = 0, run_seed: int = 0):
    return load_config(None, [
        "data.kind=synthetic", "data.image_size=16", "data.num_classes=3", "data.max_per_class=12",
        "split.val_per_class=2", "split.test_per_class=3", "split.mode=kfold", f"split.folds={folds}",
        f"split.fold={fold}", f"split.seed={split_seed}", f"seed={run_seed}",
    ])


# --------------------------------------------------------------------------- k-fold splits


def test_kfold_keeps_lesions_whole_and_tests_every_image_once() -> None:
    data = _grouped_set()
    folds = 5
    groups = np.asarray(data.groups)
    tested = []
    for fold in range(folds):
        train, val, test = kfold_group_split(data, folds, fold, val_per_class=3, max_holdout_fraction=0.5, seed=7)
        parts = {"train": set(train.tolist()), "val": set(val.tolist()), "test": set(test.tolist())}
        assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"])
        assert not (parts["val"] & parts["test"])  # val is drawn inside the training folds
        assert len(train) + len(val) + len(test) == len(data)
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):  # no lesion on two sides
            assert not set(groups[list(parts[a])]) & set(groups[list(parts[b])])
        assert len(val) > 0 and np.bincount(data.labels.numpy()[val], minlength=3).min() > 0
        tested.extend(test.tolist())
    assert sorted(tested) == list(range(len(data)))  # every image is tested exactly once
    fold_of = kfold_assignment(data, folds, seed=7)
    for g in set(groups.tolist()):
        assert len(set(fold_of[groups == g].tolist())) == 1  # a lesion never spans two folds
    for c in range(3):  # stratified: every fold tests every class
        assert all(((fold_of == f) & (data.labels.numpy() == c)).any() for f in range(folds))


def test_kfold_depends_on_split_seed_only() -> None:
    data = _grouped_set()
    a = kfold_group_split(data, 4, 2, 3, 0.5, seed=11)
    b = kfold_group_split(data, 4, 2, 3, 0.5, seed=11)
    c = kfold_group_split(data, 4, 2, 3, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])
    # through the config: the run seed does not move the split, split.seed does
    s0, s1 = build_splits(_kfold_cfg(1, run_seed=0)), build_splits(_kfold_cfg(1, run_seed=5))
    s2 = build_splits(_kfold_cfg(1, split_seed=3))
    assert s0.test.ids == s1.test.ids and s0.val.ids == s1.val.ids and s0.train.ids == s1.train.ids
    assert s0.test.ids != s2.test.ids


def test_kfold_on_synthetic_pools_its_splits_and_covers_them() -> None:
    tested: list[str] = []
    for fold in range(3):
        splits = build_splits(_kfold_cfg(fold))
        assert splits.info["split_mode"].startswith("kfold (fold")
        assert not set(splits.val.ids) & set(splits.test.ids)
        assert not set(splits.train.ids) & (set(splits.val.ids) | set(splits.test.ids))
        tested += splits.test.ids
    plain = build_splits(load_config(None, ["data.kind=synthetic", "data.image_size=16", "data.num_classes=3",
                                            "data.max_per_class=12", "split.val_per_class=2",
                                            "split.test_per_class=3"]))
    pool = set(plain.train.ids) | set(plain.val.ids) | set(plain.test.ids)
    assert len(tested) == len(set(tested)) and set(tested) == pool  # every pooled image tested once


def test_kfold_bad_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="split.folds"):
        load_config(None, ["split.mode=kfold", "split.folds=1"])
    with pytest.raises(ConfigError, match="split.fold"):
        load_config(None, ["split.mode=kfold", "split.folds=3", "split.fold=3"])
    with pytest.raises(ConfigError, match="split.fold"):
        load_config(None, ["split.mode=kfold", "split.fold=-1"])
    with pytest.raises(ValueError, match="split.folds=8 .*'c' \\(7 groups\\)"):
        kfold_assignment(_grouped_set(), 8, seed=0)


# --------------------------------------------------------------------------- metrics and bootstrap


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 80)
    p = np.where(rng.random(80) < 0.6, y, rng.integers(0, 4, 80))
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))
    recall = [np.mean(p[y == c] == c) for c in (1, 3)]
    assert mean_recall(y, p, [1, 3]) == pytest.approx(np.mean(recall))


def _reference_bootstrap(y, ref, var, n_boot, seed, classes=None):
    """Direct loop over resamples: the module's documented draw order, the metric recomputed per resample
    from the resampled images (no multiplicity counts; balanced accuracy checked against sklearn elsewhere)."""
    rng = np.random.default_rng(seed)
    draws = {c: rng.integers(0, int((y == c).sum()), size=(n_boot, int((y == c).sum()))) for c in np.unique(y)}
    members = {c: np.flatnonzero(y == c) for c in np.unique(y)}

    def metric(yy, pp):
        return np.mean([np.mean(pp[yy == c] == c) for c in (np.unique(yy) if classes is None else classes)])

    stats = []
    for b in range(n_boot):
        idx = np.concatenate([members[c][draws[c][b]] for c in np.unique(y)])
        diffs = [metric(y[idx], var[s][idx]) - metric(y[idx], ref[s][idx]) for s in range(len(ref))]
        stats.append(np.mean(diffs))
    return np.percentile(stats, [2.5, 97.5])


@pytest.mark.parametrize("classes", [None, [2, 3]])
def test_paired_bootstrap_matches_a_direct_loop(classes) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [20, 12, 6, 5])
    ref = np.stack([np.where(rng.random(len(y)) < 0.55, y, rng.integers(0, 4, len(y))) for _ in range(2)])
    var = np.stack([np.where(rng.random(len(y)) < 0.65, y, rng.integers(0, 4, len(y))) for _ in range(2)])
    result = paired_bootstrap(y, ref, var, classes=classes, n_boot=300, seed=5)
    low, high = _reference_bootstrap(y, ref, var, 300, 5, classes)
    assert result["ci95_low"] == pytest.approx(low, abs=1e-12)
    assert result["ci95_high"] == pytest.approx(high, abs=1e-12)
    metric = (lambda a: balanced_accuracy_score(y, a)) if classes is None else (lambda a: mean_recall(y, a, classes))
    per_seed = [metric(var[s]) - metric(ref[s]) for s in range(2)]
    assert result["per_seed"] == pytest.approx(per_seed)
    assert result["mean_diff"] == pytest.approx(np.mean(per_seed))
    assert low < result["mean_diff"] < high


def test_paired_bootstrap_clear_win_and_identical_predictions() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    good = np.where(rng.random(len(y)) < 0.9, y, (y + 1) % 3)
    bad = np.where(rng.random(len(y)) < 0.4, y, (y + 1) % 3)
    win = paired_bootstrap(y, bad, good, n_boot=500)
    assert win["ci95_low"] > 0 and win["mean_diff"] > 0.3
    assert paired_bootstrap(y, good, bad, n_boot=500)["ci95_high"] < 0
    same = paired_bootstrap(y, np.stack([bad, good]), np.stack([bad, good]), classes=[2], n_boot=500)
    assert same["mean_diff"] == same["ci95_low"] == same["ci95_high"] == 0.0 and same["per_seed"] == [0.0, 0.0]


def test_seed_and_image_interval_matches_the_formula() -> None:
    """d̄ ± t(0.975, S−1) · sqrt(sd²/S + se²) on hand-made differences (t for 2 df = 4.302653)."""
    out = seed_and_image_interval([0.05, -0.01, 0.02], image_se=0.01)
    sd = float(np.std([0.05, -0.01, 0.02], ddof=1))
    half = 4.302652729911275 * np.sqrt(sd**2 / 3 + 0.01**2)
    assert out["seed_sd"] == pytest.approx(sd)
    assert out["ci95_total_low"] == pytest.approx(0.02 - half) and out["ci95_total_high"] == pytest.approx(0.02 + half)
    assert seed_and_image_interval([0.03], 0.01) == {"seed_sd": None, "image_se": 0.01, "ci95_total_low": None,
                                                     "ci95_total_high": None}
    with pytest.raises(ValueError, match="image_se must be >= 0"):
        seed_and_image_interval([0.1, 0.2], -1.0)


def test_seed_noise_widens_an_image_only_verdict() -> None:
    """Seeds that disagree in sign: the image interval excludes 0, the seeds-and-images one does not.

    This is the demo's control case (the same method through two code paths looked resolved on
    test images alone); with seeds that agree the total interval stays clear of 0.
    """
    y = np.repeat(np.arange(3), 60)
    rng = np.random.default_rng(3)
    base = np.where(rng.random(len(y)) < 0.6, y, (y + 1) % 3)

    def better_by(k: int) -> np.ndarray:  # the same errors as base, minus k fixed ones per class
        out = base.copy()
        for c in range(3):
            wrong = np.flatnonzero((y == c) & (base != y))[:k]
            out[wrong] = c
        return out

    ref = np.stack([base, base, base])
    noisy = np.stack([better_by(18), better_by(1), better_by(18)])  # +30, +1.7, +30 points
    result = paired_bootstrap(y, ref, noisy, n_boot=500)
    assert result["ci95_low"] > 0  # test images alone: "resolved"
    assert result["ci95_total_low"] < 0 < result["ci95_total_high"]  # with the seed spread: not
    steady = np.stack([better_by(18), better_by(17), better_by(18)])
    clear = paired_bootstrap(y, ref, steady, n_boot=500)
    assert clear["ci95_total_low"] > 0


def test_prediction_files_pool_and_align(tmp_path: Path) -> None:
    probs = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    path = save_predictions(tmp_path / "p.npz", ["a", "b", "c", "d"], np.array([0, 1, 2, 2]), probs, ["x", "y", "z"])
    back = load_predictions(tmp_path / "p.npz")
    assert back.ids.tolist() == ["a", "b", "c", "d"] and back.predicted.tolist() == [0, 1, 2, 1]
    assert path.name == "p.npz"
    other = Predictions(["e"], [0], probs[:1], ["x", "y", "z"])
    pooled = pool_predictions([back, other])
    assert len(pooled) == 5
    with pytest.raises(ValueError, match="two folds"):
        pool_predictions([back, back])
    shuffled = Predictions(back.ids[::-1], back.labels[::-1], back.probs[::-1], back.class_names)
    assert align_predictions(back, shuffled).ids.tolist() == back.ids.tolist()
    with pytest.raises(ValueError, match="same images"):
        align_predictions(back, pooled)


def test_fold_t_interval_formula_and_kfold_paired_statistics() -> None:
    """Corrected resampled t (Nadeau-Bengio): centre ± t(0.975, J−1)·sd·sqrt(1/J + 1/(k−1)); k-fold
    paired statistics read it from the per-fold differences."""
    from simulations.benchmark_methods import paired_statistics

    diffs = [0.04, 0.01, 0.03, -0.02, 0.05]
    out = fold_t_interval(diffs, center=0.02, folds=5)
    half = 2.7764451051977987 * np.std(diffs, ddof=1) * np.sqrt(1 / 5 + 1 / 4)
    assert out["ci95_total_low"] == pytest.approx(0.02 - half) and out["ci95_total_high"] == pytest.approx(0.02 + half)
    with pytest.raises(ValueError, match=">= 2 per-fold"):
        fold_t_interval([0.1], 0.1, 5)

    rng = np.random.default_rng(4)
    names = ["a", "b", "c"]
    parts: dict[str, list[Predictions]] = {"ref": [], "new": []}
    for fold in range(4):  # each fold its own 30 test images
        y = np.repeat(np.arange(3), 10)
        ids = [f"f{fold}-{i}" for i in range(len(y))]
        for method, acc in (("ref", 0.5), ("new", 0.8)):
            pred = np.where(rng.random(len(y)) < acc, y, (y + 1) % 3)
            parts[method].append(Predictions(np.asarray(ids), y, np.eye(3)[pred], names))
    result = paired_statistics({("ref", 0): parts["ref"], ("new", 0): parts["new"]}, ["ref", "new"], [0], "ref",
                               [2], n_boot=200)
    pair = result["paired"]["new"]["balanced_accuracy"]
    assert pair["interval"] == "folds" and len(pair["per_fold"]) == 4
    expected = [balanced_accuracy(p.labels, q.predicted) - balanced_accuracy(p.labels, p.predicted)
                for p, q in zip(parts["ref"], parts["new"])]
    assert pair["per_fold"] == pytest.approx(expected)
    direct = fold_t_interval(expected, pair["mean_diff"], 4)
    assert pair["ci95_total_low"] == pytest.approx(direct["ci95_total_low"])
    assert pair["within_noise"] == (pair["ci95_total_low"] <= 0 <= pair["ci95_total_high"]
                                    or pair["ci95_low"] <= 0 <= pair["ci95_high"])
    assert result["n_test"] == 120  # pooled: every image once


def test_a_fold_interval_narrower_than_the_image_noise_does_not_resolve_a_difference() -> None:
    """Two folds that happen to agree give a fold interval that excludes 0 while the test-image
    bootstrap does not: not resolved. Both excluding 0 is resolved; the seeds interval is unchanged."""
    from simulations.benchmark_methods import noise_verdict

    lucky = {"ci95_low": -0.032, "ci95_high": 0.005, "ci95_total_low": -0.019, "ci95_total_high": -0.009,
             "per_fold": [-0.014, -0.014]}
    assert noise_verdict(lucky) == {"within_noise": True, "within_image_noise": True, "interval": "folds"}
    resolved = {**lucky, "ci95_high": -0.002}
    assert noise_verdict(resolved)["within_noise"] is False
    wide = {**resolved, "ci95_total_high": 0.01}
    assert noise_verdict(wide)["within_noise"] is True
    seeds = {k: v for k, v in lucky.items() if k != "per_fold"}
    assert noise_verdict(seeds) == {"within_noise": False, "within_image_noise": True, "interval": "seeds+images"}
