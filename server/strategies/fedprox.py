"""FedProx (Li et al., 2020, arXiv:1812.06127): FedAvg aggregation plus a client proximal term.

The server side is FedAvg; :meth:`FedProxStrategy.configure_train` adds
``config["proximal-mu"] = μ`` to every train instruction and the client adds
μ/2 · ‖w − w_g‖² (w_g: the global weights received this round) to its local loss.
The original FedMAS baselines use μ = 0.45 (method.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from fopro_kd.federation.wire import PROXIMAL_MU_KEY
from server.strategies.fedavg import FedAvgStrategy

__all__ = ["PROXIMAL_MU_KEY", "FedProxStrategy"]



class FedProxStrategy(FedAvgStrategy):
    """FedAvg weights; sends ``"proximal-mu"`` so clients minimise ℓ + μ/2 ‖w − w_g‖².

    Parameters
    ----------
    proximal_mu : float (default: 0.45)
        μ >= 0; 0 makes the client objective plain FedAvg.
    **kwargs
        Passed to :class:`~server.strategies.base.ValidatedWeightedAvg`.
    """

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.45, **kwargs: Any) -> None:
        if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, (int, float)) or not (
            math.isfinite(proximal_mu) and proximal_mu >= 0
        ):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu!r}")
        super().__init__(**kwargs)
        self.proximal_mu = float(proximal_mu)

    @classmethod
    def config_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {"proximal_mu": cfg.fedprox_mu}

    def summary(self) -> None:
        log(INFO, "\t├──> FedProx: proximal mu = %s", self.proximal_mu)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add ``"proximal-mu"`` to the train config, then configure as FedAvg."""
        config = ConfigRecord() if config is None else config
        config[PROXIMAL_MU_KEY] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)
