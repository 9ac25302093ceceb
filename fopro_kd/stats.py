"""Paired statistics over test predictions: which method is better, and is it more than noise?

With 30-40 test images per rare class one image moves a class's recall by ~3 points, so a
difference between two runs says little on its own. This module turns saved test
predictions (``predictions_test.npz``, written by every single-site and federated run) into

* the metrics themselves from ``(labels, predicted)``: :func:`balanced_accuracy` and
  :func:`mean_recall` of a class subset (the rare classes);
* a **paired, class-stratified bootstrap over test images** (:func:`paired_bootstrap`): the
  same resample of test images is applied to both methods and to every seed jointly, and the
  statistic is the mean over seeds of ``metric(variant) - metric(reference)``. Pairing removes
  the test-set sampling noise the two methods share (both are scored on the same images), so
  the interval measures whether the *difference* is resolved, not each score;
* a **seeds-and-images interval** (:func:`seed_and_image_interval`, part of
  :func:`paired_bootstrap`'s result from two seeds on): the bootstrap above covers only which
  images are in the test set, given the trained models; the seed-to-seed spread of the paired
  difference (training noise: initialisation and batch order) is added as a second variance
  term with a Student-t quantile, so a difference is called resolved only when it is larger
  than both noises;
* pooled out-of-fold predictions for k-fold cross-validation (:func:`pool_predictions`), and
  for k-fold the corrected resampled t interval over the per-fold differences
  (:func:`fold_t_interval`), which plays the seeds-and-images interval's role there.

No Flower or torch imports: the report and the benchmark script use it on plain arrays.

Bootstrap protocol (what :func:`stratified_resamples` draws, so a result can be reproduced):
``rng = numpy.random.default_rng(seed)``; for every class ``c`` present in ``labels``, in
increasing class order, one call ``rng.integers(0, n_c, size=(B, n_c))`` picks, for each of
the ``B`` resamples, ``n_c`` positions with replacement among the class's test images (taken
in increasing index order). Stratifying keeps every class's test count fixed, so each
resample's balanced accuracy has every class present, like the real test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "LAST_PREDICTIONS_FILE",
    "MODEL_CHOICES",
    "PREDICTIONS_FILE",
    "Predictions",
    "align_predictions",
    "balanced_accuracy",
    "fold_t_interval",
    "load_predictions",
    "mean_recall",
    "paired_bootstrap",
    "per_class_recall",
    "pool_predictions",
    "rarest_classes",
    "save_predictions",
    "seed_and_image_interval",
    "stratified_resamples",
]

PREDICTIONS_FILE = "predictions_test.npz"
"""Name of the test-prediction file in a run directory: the model selected on the validation split."""
LAST_PREDICTIONS_FILE = "predictions_test_last.npz"
"""The same for the model of the last epoch (single site) or round (federated): a fixed budget with no
selection, whose noise on a 15-image-per-class validation split is several points per run (docs/results.md)."""
MODEL_CHOICES = {"selected": PREDICTIONS_FILE, "last": LAST_PREDICTIONS_FILE}
"""``--model`` of the comparison tools: which of a run's two prediction files is compared."""
DEFAULT_BOOTSTRAP = 2000
"""Bootstrap resamples: the Monte-Carlo error of a 95% percentile bound at B = 2000 is ~0.1 point here."""


# --------------------------------------------------------------------------- prediction files


@dataclass
class Predictions:
    """Test predictions of one run: image ids, true labels and class probabilities (N, C)."""

    ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids).astype(str)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.probs = np.asarray(self.probs, dtype=np.float32)
        n = len(self.ids)
        if self.labels.shape != (n,) or self.probs.ndim != 2 or self.probs.shape[0] != n:
            raise ValueError(
                f"predictions need ids (N,), labels (N,) and probs (N, C); got {self.ids.shape}, "
                f"{self.labels.shape}, {self.probs.shape}"
            )
        if self.probs.shape[1] != len(self.class_names):
            raise ValueError(f"probs have {self.probs.shape[1]} columns for {len(self.class_names)} classes")
        if len(set(self.ids.tolist())) != n:
            raise ValueError("prediction ids must be unique (one row per test image)")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def predicted(self) -> np.ndarray:
        """Predicted class per image (argmax of the probabilities)."""
        return self.probs.argmax(axis=1).astype(np.int64)


def save_predictions(
    path: str | Path, ids: Sequence[str], labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> Path:
    """Write ``ids``, ``labels``, ``probs`` (float32) and ``class_names`` to an ``.npz`` file."""
    pred = Predictions(np.asarray(list(ids)), labels, probs, list(class_names))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:  # a file handle: np.savez would append ".npz" to other names
        np.savez_compressed(handle, ids=pred.ids, labels=pred.labels, probs=pred.probs,
                            class_names=np.asarray(pred.class_names, dtype=str))
    return path


def load_predictions(path: str | Path, model: str = "selected") -> Predictions:
    """Read a file written by :func:`save_predictions`; for a run directory, ``model`` picks the file
    (:data:`MODEL_CHOICES`: the validation-selected model or the last epoch's / round's)."""
    if model not in MODEL_CHOICES:
        raise ValueError(f"model {model!r}: choose from {sorted(MODEL_CHOICES)}")
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_CHOICES[model]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no test predictions (runs write {PREDICTIONS_FILE} after the final test, "
                                f"and {LAST_PREDICTIONS_FILE} for the last epoch or round; older runs have only the first)")
    with np.load(path, allow_pickle=False) as data:
        return Predictions(data["ids"], data["labels"], data["probs"], [str(c) for c in data["class_names"]])


def pool_predictions(parts: Sequence[Predictions]) -> Predictions:
    """Concatenate the test predictions of the folds of one method and seed (out-of-fold pooling).

    Raises ``ValueError`` when the folds disagree on the classes or one image is tested twice
    (the folds were not from one k-fold split).
    """
    if not parts:
        raise ValueError("pool_predictions needs at least one fold")
    names = parts[0].class_names
    for p in parts[1:]:
        if p.class_names != names:
            raise ValueError(f"folds have different classes: {names} vs {p.class_names}")
    pooled = np.concatenate([p.ids for p in parts])
    if len(set(pooled.tolist())) != len(pooled):
        raise ValueError("an image is in the test set of two folds: these folds are not one k-fold split")
    return Predictions(pooled, np.concatenate([p.labels for p in parts]),
                       np.concatenate([p.probs for p in parts]), list(names))


def align_predictions(reference: Predictions, other: Predictions) -> Predictions:
    """``other`` reordered to ``reference``'s image order; ``ValueError`` unless both hold the same test images."""
    if other.class_names != reference.class_names:
        raise ValueError(f"different classes: {reference.class_names} vs {other.class_names}")
    if len(other) != len(reference) or set(other.ids.tolist()) != set(reference.ids.tolist()):
        raise ValueError("the runs were not tested on the same images (test image ids differ)")
    position = {image_id: i for i, image_id in enumerate(other.ids.tolist())}
    order = np.asarray([position[i] for i in reference.ids.tolist()], dtype=np.int64)
    aligned = Predictions(other.ids[order], other.labels[order], other.probs[order], list(other.class_names))
    if not np.array_equal(aligned.labels, reference.labels):
        raise ValueError("the runs give different labels to the same test image ids")
    return aligned


# --------------------------------------------------------------------------- metrics


def per_class_recall(labels: np.ndarray, predicted: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Recall of every class (NaN for a class absent from ``labels``)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    k = int(num_classes if num_classes is not None else max(labels.max(initial=-1), predicted.max(initial=-1)) + 1)
    total = np.bincount(labels, minlength=k).astype(np.float64)
    correct = np.bincount(labels[labels == predicted], minlength=k).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (as :func:`fopro_kd.metrics.compute_metrics`)."""
    recall = per_class_recall(labels, predicted)
    return float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")


def mean_recall(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[int]) -> float:
    """Mean recall of ``classes`` (e.g. the rare ones); classes absent from ``labels`` are left out."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("mean_recall needs at least one class")
    k = max(int(np.max(labels, initial=-1)), int(np.max(predicted, initial=-1)), max(classes)) + 1
    recall = per_class_recall(labels, predicted, k)[classes]
    return float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")


def rarest_classes(train_counts: Sequence[int], k: int = 3) -> list[int]:
    """The ``k`` classes with the fewest training images (ties: lower index first), rarest first."""
    counts = np.asarray(train_counts, dtype=np.int64)
    return [int(c) for c in np.argsort(counts, kind="stable")[: min(k, len(counts))]]


# --------------------------------------------------------------------------- paired bootstrap


def stratified_resamples(labels: np.ndarray, n_boot: int, seed: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per present class ``c`` (increasing): ``(c, members, draws)``, ``draws`` of shape (n_boot, n_c).

    ``members[draws[b]]`` are the test positions of class ``c`` in resample ``b`` (drawn with
    replacement). The RNG protocol is the one in the module docstring.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out.append((int(c), members, rng.integers(0, len(members), size=(n_boot, len(members)))))
    return out


def _as_runs(predicted: np.ndarray | Sequence[np.ndarray], n: int, name: str) -> np.ndarray:
    runs = np.asarray(predicted, dtype=np.int64)
    if runs.ndim == 1:
        runs = runs[None, :]
    if runs.ndim != 2 or runs.shape[1] != n:
        raise ValueError(f"{name} must be predicted labels of shape (N,) or (seeds, N) with N={n}, got {runs.shape}")
    return runs


def paired_bootstrap(
    labels: np.ndarray,
    reference: np.ndarray | Sequence[np.ndarray],
    variant: np.ndarray | Sequence[np.ndarray],
    classes: Sequence[int] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired, class-stratified bootstrap of ``mean over seeds (metric(variant) - metric(reference))``.

    Parameters
    ----------
    labels : (N,) true labels of the shared test images.
    reference, variant : predicted labels, (N,) for one seed or (S, N) for S seeds; row ``s``
        of both is seed ``s`` (the pairing), every row on the same images in the same order.
    classes : ``None``: the metric is balanced accuracy (classes present in ``labels``);
        a list: the mean recall of these classes (e.g. the rare ones).
    n_boot : resamples ``B``.
    seed : the bootstrap RNG seed (see the module docstring for the draw order).

    Returns
    -------
    dict
        ``mean_diff`` (the statistic on the real test set), ``ci95_low`` / ``ci95_high`` (2.5 /
        97.5 percentiles of the B resampled statistics: test-image noise only), ``per_seed``
        (each seed's paired difference on the real test set), ``reference`` / ``variant``
        (mean metric over seeds), ``n_boot``, ``n_test``, and from two seeds on
        ``seed_sd``, ``image_se``, ``ci95_total_low`` / ``ci95_total_high`` (seed and image
        noise together, :func:`seed_and_image_interval`; ``None`` with one seed).
        Identical predictions give exactly 0 everywhere.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    ref = _as_runs(reference, n, "reference")
    var = _as_runs(variant, n, "variant")
    if ref.shape != var.shape:
        raise ValueError(f"reference and variant need the same seeds: shapes {ref.shape} vs {var.shape}")
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one test image")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    present = np.unique(labels)
    chosen = present if classes is None else np.asarray([c for c in classes if c in set(present.tolist())])
    if len(chosen) == 0:
        raise ValueError(f"none of the classes {list(classes or [])} is in the test set")
    hits = np.stack([ref == labels, var == labels])  # (2, S, N)

    def metric_of_recalls(recall: np.ndarray) -> np.ndarray:  # (..., present classes) -> (...)
        index = np.searchsorted(present, chosen)
        return recall[..., index].mean(axis=-1)

    # statistic on the real test set
    recall = np.stack([hits[..., labels == c].mean(axis=-1) for c in present], axis=-1)  # (2, S, K)
    real = metric_of_recalls(recall)  # (2, S)
    per_seed = real[1] - real[0]
    # B resamples, shared by both methods and all seeds
    boot_recall = np.empty((n_boot, 2, ref.shape[0], len(present)), dtype=np.float64)
    for k, (c, members, draws) in enumerate(stratified_resamples(labels, n_boot, seed)):
        class_hits = hits[..., members].astype(np.float64)  # (2, S, n_c)
        # correct count of each resample = sum over the class's images of multiplicity x hit
        sums = np.einsum("msn,bn->bms", class_hits, _draw_counts(draws, len(members)))
        boot_recall[..., k] = sums / len(members)
    boot = metric_of_recalls(boot_recall)  # (B, 2, S)
    stat = (boot[:, 1] - boot[:, 0]).mean(axis=1)
    low, high = np.percentile(stat, [2.5, 97.5])
    image_se = float(np.std(stat, ddof=1)) if n_boot > 1 else 0.0
    return {
        "mean_diff": float(per_seed.mean()),
        "ci95_low": float(low),
        "ci95_high": float(high),
        "per_seed": [float(d) for d in per_seed],
        "reference": float(real[0].mean()),
        "variant": float(real[1].mean()),
        "n_boot": int(n_boot),
        "n_test": int(n),
        **seed_and_image_interval(per_seed, image_se),
    }


def seed_and_image_interval(per_seed: Sequence[float] | np.ndarray, image_se: float) -> dict[str, float | None]:
    """95% interval of the mean paired difference with training noise *and* test-image noise.

    Why a second interval: :func:`paired_bootstrap` resamples test images given the trained
    models, so two runs of the *same* method with different seeds can look "resolved" (on the
    demo, EKD with cached targets and EKD through the identity-prompt code path differed by
    +3.6 points with an image interval excluding 0). Model: seed ``s``'s paired difference is
    ``d_s = Δ + e_s + τ``, with ``e_s`` the training noise (independent across seeds, variance
    σ²) and ``τ`` the test-sampling error shared by all seeds (same test images). The mean
    ``d̄`` has variance ``σ²/S + Var(τ̄)``; σ is estimated by the sample standard deviation of
    the ``d_s`` (ddof 1) and ``Var(τ̄)`` by ``image_se²``, the variance of the bootstrap
    statistic. The interval is

        d̄ ± t_{0.975, S−1} · sqrt(sd(d)² / S + image_se²)

    with the Student-t quantile for S − 1 degrees of freedom (S = 3: 4.30), conservative
    because the image term is known far better than the seed term. ``sd(d)`` also contains the
    per-seed part of the image noise, so the sum slightly double-counts it: again on the safe
    side. With one seed there is no estimate of σ and every field is ``None``.

    Returns ``seed_sd``, ``image_se``, ``ci95_total_low``, ``ci95_total_high``.
    """
    diffs = np.asarray(per_seed, dtype=np.float64)
    if diffs.ndim != 1 or len(diffs) == 0:
        raise ValueError(f"per_seed must be a non-empty 1-D sequence of differences, got shape {diffs.shape}")
    if not image_se >= 0:
        raise ValueError(f"image_se must be >= 0, got {image_se!r}")
    if len(diffs) < 2:
        return {"seed_sd": None, "image_se": float(image_se), "ci95_total_low": None, "ci95_total_high": None}
    seed_sd = float(np.std(diffs, ddof=1))
    low, high = _t_bounds(float(diffs.mean()), math.sqrt(seed_sd**2 / len(diffs) + image_se**2), len(diffs) - 1)
    return {"seed_sd": seed_sd, "image_se": float(image_se), "ci95_total_low": low, "ci95_total_high": high}


def _t_bounds(center: float, se: float, dof: int) -> tuple[float, float]:
    """``center ± t(0.975, dof) · se``: the Student-t 95% bounds both seed-aware intervals use."""
    half = float(scipy_stats.t.ppf(0.975, dof)) * se
    return center - half, center + half


def _draw_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(B, n) multiplicity of every position in each resample (a position drawn twice counts twice)."""
    flat = (np.arange(draws.shape[0], dtype=np.int64)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=draws.shape[0] * n).reshape(draws.shape[0], n).astype(np.float64)


def fold_t_interval(per_fold: Sequence[float] | np.ndarray, center: float, folds: int) -> dict[str, float | None]:
    """95% interval of a k-fold paired difference from its per-fold spread (Nadeau & Bengio, 2003).

    With k-fold cross-validation every fold is a separate training run tested on its own
    images, so the per-fold paired differences ``d_j`` (J = folds × repeats of them) carry
    training noise *and* test-image noise. Their plain standard error understates the
    uncertainty because the training sets of two folds overlap (each pair shares k − 2 of the
    k folds); the corrected resampled t statistic inflates the variance to
    ``(1/J + n_test/n_train) · sd(d)²`` with ``n_test/n_train = 1/(k − 1)``:

        center ± t_{0.975, J−1} · sd(d) · sqrt(1/J + 1/(k − 1))

    (``center`` is the difference on the pooled out-of-fold predictions, which weighs every
    test image once; the validation part drawn inside the training folds makes the true
    ``n_train`` slightly smaller, so the ratio is slightly optimistic, by < 10% for HAM10000).

    Returns ``seed_sd`` (here: sd of the per-fold differences), ``image_se`` (``None``: the
    fold differences already hold the test noise), ``ci95_total_low``, ``ci95_total_high``.
    """
    diffs = np.asarray(per_fold, dtype=np.float64)
    if diffs.ndim != 1 or len(diffs) < 2:
        raise ValueError(f"fold_t_interval needs >= 2 per-fold differences, got shape {diffs.shape}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    sd = float(np.std(diffs, ddof=1))
    low, high = _t_bounds(float(center), sd * math.sqrt(1.0 / len(diffs) + 1.0 / (folds - 1)), len(diffs) - 1)
    return {"seed_sd": sd, "image_se": None, "ci95_total_low": low, "ci95_total_high": high}
