"""Validation of client train replies before they touch the global model.

Flower's strategies only check that replies carry the same record keys (``libraries.md``
§1.3); nothing stops a NaN, a resized layer, a half-precision copy or an exploding
update from being averaged into every hospital's model. :func:`validate_reply` checks one
reply against the global arrays sent that round and returns a reason string naming the
failed check, so the strategy can drop the reply and log *why*.

Reason strings start with the check's name followed by a colon (``"names: ..."``,
``"shape: ..."``, ``"dtype: ..."``, ``"finite: ..."``, ``"metrics: ..."``,
``"update-norm: ..."``); :func:`reason_check` extracts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fopro_kd.federation.wire import NUM_EXAMPLES_KEY

PROBABILITY_SUFFIXES = ("-prob", "accuracy")
COUNT_PREFIX = "count-"
COUNT_SUFFIX = "-counts"

__all__ = [
    "NUM_EXAMPLES_KEY",
    "reason_check",
    "to_numpy_dict",
    "update_norm",
    "validate_arrays",
    "validate_metrics",
    "validate_reply",
]


def to_numpy_dict(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Deserialise an ArrayRecord once into ``{name: ndarray}`` (record order kept)."""
    return {key: arrays[key].numpy() for key in arrays.keys()}


def reason_check(reason: str) -> str:
    """The check name at the start of a reason string (``"shape: ..."`` -> ``"shape"``)."""
    return reason.split(":", 1)[0].strip()


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.inexact))


def _norm_from_numpy(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for key, ref in reference.items():
        if key not in arrays or not _is_float(ref):
            continue
        value = arrays[key]
        if value.shape != ref.shape:
            raise ValueError(
                f"update_norm: array {key!r} has shape {value.shape} but the reference has {ref.shape}"
            )
        diff = value.astype(np.float64, copy=False) - ref.astype(np.float64, copy=False)
        total += float(np.vdot(diff, diff).real)
    return math.sqrt(total)


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over the floating-point arrays, as one flat vector.

    Integer buffers (e.g. BatchNorm ``num_batches_tracked``) are left out: their change is
    the number of local steps, not a model update, and would dominate the norm.
    Arrays missing from ``arrays`` are skipped; a shape mismatch raises ``ValueError``.
    """
    return _norm_from_numpy(to_numpy_dict(arrays), to_numpy_dict(reference))


def validate_arrays(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_update_norm: float | None = None,
) -> str | None:
    """Array part of :func:`validate_reply` on already deserialised arrays."""
    names, ref_names = set(arrays), set(reference)
    if names != ref_names:
        missing = sorted(ref_names - names)
        extra = sorted(names - ref_names)
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        return f"names: array names differ from the global model ({'; '.join(parts)})"
    for key, ref in reference.items():
        value = arrays[key]
        if value.shape != ref.shape:
            return f"shape: array {key!r} has shape {tuple(value.shape)}, the global model has {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"dtype: array {key!r} has dtype {value.dtype}, the global model has {ref.dtype}"
        if _is_float(value) and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            return f"finite: array {key!r} has {bad} non-finite value(s) (NaN or Inf)"
    if max_update_norm is not None:
        norm = _norm_from_numpy(arrays, reference)
        if not math.isfinite(norm) or norm > max_update_norm:
            return f"update-norm: L2 norm of the update is {norm:.6g}, above the bound {max_update_norm:.6g}"
    return None


def _values(value: object) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]  # type: ignore[arg-type]


def validate_metrics(metrics: MetricRecord | Mapping[str, object]) -> str | None:
    """Metric part of :func:`validate_reply`.

    * ``"num-examples"`` present, an ``int`` and ``>= 0``;
    * every value (list entries included) finite;
    * keys ending in ``"-prob"`` or ``"accuracy"`` within [0, 1];
    * count keys (prefix ``"count-"`` or suffix ``"-counts"``) ``>= 0``.
    """
    if NUM_EXAMPLES_KEY not in metrics:
        return f"metrics: {NUM_EXAMPLES_KEY!r} is missing (keys: {sorted(metrics.keys())})"
    num = metrics[NUM_EXAMPLES_KEY]
    if isinstance(num, bool) or not isinstance(num, int):
        return f"metrics: {NUM_EXAMPLES_KEY!r} must be an int, got {num!r}"
    if num < 0:
        return f"metrics: {NUM_EXAMPLES_KEY!r} must be >= 0, got {num}"
    for key, value in metrics.items():
        try:
            values = _values(value)
        except (TypeError, ValueError):
            return f"metrics: {key!r} is not numeric ({value!r})"
        if not all(math.isfinite(v) for v in values):
            return f"metrics: {key!r} is not finite ({value!r})"
        if key.endswith(PROBABILITY_SUFFIXES) and not all(0.0 <= v <= 1.0 for v in values):
            return f"metrics: {key!r} must lie in [0, 1], got {value!r}"
        if (key.startswith(COUNT_PREFIX) or key.endswith(COUNT_SUFFIX)) and not all(v >= 0 for v in values):
            return f"metrics: count {key!r} must be >= 0, got {value!r}"
    return None


def validate_reply(
    arrays: ArrayRecord,
    metrics: MetricRecord,
    reference: ArrayRecord,
    *,
    max_update_norm: float | None = None,
) -> str | None:
    """Check one train reply against the global arrays sent this round.

    Parameters
    ----------
    arrays : ArrayRecord
        The client's updated model.
    metrics : MetricRecord
        The client's train metrics.
    reference : ArrayRecord
        The global arrays the client received this round.
    max_update_norm : float, optional
        Upper bound on :func:`update_norm` (``None``: no bound).

    Returns
    -------
    str or None
        ``None`` when the reply is valid, otherwise a reason ``"<check>: <details>"`` with
        check one of ``names``, ``shape``, ``dtype``, ``finite``, ``update-norm``, ``metrics``.

    Examples
    --------
    >>> import numpy as np
    >>> from flwr.app import Array, ArrayRecord, MetricRecord
    >>> ref = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    >>> bad = ArrayRecord({"w": Array(np.array([0.0, np.nan], np.float32))})
    >>> validate_reply(bad, MetricRecord({"num-examples": 3}), ref)
    "finite: array 'w' has 1 non-finite value(s) (NaN or Inf)"
    """
    reason = validate_arrays(to_numpy_dict(arrays), to_numpy_dict(reference), max_update_norm=max_update_norm)
    return reason if reason is not None else validate_metrics(metrics)
