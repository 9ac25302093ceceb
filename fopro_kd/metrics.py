"""Evaluation metrics for long-tailed classification (method.md §7).

The primary metric is **balanced accuracy** (mean per-class recall over the classes present
in the evaluated set). Next to it: per-class recall, many/medium/few-shot recall (groups
fixed by the training counts and :class:`fopro_kd.config.MetricsConfig`), the ``tail`` group
(the k rarest training classes, :func:`tail_classes`: never empty, unlike few-shot on HAM10000
where no class has fewer than 20 training images), accuracy,
macro-F1, Matthews correlation, Cohen's kappa, macro one-vs-rest ROC AUC and the confusion
matrix. All values are plain python types, so the result can be written with ``json.dump``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
)

from fopro_kd.config import MetricsConfig

__all__ = ["SHOT_GROUPS", "shot_groups", "tail_classes", "default_tail_size", "compute_metrics", "format_summary"]

SHOT_GROUPS: tuple[str, str, str] = ("many", "medium", "few")


def shot_groups(
    train_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, list[int]]:
    """Split class indices into many / medium / few-shot groups by their training counts.

    ``many``: ``n_c > many_threshold``; ``medium``: ``few_threshold <= n_c <= many_threshold``;
    ``few``: ``n_c < few_threshold`` (the usual ImageNet-LT convention with 100 / 20).

    Parameters
    ----------
    train_counts : sequence of int
        Training samples per class.
    many_threshold, few_threshold : int
        Group limits; ``few_threshold <= many_threshold``.

    Returns
    -------
    dict[str, list[int]]
        ``{"many": [...], "medium": [...], "few": [...]}`` class indices in increasing order.

    Examples
    --------
    >>> shot_groups([500, 100, 20, 19])
    {'many': [0], 'medium': [1, 2], 'few': [3]}
    """
    if few_threshold > many_threshold:
        raise ValueError(
            f"few_threshold ({few_threshold}) must be <= many_threshold ({many_threshold}); "
            "check 'metrics.few_shot_threshold' and 'metrics.many_shot_threshold'"
        )
    groups: dict[str, list[int]] = {name: [] for name in SHOT_GROUPS}
    for index, count in enumerate(train_counts):
        if count > many_threshold:
            groups["many"].append(index)
        elif count < few_threshold:
            groups["few"].append(index)
        else:
            groups["medium"].append(index)
    return groups


def default_tail_size(num_classes: int) -> int:
    """k of the ``tail`` group when ``metrics.tail_classes`` is null: min(3, C - 1) for C <= 10, else ceil(C / 4).

    Three classes is the smallest group whose mean recall is not one class's recall, and C - 1
    keeps the tail a strict subset (the tail of a two-class task is its rarer class). With many
    classes a fixed 3 would be a sliver, so the rarest quarter is taken instead.

    >>> default_tail_size(2), default_tail_size(7), default_tail_size(10), default_tail_size(40)
    (1, 3, 3, 10)
    """
    if num_classes <= 10:
        return max(1, min(3, num_classes - 1))
    return int(math.ceil(num_classes / 4))


def tail_classes(train_counts: Sequence[int], k: int | None = None) -> list[int]:
    """Indices of the ``k`` rarest training classes, rarest first (ties: lower index first).

    ``k`` None uses :func:`default_tail_size`; ``k`` is capped at the number of classes. The same
    rule as :func:`fopro_kd.stats.rarest_classes`, so the report's paired "rare" difference and
    the ``tail`` metric name the same classes.

    >>> tail_classes([500, 100, 20, 19, 60])
    [3, 2, 4]
    >>> tail_classes([5, 5, 9], k=1)
    [0]
    """
    counts = np.asarray(list(train_counts), dtype=np.int64)
    if k is None:
        k = default_tail_size(len(counts))
    if k < 1:
        raise ValueError(f"the tail group needs k >= 1 classes, got {k}; check 'metrics.tail_classes'")
    return [int(c) for c in np.argsort(counts, kind="stable")[: min(k, len(counts))]]


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _validate(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], train_counts: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    num_classes = len(class_names)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {probs.shape}")
    if y_true.ndim != 1 or y_true.shape[0] != probs.shape[0]:
        raise ValueError(f"y_true must have shape ({probs.shape[0]},) to match probs {probs.shape}, got {y_true.shape}")
    if probs.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty set (N = 0)")
    if probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} columns but there are {num_classes} class_names {class_names}")
    if len(train_counts) != num_classes:
        raise ValueError(f"train_counts has {len(train_counts)} entries but there are {num_classes} class_names")
    if len(set(class_names)) != num_classes:
        raise ValueError(f"class_names must be unique, got {class_names}")
    if np.isnan(probs).any():
        rows = np.flatnonzero(np.isnan(probs).any(axis=1))
        raise ValueError(f"probs contains NaN in {rows.size} row(s) (first rows: {rows[:5].tolist()}); did training diverge?")
    if not np.isfinite(probs).all():
        raise ValueError("probs contains inf; pass softmax probabilities, not logits")
    if (probs < 0).any():
        raise ValueError(f"probs contains negative values (min {probs.min():.4g}); pass softmax probabilities, not logits")
    if not np.issubdtype(y_true.dtype, np.integer):
        if np.issubdtype(y_true.dtype, np.floating) and np.all(np.equal(np.mod(y_true, 1), 0)):
            y_true = y_true.astype(np.int64)
        else:
            raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        bad = sorted(set(y_true[(y_true < 0) | (y_true >= num_classes)].tolist()))
        raise ValueError(f"y_true contains labels {bad[:10]} outside range(0, {num_classes})")
    return y_true.astype(np.int64), probs


def _macro_ovr_auc(y_true: np.ndarray, probs: np.ndarray, present: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC AUC over the present classes, on row-renormalised probabilities.

    Equals ``roc_auc_score(y_true, probs, multi_class="ovr", average="macro")`` when every
    class is present; absent classes (no positives) are left out instead of making AUC
    undefined.
    """
    if present.size < 2:
        return None
    sums = probs.sum(axis=1, keepdims=True)
    if np.allclose(sums, 1.0, rtol=0.0, atol=1e-6):
        scores = probs  # already probabilities: dividing by ~1 would only break ties by rounding noise
    else:
        # A row of zeros carries no ranking information: treat it as uniform. Rounding keeps
        # tied scores tied after the division.
        scores = np.where(sums > 0, probs / np.where(sums > 0, sums, 1.0), 1.0 / probs.shape[1])
        scores = np.round(scores, 12)
    aucs = [roc_auc_score(y_true == c, scores[:, c]) for c in present]
    return _finite_or_none(np.mean(aucs))


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    train_counts: Sequence[int],
    cfg: MetricsConfig | None = None,
) -> dict[str, Any]:
    """All evaluation metrics of one set of predictions (method.md §7).

    Predictions are ``argmax(probs)``. Metrics that average over classes use the classes
    *present* in ``y_true`` (a class without test samples has no recall).

    Parameters
    ----------
    y_true : numpy.ndarray (N,)
        True class indices in ``range(C)``.
    probs : numpy.ndarray (N, C)
        Predicted class probabilities (rows are renormalised for AUC). NaN raises.
    class_names : list[str]
        Names of all C classes (unique).
    train_counts : sequence of int
        Training samples per class, which define the shot groups.
    cfg : MetricsConfig, optional
        Shot-group thresholds; defaults to ``MetricsConfig()`` (100 / 20).

    Returns
    -------
    dict
        ``balanced_accuracy``, ``accuracy``, ``per_class_recall`` ({name: recall or None}),
        ``many_shot``, ``medium_shot``, ``few_shot`` (mean recall over the group's present
        classes, None when there are none), ``tail`` (mean recall of ``tail_classes``, the names
        of the k rarest training classes, :func:`tail_classes`), ``macro_f1`` (over present classes), ``mcc``,
        ``kappa``, ``auc`` (macro OvR, None with fewer than 2 present classes), ``confusion_matrix``
        (rows = true, columns = predicted, ``labels=range(C)``), ``num_samples``,
        ``shot_groups`` ({group: [names]}) and ``train_counts`` ({name: count}). Undefined
        values are None; all numbers are python ``float`` / ``int``.

    Raises
    ------
    ValueError
        Mismatched shapes, labels out of range, NaN / inf / negative probabilities.
    """
    cfg = cfg if cfg is not None else MetricsConfig()
    y_true, probs = _validate(y_true, probs, class_names, train_counts)
    num_classes = len(class_names)
    y_pred = probs.argmax(axis=1)
    labels = list(range(num_classes))
    present = np.unique(y_true)

    cm = confusion_matrix(y_true, y_pred, labels=labels)
    support = cm.sum(axis=1)
    recalls: list[float | None] = [float(cm[c, c] / support[c]) if support[c] > 0 else None for c in labels]

    groups = shot_groups(train_counts, cfg.many_shot_threshold, cfg.few_shot_threshold)
    group_recall = {
        name: _mean_or_none([recalls[c] for c in members if recalls[c] is not None]) for name, members in groups.items()
    }
    tail = tail_classes(train_counts, cfg.tail_classes)

    with warnings.catch_warnings():
        # sklearn warns about predicted-but-absent classes and degenerate (single-class) inputs;
        # those cases are handled explicitly below (values become None when undefined).
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y_true, y_pred)
        macro_f1 = f1_score(y_true, y_pred, labels=present.tolist(), average="macro", zero_division=0)
        mcc = matthews_corrcoef(y_true, y_pred)
        kappa = cohen_kappa_score(y_true, y_pred, labels=labels)
        auc = _macro_ovr_auc(y_true, probs, present)

    return {
        "balanced_accuracy": _finite_or_none(balanced),
        "accuracy": float(np.mean(y_pred == y_true)),
        "per_class_recall": {name: recalls[c] for c, name in enumerate(class_names)},
        "many_shot": group_recall["many"],
        "medium_shot": group_recall["medium"],
        "few_shot": group_recall["few"],
        "tail": _mean_or_none([recalls[c] for c in tail if recalls[c] is not None]),
        "tail_classes": [class_names[c] for c in tail],
        "macro_f1": _finite_or_none(macro_f1),
        "mcc": _finite_or_none(mcc),
        "kappa": _finite_or_none(kappa),
        "auc": auc,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "num_samples": int(y_true.shape[0]),
        "shot_groups": {name: [class_names[c] for c in members] for name, members in groups.items()},
        "train_counts": {name: int(train_counts[c]) for c, name in enumerate(class_names)},
    }


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def format_summary(metrics: dict[str, Any]) -> str:
    """Short multi-line human-readable summary of :func:`compute_metrics` output.

    Shows balanced accuracy, accuracy, many / medium / few-shot and tail recall, macro-F1, MCC, kappa,
    AUC and a per-class recall table sorted by training count (descending).
    """
    lines = [
        f"balanced accuracy: {_fmt(metrics.get('balanced_accuracy'))}"
        f"  (accuracy {_fmt(metrics.get('accuracy'))}, n = {metrics.get('num_samples', '?')})",
        f"many / medium / few-shot: {_fmt(metrics.get('many_shot'))} / {_fmt(metrics.get('medium_shot'))}"
        f" / {_fmt(metrics.get('few_shot'))}"
        + (f"  tail ({', '.join(metrics.get('tail_classes') or [])}): {_fmt(metrics.get('tail'))}"
           if "tail" in metrics else ""),
        f"macro-F1: {_fmt(metrics.get('macro_f1'), False)}  MCC: {_fmt(metrics.get('mcc'), False)}"
        f"  kappa: {_fmt(metrics.get('kappa'), False)}  AUC: {_fmt(metrics.get('auc'), False)}",
    ]
    recalls: dict[str, float | None] = metrics.get("per_class_recall", {}) or {}
    counts: dict[str, int] = metrics.get("train_counts", {}) or {}
    if recalls:
        group_of = {name: group for group, names in (metrics.get("shot_groups") or {}).items() for name in names}
        width = max(len("class"), *(len(name) for name in recalls))
        lines.append(f"{'class':<{width}}  {'train':>7}  {'group':<6}  recall")
        for name in sorted(recalls, key=lambda n: -counts.get(n, 0)):
            count = counts.get(name)
            lines.append(
                f"{name:<{width}}  {count if count is not None else '?':>7}  {group_of.get(name, ''):<6}  "
                f"{_fmt(recalls[name])}"
            )
    return "\n".join(lines)
