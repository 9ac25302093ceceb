"""Reply validation: names, shapes, dtypes, finiteness, metric ranges and the update-norm bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from server.validation import reason_check, update_norm, validate_reply


def record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


REFERENCE = record(w=np.zeros((2, 3), np.float32), steps=np.array(0, np.int64))
GOOD_METRICS = MetricRecord({"num-examples": 4, "train-loss": 0.3, "train-accuracy": 0.5, "count-seen": 4})


def good_arrays(**changes: np.ndarray) -> ArrayRecord:
    arrays = {"w": np.ones((2, 3), np.float32), "steps": np.array(5, np.int64)}
    arrays.update(changes)
    return record(**arrays)


def test_valid_reply_returns_none():
    assert validate_reply(good_arrays(), GOOD_METRICS, REFERENCE) is None


@pytest.mark.parametrize(
    ("arrays", "check", "fragment"),
    [
        (record(w=np.ones((2, 3), np.float32)), "names", "missing ['steps']"),
        (good_arrays(extra=np.zeros(1, np.float32)), "names", "unexpected ['extra']"),
        (good_arrays(w=np.ones((3, 2), np.float32)), "shape", "'w'"),
        (good_arrays(w=np.ones((2, 3), np.float16)), "dtype", "float16"),
        (good_arrays(steps=np.array(5.0, np.float64)), "dtype", "int64"),
        (good_arrays(w=np.array([[0, np.nan, 0], [0, 0, np.inf]], np.float32)), "finite", "2 non-finite"),
    ],
)
def test_invalid_arrays_name_the_check(arrays, check, fragment):
    reason = validate_reply(arrays, GOOD_METRICS, REFERENCE)
    assert reason is not None and reason_check(reason) == check
    assert fragment in reason


@pytest.mark.parametrize(
    ("metrics", "fragment"),
    [
        ({"train-loss": 1.0}, "'num-examples' is missing"),
        ({"num-examples": -1}, ">= 0"),
        ({"num-examples": 2.0}, "must be an int"),
        ({"num-examples": 2, "train-loss": float("nan")}, "not finite"),
        ({"num-examples": 2, "per-class": [1.0, float("inf")]}, "not finite"),
        ({"num-examples": 2, "val-accuracy": 1.5}, "[0, 1]"),
        ({"num-examples": 2, "flip-prob": -0.1}, "[0, 1]"),
        ({"num-examples": 2, "count-seen": -3}, "count"),
        ({"num-examples": 2, "class-counts": [3, -1]}, "count"),
    ],
)
def test_invalid_metrics_are_rejected(metrics, fragment):
    reason = validate_reply(good_arrays(), MetricRecord(metrics), REFERENCE)
    assert reason is not None and reason_check(reason) == "metrics"
    assert fragment in reason


def test_zero_examples_and_list_metrics_in_range_are_valid():
    metrics = MetricRecord({"num-examples": 0, "class-accuracy": [0.0, 1.0], "class-counts": [0, 3]})
    assert validate_reply(good_arrays(), metrics, REFERENCE) is None


def test_update_norm_over_floating_arrays_only():
    # w: six entries of 1 -> sqrt(6); the int64 step counter (0 -> 5) is ignored
    assert update_norm(good_arrays(), REFERENCE) == pytest.approx(math.sqrt(6))
    assert update_norm(REFERENCE, REFERENCE) == 0.0


def test_max_update_norm_bound():
    assert validate_reply(good_arrays(), GOOD_METRICS, REFERENCE, max_update_norm=2.5) is None
    reason = validate_reply(good_arrays(), GOOD_METRICS, REFERENCE, max_update_norm=2.0)
    assert reason is not None and reason_check(reason) == "update-norm"


def test_update_norm_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        update_norm(good_arrays(w=np.ones(6, np.float32)), REFERENCE)
