"""Server aggregation strategies, found by their config name (``federation.strategy``).

>>> from fopro_kd.config import FederationConfig
>>> strategy = build_strategy(FederationConfig(strategy="fedprox", fedprox_mu=0.1))
>>> type(strategy).__name__, strategy.proximal_mu
('FedProxStrategy', 0.1)
"""

from __future__ import annotations

from typing import Any

from server.strategies.base import ValidatedWeightedAvg
from server.strategies.class_balanced import ClassBalancedStrategy
from server.strategies.fedavg import FedAvgStrategy
from server.strategies.fedmas import FedMASStrategy
from server.strategies.fedprox import FedProxStrategy
from server.strategies.robust import MedianStrategy, TrimmedMeanStrategy

__all__ = [
    "STRATEGIES",
    "ClassBalancedStrategy",
    "FedAvgStrategy",
    "FedMASStrategy",
    "FedProxStrategy",
    "MedianStrategy",
    "TrimmedMeanStrategy",
    "ValidatedWeightedAvg",
    "build_strategy",
    "get_strategy_class",
    "list_strategies",
]

STRATEGIES: dict[str, type[ValidatedWeightedAvg]] = {
    cls.name: cls for cls in (FedAvgStrategy, FedProxStrategy, FedMASStrategy, ClassBalancedStrategy,
                               MedianStrategy, TrimmedMeanStrategy)
}


def list_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(STRATEGIES)


def get_strategy_class(name: str) -> type[ValidatedWeightedAvg]:
    """The strategy class registered as ``name``; ``ValueError`` listing the options otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; registered strategies: {list_strategies()}") from None


def build_strategy(cfg: Any, **fedavg_kwargs: Any) -> ValidatedWeightedAvg:
    """Build the strategy named by ``cfg.strategy`` from a ``FederationConfig``.

    Sampling comes from the config: ``fraction_train``, ``fraction_evaluate`` and
    ``min_available_clients`` (used for ``min_available_nodes``, ``min_train_nodes`` and
    ``min_evaluate_nodes``); the strategy's own fields (``fedprox_mu``, ``fedmas_rule``,
    ``num_rounds``, ``drw_*``, ``cb_beta``) via its ``config_kwargs``. Keyword arguments
    (e.g. ``min_valid_replies``, ``max_update_norm``, ``train_metrics_aggr_fn``) override both.
    """
    cls = get_strategy_class(cfg.strategy)
    kwargs: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_available_nodes": cfg.min_available_clients,
        "min_train_nodes": cfg.min_available_clients,
        "min_evaluate_nodes": cfg.min_available_clients,
    }
    kwargs.update(cls.config_kwargs(cfg))
    kwargs.update(fedavg_kwargs)
    return cls(**kwargs)
