"""FedMAS aggregation (method.md §5): robust-factor weights from self-supervised priors.

Each client reports ``"robust-factor"`` ρ_k (computed client-side with
:func:`fedmas_robust_factor`) and ``"num-examples"`` m_k. With K valid replies:

=========  ==========================================================================
rule       α_k
=========  ==========================================================================
mas        ρ_k / Σ_j ρ_j (no sample-size term)
mas_inv    same formula; the client computed ρ_k from the inverted state 1/s
mas_DRW    r < ⌊f·R⌋: m_k / Σ_j m_j (FedAvg);
           r ≥ ⌊f·R⌋: v_k = (1/ρ_k) / Σ_j (1/ρ_j), e_k = (1 − β)/(1 − β^{v_k}),
           rescaled so Σ_k e_k = K, α_k = m_k e_k / Σ_j m_j e_j
=========  ==========================================================================

with f = ``drw_fraction`` (0.8), β = ``drw_beta`` (0.9999), R = ``num_rounds``.

Round numbering: Flower's ``server_round`` is 1-based; the method's round index is
r = server_round − 1 (0-based), so with R = 10 and f = 0.8 the switch happens at
server_round 9 (r = 8); server_round 8 (r = 7) still uses FedAvg weights.

Guard: a ρ_k that is missing, non-finite or <= 0 (e.g. a client with no usable class)
makes the ρ-based weights undefined for the whole round; that round falls back to the
FedAvg weights m_k / Σ m_j, with a warning listing the offending values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from server.strategies.base import ValidatedWeightedAvg
from fopro_kd.federation.fedmas import FEDMAS_RULES, check_fedmas_rule, fedmas_robust_factor
from fopro_kd.federation.wire import FEDMAS_RULE_KEY, ROBUST_FACTOR_KEY
from server.validation import NUM_EXAMPLES_KEY

__all__ = [
    "FEDMAS_RULES",
    "FEDMAS_RULE_KEY",
    "ROBUST_FACTOR_KEY",
    "FedMASStrategy",
    "drw_effective_weights",
    "drw_switch_round",
    "fedmas_robust_factor",
]





def drw_switch_round(num_rounds: int, drw_fraction: float) -> int:
    """⌊f·R⌋, the first 0-based round r that uses the DRW weights (tolerant to float error)."""
    return int(math.floor(drw_fraction * num_rounds + 1e-9))


def drw_effective_weights(rho: np.ndarray, num_examples: np.ndarray, beta: float) -> np.ndarray:
    """mas_DRW weights after the switch: α_k = m_k e_k / Σ_j m_j e_j.

    v_k = (1/ρ_k) / Σ_j (1/ρ_j); e_k = (1 − β) / (1 − β^{v_k}) rescaled so Σ_k e_k = K.
    Requires ρ_k > 0 finite and 0 <= β < 1. β = 0 gives e_k = 1 (FedAvg).
    """
    rho = np.asarray(rho, dtype=np.float64)
    m = np.asarray(num_examples, dtype=np.float64)
    inv = 1.0 / rho
    v = inv / inv.sum()
    if beta == 0.0:
        e = np.ones_like(v)
    else:
        # 1 - β^v computed as -expm1(v ln β) to keep precision for β close to 1.
        e = (1.0 - beta) / -np.expm1(v * math.log(beta))
    e = e * (len(e) / e.sum())
    me = m * e
    total = me.sum()
    return me / total if total > 0 else np.full(len(me), 1.0 / len(me))


class FedMASStrategy(ValidatedWeightedAvg):
    """FedMAS weights from client robust factors (rules ``mas``, ``mas_inv``, ``mas_DRW``).

    See the module docstring for the formulas, the 1-based/0-based round convention and
    the fallback for invalid robust factors. ``configure_train`` sends
    ``config["fedmas-rule"]`` so clients compute ρ with the same rule.

    Parameters
    ----------
    rule : {"mas", "mas_inv", "mas_DRW"}
    num_rounds : int
        R, needed for the DRW switch at ⌊drw_fraction · R⌋.
    drw_fraction : float (default: 0.8)
        f in (0, 1].
    drw_beta : float (default: 0.9999)
        β in [0, 1).
    **kwargs
        Passed to :class:`~server.strategies.base.ValidatedWeightedAvg`.
    """

    name: ClassVar[str] = "fedmas"
    required_metrics: ClassVar[tuple[str, ...]] = (NUM_EXAMPLES_KEY, ROBUST_FACTOR_KEY)
    needs_teacher_loss: ClassVar[bool] = True
    reports_rule: ClassVar[bool] = True

    def __init__(
        self,
        *,
        rule: str = "mas",
        num_rounds: int,
        drw_fraction: float = 0.8,
        drw_beta: float = 0.9999,
        **kwargs: Any,
    ) -> None:
        check_fedmas_rule(rule)
        if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"num_rounds must be an int >= 1, got {num_rounds!r}")
        if not 0 < drw_fraction <= 1:
            raise ValueError(f"drw_fraction must be in (0, 1], got {drw_fraction!r}")
        if not 0 <= drw_beta < 1:
            raise ValueError(f"drw_beta must be in [0, 1), got {drw_beta!r}")
        super().__init__(**kwargs)
        self.rule = rule
        self.num_rounds = num_rounds
        self.drw_fraction = float(drw_fraction)
        self.drw_beta = float(drw_beta)
        self.last_weight_mode: str = ""
        """How the last round's weights were computed: ``rule``, ``"fedavg"`` (DRW warm-up) or ``"fedavg-fallback"``."""

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {
            "rule": cfg.fedmas_rule,
            "num_rounds": cfg.num_rounds,
            "drw_fraction": cfg.drw_fraction,
            "drw_beta": cfg.drw_beta,
        }

    def checkpoint_state(self, server_round: int, recorder: Any) -> dict[str, Any]:
        """The rule, the DRW switch and phase, and the round's robust factors per site (for the record and report)."""
        switch = int(self.drw_switch)
        entry = recorder.rounds.get(server_round)
        return {
            "rule": self.rule,
            "drw_switch_round": switch + 1,  # first server round with DRW weights
            "phase": ("drw" if server_round >= switch + 1 else "fedavg") if self.rule == "mas_DRW" else self.rule,
            "robust_factors": {} if entry is None else recorder.by_site(entry.robust_factors),
            "last_weight_mode": str(self.last_weight_mode),
        }

    @property
    def drw_switch(self) -> int:
        """First 0-based round r (= server_round − 1) that uses the DRW weights."""
        return drw_switch_round(self.num_rounds, self.drw_fraction)

    def summary(self) -> None:
        log(INFO, "\t├──> FedMAS: rule = %s", self.rule)
        if self.rule == "mas_DRW":
            log(INFO, "\t│\t└── DRW from round r = %d (server_round %d), beta = %s",
                self.drw_switch, self.drw_switch + 1, self.drw_beta)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add ``"fedmas-rule"`` to the train config, then configure as FedAvg."""
        config = ConfigRecord() if config is None else config
        config[FEDMAS_RULE_KEY] = self.rule
        return super().configure_train(server_round, arrays, config, grid)

    def client_weights(self, server_round: int, metrics: list[MetricRecord]) -> np.ndarray:
        m = np.asarray([float(rec[NUM_EXAMPLES_KEY]) for rec in metrics], dtype=np.float64)
        r = server_round - 1
        if self.rule == "mas_DRW" and r < self.drw_switch:
            self.last_weight_mode = "fedavg"
            return m
        rho = self._robust_factors(server_round, metrics)
        if rho is None:
            self.last_weight_mode = "fedavg-fallback"
            return m
        self.last_weight_mode = self.rule
        if self.rule == "mas_DRW":
            return drw_effective_weights(rho, m, self.drw_beta)
        return rho / rho.sum()

    def _robust_factors(self, server_round: int, metrics: list[MetricRecord]) -> np.ndarray | None:
        values: list[float] = []
        bad: list[str] = []
        for i, rec in enumerate(metrics):
            value = rec.get(ROBUST_FACTOR_KEY)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if not ok:
                bad.append(f"reply {i}: {value!r}")
            values.append(float(value) if ok else float("nan"))  # type: ignore[arg-type]
        if bad:
            log(
                WARNING,
                "Round %s: %r missing, non-finite or <= 0 (%s); using FedAvg weights this round",
                server_round,
                ROBUST_FACTOR_KEY,
                ", ".join(bad),
            )
            return None
        return np.asarray(values, dtype=np.float64)
