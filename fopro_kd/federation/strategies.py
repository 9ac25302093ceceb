"""What each aggregation strategy needs from the sites, readable without the server's strategy classes.

The client decides from the strategy *name* which extra statistics to send (per-class counts
for class-balanced weights); the server's strategy classes (server/strategies/) declare the
same fact as ``needs_class_counts``. ``tests/test_registry_names.py`` checks that the two agree
for every registered strategy, so a new strategy cannot be half-declared.
"""

from __future__ import annotations

__all__ = ["CLASS_COUNT_STRATEGIES", "FEDMAS_STRATEGY", "FEDPROX_STRATEGY", "PER_ROUND_STATISTICS_RELEASES",
           "needs_class_counts", "statistics_releases_per_round"]

CLASS_COUNT_STRATEGIES = frozenset({"class_balanced"})
"""Strategies whose aggregation weights are computed from each site's per-class training counts."""
FEDMAS_STRATEGY = "fedmas"
"""The strategy whose sites compute and send a robust factor (fopro_kd/federation/fedmas.py)."""
FEDPROX_STRATEGY = "fedprox"
"""The strategy whose sites add the proximal term (its loss is reported as ``loss-prox``)."""


PER_ROUND_STATISTICS_RELEASES = {FEDMAS_STRATEGY: 2}
"""Per-class statistics a site releases each round for the strategy (FedMAS: its prior before training and its
state after), Gaussian-noised and charged under local DP with ``privacy.statistics: noised``."""


def statistics_releases_per_round(strategy: str, statistics_policy: str) -> int:
    """Noised per-class statistics releases per round of ``strategy`` (0 when statistics are withheld)."""
    return PER_ROUND_STATISTICS_RELEASES.get(strategy, 0) if statistics_policy == "noised" else 0


def needs_class_counts(strategy: str) -> bool:
    """Whether ``strategy`` weights sites by their per-class counts (so sites share them by default)."""
    return strategy in CLASS_COUNT_STRATEGIES
