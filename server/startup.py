"""Start-up checks of a federation: settings that cannot run fail before any node does work."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fopro_kd.federated_prompt import check_federated_prompt
from fopro_kd.config import Config, ConfigError
from fopro_kd.run_plan import resolve_run_plan
from server.strategies import ValidatedWeightedAvg, get_strategy_class
from server.strategies.robust import RobustAggregate

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["check_federation_config", "strategy_federation_config"]


def check_federation_config(cfg: Config) -> None:
    """Fail at start-up, before any node does work, on federation settings that cannot run."""
    fed = cfg.federation
    plan = resolve_run_plan(cfg)
    strategy_cls = get_strategy_class(fed.strategy)
    if strategy_cls.needs_teacher_loss and not plan.uses_teacher:
        raise ConfigError(
            f"'federation.strategy: {fed.strategy}' needs the teacher's representation loss for its robust factor, but "
            f"'train.method' is {cfg.train.method!r}; use method 'ekd' or 'fopro-kd'"
        )
    if strategy_cls.needs_class_counts and fed.share_class_counts is False:
        raise ConfigError(
            f"'federation.strategy: {fed.strategy}' weights clients by their per-class counts, but "
            "'federation.share_class_counts' is false; set it to null (or true) or choose another strategy"
        )
    if fed.local_steps is not None and fed.local_steps <= 0:
        raise ConfigError(f"'federation.local_steps' must be > 0 or null, got {fed.local_steps}")
    check_federated_prompt(cfg, plan.teacher_input_size)
    if plan.central_dp:  # DP-FedAvg with public uniform weights (docs/privacy.md §3)
        if issubclass(strategy_cls, RobustAggregate):
            raise ConfigError(
                f"'federation.strategy: {fed.strategy}' cannot run with 'privacy.mode: central': DP-FedAvg's "
                "sensitivity is that of a clipped mean with a fixed denominator, not of a median or trimmed mean; "
                "use 'fedavg' or 'fedprox' (docs/privacy.md §3)"
            )
        if strategy_cls.client_weights is not ValidatedWeightedAvg.client_weights:
            raise ConfigError(
                f"'federation.strategy: {fed.strategy}' cannot run with 'privacy.mode: central': its aggregation "
                "weights are computed from private per-client statistics across clients (FedMAS robust factors, "
                "class counts), which the central noise does not cover; use 'fedavg' or 'fedprox' (uniform public "
                "weights) or 'privacy.mode: local'"
            )
        if not fed.fraction_train > 0:
            raise ConfigError(
                f"'federation.fraction_train' is the Poisson client sampling rate q under 'privacy.mode: central' and "
                f"must be in (0, 1], got {fed.fraction_train!r}"
            )


def strategy_federation_config(cfg: Config) -> Any:
    """``cfg.federation`` as the strategy uses it: in DP mode with ``fraction_evaluate`` 0 (logged).

    Federated evaluation sends each site's per-class correct / total counts on its private
    local test split, un-noised: outside the DP guarantee (docs/privacy.md §4), so it is off.
    """
    fed = cfg.federation
    if resolve_run_plan(cfg).any_dp and fed.fraction_evaluate > 0:
        logger.warning(
            "privacy.mode %r: federated evaluation disabled (federation.fraction_evaluate %g -> 0): per-class counts on "
            "each hospital's local test split are outside the DP guarantee; the global model is scored on the "
            "server's validation and test splits only", cfg.privacy.mode, fed.fraction_evaluate,
        )
        return dataclasses.replace(fed, fraction_evaluate=0.0)
    return fed
