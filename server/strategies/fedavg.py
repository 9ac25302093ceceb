"""FedAvg (McMahan et al., 2017, arXiv:1602.05629) on the validated base.

α_k = m_k / Σ_j m_j with m_k the client's ``num-examples`` (training samples seen,
not batches). Same rule as ``fedavg`` in method.md §5 (the original code's ``avg``).
"""

from __future__ import annotations

from typing import ClassVar

from server.strategies.base import ValidatedWeightedAvg

__all__ = ["FedAvgStrategy"]


class FedAvgStrategy(ValidatedWeightedAvg):
    """Sample-size weighted averaging: α_k = m_k / Σ_j m_j (``num-examples``).

    Examples
    --------
    Two clients with 10 and 30 samples get weights 0.25 and 0.75.
    """

    name: ClassVar[str] = "fedavg"
