"""Class-balanced aggregation: a client's vote is its effective-number-weighted sample count.

Design (fopro-kd's own; class weights from Cui et al., CVPR 2019, "Class-Balanced Loss
Based on Effective Number of Samples", arXiv:1901.05555):

Each client k reports ``"class-counts"`` n_{k,·} (list of C ints: training samples per
class). The server forms the global counts N_c = Σ_k n_{k,c} and the effective-number
class weights

    w_c = (1 − β) / (1 − β^{N_c})   for N_c > 0,   w_c = 0 otherwise,

normalised so Σ_{c: N_c>0} w_c = C⁺ (the number of present classes, as in Cui et al.).
Client k's weight is

    u_k = Σ_c n_{k,c} · w_c,      α_k = u_k / Σ_j u_j.

A sample of a rare class counts more than one of a frequent class, so a hospital holding
rare classes weighs more than its raw size. β = 0 gives w_c = 1 and u_k = m_k (FedAvg);
β → 1 gives w_c ∝ 1/N_c and u_k ∝ Σ_c n_{k,c}/N_c (each class votes equally).

Example (β = 0.5): counts A = [3, 0], B = [1, 2] -> N = [4, 2], w ∝ [8/15, 2/3]
(before normalisation), u_A ∝ 3·8/15 = 8/5, u_B ∝ 8/15 + 2·2/3 = 28/15,
α = [6/13, 7/13] (FedAvg would give [1/2, 1/2]).

Missing or invalid ``class-counts`` on any reply (not a list of ints >= 0, lengths that
differ between clients, all-zero global counts) make the round fall back to FedAvg
weights (``num-examples``) with a logged warning.
"""

from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import MetricRecord
from flwr.common import log

from fopro_kd.federation.wire import CLASS_COUNTS_KEY
from server.strategies.base import ValidatedWeightedAvg
from server.validation import NUM_EXAMPLES_KEY

__all__ = ["CLASS_COUNTS_KEY", "ClassBalancedStrategy", "effective_number_weights"]



def effective_number_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al. (2019) class weights (1 − β)/(1 − β^{N_c}), summing to the number of present classes.

    Classes with N_c = 0 get weight 0. β must lie in [0, 1).
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    w = np.zeros_like(n)
    if beta == 0.0:
        w[present] = 1.0
    else:
        # 1 - β^N as -expm1(N ln β): exact for β close to 1.
        w[present] = (1.0 - beta) / -np.expm1(n[present] * math.log(beta))
    total = w.sum()
    return w * (present.sum() / total) if total > 0 else w


class ClassBalancedStrategy(ValidatedWeightedAvg):
    """α_k ∝ Σ_c n_{k,c} · w_c with effective-number weights w_c of the global class counts.

    See the module docstring for the formula, the example and the fallback.

    Parameters
    ----------
    cb_beta : float (default: 0.999)
        β in [0, 1) of the effective number of samples.
    **kwargs
        Passed to :class:`~server.strategies.base.ValidatedWeightedAvg`.
    """

    name: ClassVar[str] = "class_balanced"
    required_metrics: ClassVar[tuple[str, ...]] = (NUM_EXAMPLES_KEY, CLASS_COUNTS_KEY)
    needs_class_counts: ClassVar[bool] = True

    def __init__(self, *, cb_beta: float = 0.999, **kwargs: Any) -> None:
        if not 0 <= cb_beta < 1:
            raise ValueError(f"cb_beta must be in [0, 1), got {cb_beta!r}")
        super().__init__(**kwargs)
        self.cb_beta = float(cb_beta)
        self.last_class_weights: np.ndarray | None = None
        """w_c of the last round (``None`` after a fallback)."""

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {"cb_beta": cfg.cb_beta}

    def summary(self) -> None:
        log(INFO, "\t├──> Class-balanced: effective-number beta = %s", self.cb_beta)
        super().summary()

    def client_weights(self, server_round: int, metrics: list[MetricRecord]) -> np.ndarray:
        m = np.asarray([float(rec[NUM_EXAMPLES_KEY]) for rec in metrics], dtype=np.float64)
        counts, problem = self._class_counts(metrics)
        if counts is None:
            log(WARNING, "Round %s: %s; using num-examples weights this round", server_round, problem)
            self.last_class_weights = None
            return m
        w = effective_number_weights(counts.sum(axis=0), self.cb_beta)
        self.last_class_weights = w
        return counts @ w

    @staticmethod
    def _class_counts(metrics: list[MetricRecord]) -> tuple[np.ndarray | None, str]:
        rows: list[list[int]] = []
        for i, rec in enumerate(metrics):
            value = rec.get(CLASS_COUNTS_KEY)
            if not isinstance(value, list) or not value:
                return None, f"reply {i} has no {CLASS_COUNTS_KEY!r} list (got {value!r})"
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                return None, f"reply {i} has invalid {CLASS_COUNTS_KEY!r} {value!r} (need ints >= 0)"
            rows.append(value)
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            return None, f"{CLASS_COUNTS_KEY!r} lengths differ between replies ({sorted(lengths)})"
        counts = np.asarray(rows, dtype=np.float64)
        if counts.sum() <= 0:
            return None, f"all {CLASS_COUNTS_KEY!r} are zero"
        return counts, ""
