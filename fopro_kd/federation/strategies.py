"""What each aggregation strategy needs from the sites, readable without the server's strategy classes.

The client decides from the strategy *name* which extra statistics to send (per-class counts
for class-balanced weights); the server's strategy classes (server/strategies/) declare the
same fact as ``needs_class_counts``. ``tests/test_registry_names.py`` checks that the two agree
for every registered strategy, so a new strategy cannot be half-declared.
"""

from __future__ import annotations

__all__ = ["CLASS_COUNT_STRATEGIES", "FEDMAS_STRATEGY", "needs_class_counts"]

CLASS_COUNT_STRATEGIES = frozenset({"class_balanced"})
"""Strategies whose aggregation weights are computed from each site's per-class training counts."""
FEDMAS_STRATEGY = "fedmas"
"""The strategy whose sites compute and send a robust factor (fopro_kd/federation/fedmas.py)."""


def needs_class_counts(strategy: str) -> bool:
    """Whether ``strategy`` weights sites by their per-class counts (so sites share them by default)."""
    return strategy in CLASS_COUNT_STRATEGIES
