"""What each aggregation strategy asks of a site, one hook per strategy, registered under the server's name.

The server side of a strategy is a class in ``server/strategies/``; the site side (extra loss
terms, work before training such as FedProx's anchor or FedMAS's prior, reply metrics such as
the robust factor, DP statistics releases) is a :class:`ClientHook` here, in
:data:`CLIENT_HOOKS` under the same name. ``client/client_app.py`` calls the hook of
``federation.strategy`` and compares no strategy names, so adding a strategy is one server
class plus one hook (docs/architecture.md, "Add a strategy"); ``tests/test_registry_names.py``
checks that both registries hold the same names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fopro_kd.config import Config
from fopro_kd.federation.fedmas import fedmas_robust_factor
from fopro_kd.federation.strategies import FEDMAS_STRATEGY
from fopro_kd.federation.wire import ROBUST_FACTOR_KEY, TrainInstruction
from fopro_kd.privacy.statistics import statistics_policy, statistics_releases_per_round
from fopro_kd.training.results import EpochResult, class_rep_prior

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["CLIENT_HOOKS", "ClientHook", "FedMASHook", "FedProxHook", "RoundInputs", "client_hook"]


@dataclass
class RoundInputs:
    """What a hook may read in one train round (the site's own objects; nothing here leaves the site)."""

    cfg: Config
    instruction: TrainInstruction
    """The server's train instruction, typed and checked at the boundary (fopro_kd/federation/wire.py)."""
    student: torch.nn.Module
    teacher: Any
    prompt: Any
    data: Any
    device: torch.device
    dp: Any = None
    """``DPContext`` under ``privacy.mode: local``, else None."""
    node: str = "site"
    server_round: int = 0


class ClientHook:
    """FedAvg's site side: nothing beyond the plain local training (the default of every strategy)."""

    loss_terms: tuple[str, ...] = ()
    """Loss terms this strategy adds; every site reports them (0.0 when absent)."""

    def statistics_releases(self, cfg: Config) -> int:
        """Gaussian releases of per-class statistics per round besides DP-SGD (charged to the privacy ledger)."""
        return 0

    def before_train(self, inputs: RoundInputs) -> dict[str, Any]:
        """Work before the local epochs; returns extra keyword arguments of ``LocalTrainer.train``."""
        return {}

    def reply_metrics(self, inputs: RoundInputs, result: EpochResult) -> dict[str, Any]:
        """Extra reply metrics after training (plain ints / floats)."""
        return {}


class FedProxHook(ClientHook):
    """FedProx: the proximal term ``mu/2 ||w - w_global||^2`` towards the global student as received."""

    loss_terms = ("loss_prox",)

    def before_train(self, inputs: RoundInputs) -> dict[str, Any]:
        mu = inputs.instruction.proximal_mu
        # the anchor: the global student as received (restored to fp32), before any local step
        anchor = ({k: v.detach().clone() for k, v in inputs.student.state_dict().items()} if mu > 0 else None)
        return {"proximal_mu": mu, "global_params": anchor}


class FedMASHook(ClientHook):
    """FedMAS (method.md §5): a per-class prior before training, the training state, the robust factor ρ."""

    def __init__(self) -> None:
        self.prior: np.ndarray | None = None

    def statistics_releases(self, cfg: Config) -> int:
        return statistics_releases_per_round(FEDMAS_STRATEGY, statistics_policy(cfg))  # the prior and the state

    def before_train(self, inputs: RoundInputs) -> dict[str, Any]:
        if inputs.dp is None:
            self.prior = class_rep_prior(inputs.student, inputs.teacher, inputs.prompt, inputs.data.train, inputs.cfg,
                                         inputs.device)
        elif statistics_policy(inputs.cfg) == "noised":  # step 1, released by the Gaussian mechanism
            self.prior, _ = inputs.dp.private_class_rep_prior(inputs.data.train, inputs.student)
        return {"track_class_rep": True}

    def reply_metrics(self, inputs: RoundInputs, result: EpochResult) -> dict[str, Any]:
        rho = None
        if self.prior is not None and result.class_rep_sum is not None and result.class_seen is not None:
            seen = result.class_seen.astype(np.float64)
            state = np.divide(result.class_rep_sum, seen, out=np.full_like(result.class_rep_sum, np.nan),
                              where=seen > 0)
            rule = inputs.instruction.fedmas_rule or inputs.cfg.federation.fedmas_rule
            rho = float(fedmas_robust_factor(self.prior, state, rule))
        else:
            logger.info("%s round %d: FedMAS statistics withheld (privacy.statistics); robust factor not sent",
                        inputs.node, inputs.server_round)
        if rho is None and inputs.dp is None:
            return {}
        return {ROBUST_FACTOR_KEY: float(rho if rho is not None else 0.0)}  # DP: 0.0 = withheld, FedAvg fallback


CLIENT_HOOKS: dict[str, type[ClientHook]] = {
    "fedavg": ClientHook,
    "fedprox": FedProxHook,
    "fedmas": FedMASHook,
    "class_balanced": ClientHook,  # its per-class counts: fopro_kd/federation/strategies.py:needs_class_counts
    "median": ClientHook,
    "trimmed_mean": ClientHook,
}
"""Site side of every strategy, by the name of its server class (``server/strategies/STRATEGIES``)."""


def client_hook(strategy: str) -> ClientHook:
    """A fresh hook for one round of ``strategy``; ``ValueError`` naming the strategy when none is registered."""
    if strategy not in CLIENT_HOOKS:
        raise ValueError(f"federation.strategy {strategy!r} has no client hook (client/strategy_hooks.py); "
                         f"registered: {sorted(CLIENT_HOOKS)}")
    return CLIENT_HOOKS[strategy]()
