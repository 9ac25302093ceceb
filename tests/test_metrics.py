"""Hand-computed metric values, shot groups, absent classes and JSON-safety."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, matthews_corrcoef, roc_auc_score

from fopro_kd.config import MetricsConfig
from fopro_kd.metrics import compute_metrics, format_summary, shot_groups

NAMES = ["a", "b", "c"]
TRAIN_COUNTS = [150, 50, 5]  # many / medium / few with the default 100 / 20 thresholds
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 0, 2, 0])


def _probs(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows 0.1 everywhere + 0.7 on the predicted class (sum 1 for 3 classes)."""
    probs = np.full((pred.size, num_classes), 0.1)
    probs[np.arange(pred.size), pred] += 0.7
    return probs


def _json_roundtrip(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics, allow_nan=False))


def test_shot_groups_thresholds_are_inclusive_for_medium() -> None:
    assert shot_groups([101, 100, 20, 19, 0]) == {"many": [0], "medium": [1, 2], "few": [3, 4]}
    assert shot_groups([10, 5, 3], many_threshold=5, few_threshold=4) == {"many": [0], "medium": [1], "few": [2]}
    with pytest.raises(ValueError, match="few_threshold"):
        shot_groups([1], many_threshold=10, few_threshold=20)


def test_hand_computed_example() -> None:
    # confusion (rows true a, b, c): [[3, 1, 0], [1, 1, 0], [1, 0, 1]]
    m = compute_metrics(Y_TRUE, _probs(Y_PRED, 3), NAMES, TRAIN_COUNTS)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [1, 0, 1]]
    # recall a = 3/4, b = 1/2, c = 1/2; balanced = (0.75 + 0.5 + 0.5) / 3 = 7/12
    assert m["per_class_recall"] == {"a": 0.75, "b": 0.5, "c": 0.5}
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert (m["many_shot"], m["medium_shot"], m["few_shot"]) == (0.75, 0.5, 0.5)
    # F1: a: P 3/5, R 3/4 -> 2/3; b: P 1/2, R 1/2 -> 1/2; c: P 1, R 1/2 -> 2/3; macro = 11/18
    assert m["macro_f1"] == pytest.approx(11 / 18)
    # kappa: p_o = 5/8, p_e = (4*5 + 2*2 + 2*1) / 64 = 26/64 -> (0.625 - 0.40625) / 0.59375 = 7/19
    assert m["kappa"] == pytest.approx(7 / 19)
    # MCC = (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) = (40 - 26) / sqrt(34 * 40)
    assert m["mcc"] == pytest.approx(14 / np.sqrt(1360))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(Y_TRUE, Y_PRED))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(Y_TRUE, Y_PRED))
    assert m["auc"] == pytest.approx(roc_auc_score(Y_TRUE, _probs(Y_PRED, 3), multi_class="ovr", average="macro"))
    assert m["num_samples"] == 8
    assert m["shot_groups"] == {"many": ["a"], "medium": ["b"], "few": ["c"]}
    assert m["train_counts"] == {"a": 150, "b": 50, "c": 5}


def test_metrics_config_changes_groups() -> None:
    m = compute_metrics(Y_TRUE, _probs(Y_PRED, 3), NAMES, TRAIN_COUNTS, MetricsConfig(many_shot_threshold=10, few_shot_threshold=1))
    assert m["shot_groups"] == {"many": ["a", "b"], "medium": ["c"], "few": []}
    assert m["many_shot"] == pytest.approx(0.625)
    assert m["few_shot"] is None


def test_absent_class_is_excluded_from_averages() -> None:
    names = ["a", "b", "c", "d"]
    y_true = np.array([0, 0, 1, 2])
    y_pred = np.array([0, 3, 1, 2])  # one prediction of the absent class d
    probs = np.full((4, 4), 0.05)
    probs[np.arange(4), y_pred] = 0.85
    m = compute_metrics(y_true, probs, names, [200, 50, 30, 3])
    assert m["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": 1.0, "d": None}
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["few_shot"] is None  # the only few-shot class (d) has no test samples
    assert m["medium_shot"] == 1.0
    assert m["confusion_matrix"][0] == [1, 0, 0, 1]
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert m["auc"] is not None and 0.0 <= m["auc"] <= 1.0
    _json_roundtrip(m)


def test_single_class_y_true() -> None:
    y_true = np.array([1, 1, 1])
    m = compute_metrics(y_true, _probs(np.array([1, 1, 0]), 3), NAMES, TRAIN_COUNTS)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["per_class_recall"] == {"a": None, "b": pytest.approx(2 / 3), "c": None}
    assert m["auc"] is None
    assert m["many_shot"] is None and m["few_shot"] is None
    _json_roundtrip(m)  # undefined kappa / MCC become None, never NaN
    perfect = compute_metrics(y_true, _probs(y_true, 3), NAMES, TRAIN_COUNTS)
    assert perfect["balanced_accuracy"] == 1.0
    assert perfect["kappa"] is None or np.isfinite(perfect["kappa"])


def test_auc_renormalises_rows() -> None:
    rng = np.random.default_rng(0)
    y_true = np.array([0, 1, 2] * 5)
    probs = rng.dirichlet(np.ones(3), size=15)
    scaled = probs * rng.uniform(0.5, 2.0, size=(15, 1))  # rows no longer sum to 1
    expected = roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
    assert compute_metrics(y_true, scaled, NAMES, TRAIN_COUNTS)["auc"] == pytest.approx(expected)
    # tied scores stay tied after renormalisation (0.1 / 0.8 rows scaled by 3)
    tied = _probs(Y_PRED, 3)
    expected_tied = roc_auc_score(Y_TRUE, tied, multi_class="ovr", average="macro")
    assert compute_metrics(Y_TRUE, 3.0 * tied, NAMES, TRAIN_COUNTS)["auc"] == pytest.approx(expected_tied)


def test_auc_over_present_classes_only() -> None:
    # classes a and b present, c absent: mean of the binary AUCs of a and b.
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1]])
    # a: scores of positives {0.8, 0.3} vs negatives {0.4, 0.1}: 3 of 4 pairs ranked right -> 0.75
    # b: positives {0.5, 0.8} vs negatives {0.1, 0.6}: 3 of 4 -> 0.75
    assert compute_metrics(y_true, probs, NAMES, TRAIN_COUNTS)["auc"] == pytest.approx(0.75)


def test_all_outputs_are_plain_python_and_json_serialisable() -> None:
    m = compute_metrics(Y_TRUE.astype(np.int32), _probs(Y_PRED, 3).astype(np.float32), NAMES, np.array(TRAIN_COUNTS))
    assert _json_roundtrip(m) == m

    def check(value: object) -> None:
        assert not isinstance(value, np.generic), value
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)

    check(m)


@pytest.mark.parametrize(
    ("y_true", "probs", "match"),
    [
        (np.array([0, 1]), np.array([[0.5, np.nan, 0.5], [0.2, 0.3, 0.5]]), "NaN"),
        (np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), "columns"),
        (np.array([0, 3]), _probs(np.array([0, 1]), 3), "outside"),
        (np.array([0]), _probs(np.array([0, 1]), 3), "shape"),
        (np.array([0, 1]), np.array([[-1.0, 2.0, 0.0], [0.2, 0.3, 0.5]]), "negative"),
    ],
)
def test_invalid_inputs_raise_with_a_message(y_true: np.ndarray, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, probs, NAMES, TRAIN_COUNTS)


def test_format_summary_lists_key_numbers_and_classes_by_count() -> None:
    text = format_summary(compute_metrics(Y_TRUE, _probs(Y_PRED, 3), NAMES, [5, 150, 50]))
    assert "balanced accuracy: 58.33%" in text
    assert "many / medium / few-shot" in text
    assert "macro-F1: 0.6111" in text
    lines = text.splitlines()
    class_lines = [line for line in lines if line.split()[0] in NAMES]
    assert [line.split()[0] for line in class_lines] == ["b", "c", "a"]  # by training count
    assert "150" in class_lines[0]


# --------------------------------------------------------------------------- tail group (issue 17)


def test_tail_is_the_k_rarest_training_classes_on_hand_made_counts() -> None:
    from fopro_kd.metrics import default_tail_size, tail_classes

    # HAM10000-like: no class under 20 training images, so few-shot is empty, tail is not
    ham = [282, 469, 1054, 70, 1068, 6660, 97]  # akiec bcc bkl df mel nv vasc
    assert shot_groups(ham)["few"] == []
    assert tail_classes(ham) == [3, 6, 0]  # df (70), vasc (97), akiec (282)
    assert tail_classes([5, 5, 9, 1], k=2) == [3, 0]  # ties: lower index first
    assert tail_classes([10, 20], k=5) == [0, 1]  # capped at C
    assert [default_tail_size(c) for c in (2, 3, 7, 10, 11, 40)] == [1, 2, 3, 3, 3, 10]
    with pytest.raises(ValueError, match="metrics.tail_classes"):
        tail_classes(ham, k=0)


def test_compute_metrics_reports_tail_recall_next_to_shot_groups() -> None:
    # recalls: a 3/4, b 1/2, c 1/2; tail k=1 is c (5 training images), k=2 is c and b
    m = compute_metrics(Y_TRUE, _probs(Y_PRED, 3), NAMES, TRAIN_COUNTS)
    assert m["tail_classes"] == ["c", "b"] and m["tail"] == pytest.approx(0.5)  # default k = min(3, C-1) = 2
    m1 = compute_metrics(Y_TRUE, _probs(Y_PRED, 3), NAMES, [5, 150, 50], MetricsConfig(tail_classes=1))
    assert m1["tail_classes"] == ["a"] and m1["tail"] == pytest.approx(0.75)
    text = format_summary(m1)
    assert "tail (a): 75.00%" in text


def test_tail_classes_config_is_validated() -> None:
    from fopro_kd.config import ConfigError, config_from_dict

    assert config_from_dict({"metrics": {"tail_classes": 4}}).metrics.tail_classes == 4
    with pytest.raises(ConfigError, match="metrics.tail_classes"):
        config_from_dict({"metrics": {"tail_classes": 0}})
