"""Byzantine-robust aggregation: coordinate-wise median and trimmed mean (``federation.strategy``).

FedAvg's weighted mean moves arbitrarily far with one bad reply: a single hospital (or an
attacker holding its node) that sends a scaled, sign-flipped or otherwise crafted model decides
the global model. The validation of :class:`~server.strategies.base.ValidatedWeightedAvg`
(names, shapes, finiteness, the update-norm bound, ``num-examples``) catches what is *malformed*;
these strategies bound what a well-formed but hostile reply can do:

* ``median``: θ^{r+1}[j] = median_k θ_k[j] for every floating coordinate j (Yin et al., 2018,
  "Byzantine-robust distributed learning: towards optimal statistical rates"). With n replies,
  fewer than n/2 arbitrary replies cannot move a coordinate outside the range of the honest ones;
* ``trimmed_mean``: per coordinate, the ⌊β n⌋ largest and ⌊β n⌋ smallest values are dropped and
  the rest averaged (same paper), β = ``federation.trim_fraction``; β n < 1 is a plain mean (logged).

Both are **unweighted**: ``num-examples`` is a self-reported number, and weighting a median by it
would give back the control that the median takes away. Integer buffers (``num_batches_tracked``)
keep the base rule (element-wise maximum).

**Direction check** (``federation.robust_min_cosine``, default 0): with at least 3 valid replies,
a reply whose update Δ_k = θ_k − θ has cosine similarity below the bound with the coordinate-wise
median update is rejected (check ``direction``) before the robust aggregate is taken. A
sign-flipped update (θ − Δ instead of θ + Δ) has cosine ≈ −1 and the same norm as an honest one,
so the norm bound cannot see it; this check records it as a rejected site instead of silently
out-voting it. Honest updates of non-IID sites point in different directions, but each has a
positive component along the median of the honest updates in the runs measured
(docs/reliability.md); ``null`` switches the check off.

The strategies plug into the base class through one hook, :meth:`RobustAggregate._average`,
which receives the validated replies in the order of :attr:`last_weights`; they do not touch
the validation or the sampling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log

from fopro_kd.config import ConfigError
from server.strategies.base import ValidatedWeightedAvg

__all__ = ["MedianStrategy", "RobustAggregate", "TrimmedMeanStrategy", "cosine", "robust_combine"]

MIN_REPLIES_FOR_DIRECTION = 3
"""With two replies the median is their mean: the check cannot tell which one is flipped."""


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.inexact))


def cosine(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Cosine similarity of two updates (dicts of arrays, floating keys of ``b``) as flat float64 vectors.

    0.0 when either update is zero (no direction to compare).
    """
    dot = na = nb = 0.0
    for key, vb in b.items():
        va = a[key].astype(np.float64, copy=False).reshape(-1)
        vb = vb.astype(np.float64, copy=False).reshape(-1)
        dot += float(va @ vb)
        na += float(va @ va)
        nb += float(vb @ vb)
    if na <= 0 or nb <= 0:
        return 0.0
    return dot / math.sqrt(na * nb)


def robust_combine(stacked: np.ndarray, rule: str, trim_fraction: float = 0.2) -> np.ndarray:
    """Coordinate-wise ``median`` or ``trimmed_mean`` over axis 0 of ``stacked`` (float64 result).

    >>> robust_combine(np.array([[0.0], [1.0], [100.0]]), "median").tolist()
    [1.0]
    >>> robust_combine(np.array([[0.0], [1.0], [2.0], [100.0], [-50.0]]), "trimmed_mean", 0.2).tolist()
    [1.0]
    """
    values = stacked.astype(np.float64, copy=False)
    if rule == "median":
        return np.median(values, axis=0)
    if rule == "trimmed_mean":
        n = values.shape[0]
        k = int(math.floor(trim_fraction * n))
        if k == 0:
            return values.mean(axis=0)
        ordered = np.sort(values, axis=0)
        return ordered[k:n - k].mean(axis=0)
    raise ValueError(f"unknown robust rule {rule!r}; expected 'median' or 'trimmed_mean'")


class RobustAggregate(ValidatedWeightedAvg):
    """Validated replies, then a direction check and a coordinate-wise robust aggregate (module docstring).

    Parameters
    ----------
    trim_fraction : float (default: 0.2)
        β of the trimmed mean (ignored by the median).
    min_cosine : float or None (default: 0.0)
        Bound of the direction check; ``None`` switches it off.
    **kwargs
        :class:`~server.strategies.base.ValidatedWeightedAvg` arguments.
    """

    name: ClassVar[str] = "robust"
    rule: ClassVar[str] = "median"

    def __init__(self, *, trim_fraction: float = 0.2, min_cosine: float | None = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        self.trim_fraction = float(trim_fraction)
        self.min_cosine = None if min_cosine is None else float(min_cosine)
        self.last_cosines: dict[int, float] = {}
        """Cosine of each reply's update with the median update in the last round (direction check)."""

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {"trim_fraction": float(getattr(cfg, "trim_fraction", 0.2)),
                "min_cosine": getattr(cfg, "robust_min_cosine", 0.0)}

    def summary(self) -> None:
        log(INFO, "\t├──> %s: coordinate-wise %s (trim fraction %g), direction check cos >= %s",
            type(self).__name__, self.rule, self.trim_fraction, self.min_cosine)
        super().summary()

    # ------------------------------------------------------------------ the one hook
    def _average(self, arrays_np: Iterable[Mapping[str, np.ndarray]], alpha: np.ndarray) -> ArrayRecord:  # type: ignore[override]
        """Robust aggregate of the validated replies (``alpha`` only fixes their number: unweighted).

        Holds every reply at once (n × model size), unlike the streaming weighted mean: fine for
        the tens of hospitals of a cross-silo federation.
        """
        replies = [dict(values) for values in arrays_np]
        if len(replies) != len(alpha):
            raise ValueError(f"{len(alpha)} weights for {len(replies)} replies")
        nodes = list(self.last_weights)
        if len(nodes) != len(replies):  # another caller of _average (not the train round): no node bookkeeping
            nodes = []
        reference = None if self._reference is None else {k: self._reference[k].numpy() for k in self._reference.keys()}
        if reference is not None and set(reference) != set(replies[0]):
            reference = None
        self.last_cosines = {}
        if nodes and reference is not None and self.min_cosine is not None and len(replies) >= MIN_REPLIES_FOR_DIRECTION:
            replies, nodes = self._direction_check(replies, nodes, reference)
        if nodes:
            self.last_weights = {node: 1.0 / len(nodes) for node in nodes}  # unweighted: each kept site counts once
        return self._combine(replies)

    def _direction_check(
        self, replies: list[dict[str, np.ndarray]], nodes: list[int], reference: Mapping[str, np.ndarray]
    ) -> tuple[list[dict[str, np.ndarray]], list[int]]:
        keys = [k for k, v in reference.items() if _is_float(v)]
        ref64 = {k: reference[k].astype(np.float64) for k in keys}
        median_update = {k: np.median(np.stack([r[k].astype(np.float64) for r in replies]), axis=0) - ref64[k]
                         for k in keys}
        kept_r, kept_n = [], []
        for values, node in zip(replies, nodes):
            update = {k: values[k].astype(np.float64) - ref64[k] for k in keys}
            cos = cosine(update, median_update)
            self.last_cosines[node] = cos
            if cos < self.min_cosine:  # type: ignore[operator]
                self._reject(self._current_round, node,
                             f"direction: the update has cosine similarity {cos:.3f} with the coordinate-wise median "
                             f"update, below federation.robust_min_cosine={self.min_cosine:g} (sign-flipped or "
                             f"adversarial update)")
                continue
            kept_r.append(values)
            kept_n.append(node)
        if not kept_r:  # cannot happen for n >= 3 with a median (some reply lies on its side); keep them all
            log(WARNING, "direction check rejected every reply; aggregating all of them")
            return replies, nodes
        return kept_r, kept_n

    def _combine(self, replies: list[dict[str, np.ndarray]]) -> ArrayRecord:
        if self.rule == "trimmed_mean" and math.floor(self.trim_fraction * len(replies)) == 0:
            log(WARNING, "trimmed mean of %d replies with trim fraction %g trims nothing (plain mean)",
                len(replies), self.trim_fraction)
        out: dict[str, Array] = {}
        for key, first in replies[0].items():
            stacked = np.stack([r[key] for r in replies])
            if _is_float(first):
                value = robust_combine(stacked, self.rule, self.trim_fraction).astype(first.dtype)
            else:
                value = stacked.max(axis=0).astype(first.dtype)
            out[key] = Array(np.array(value, dtype=first.dtype, order="C"))
        return ArrayRecord(out)

    # ------------------------------------------------------------------ round number, central DP
    _current_round: int = -1

    @property
    def central_dp(self) -> Any:
        return None

    @central_dp.setter
    def central_dp(self, value: Any) -> None:
        if value is not None:
            raise ConfigError(
                f"'federation.strategy: {self.name}' cannot run with 'privacy.mode: central': DP-FedAvg's sensitivity "
                "is that of a clipped mean with a fixed denominator, not of a median or trimmed mean; use 'fedavg' or "
                "'fedprox' (docs/privacy.md §3)"
            )

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> Any:
        """The base validation and weights, with the robust :meth:`_average` (remembers the round for rejections)."""
        self._current_round = int(server_round)
        self.last_cosines = {}
        return super().aggregate_train(server_round, replies)


class MedianStrategy(RobustAggregate):
    """``federation.strategy: median``: coordinate-wise median of the valid replies."""

    name: ClassVar[str] = "median"
    rule: ClassVar[str] = "median"


class TrimmedMeanStrategy(RobustAggregate):
    """``federation.strategy: trimmed_mean``: coordinate-wise β-trimmed mean, β = ``federation.trim_fraction``."""

    name: ClassVar[str] = "trimmed_mean"
    rule: ClassVar[str] = "trimmed_mean"
