"""The FedMAS robust factor (method.md §5, step 3): computed by each site, weighted by the server.

Both apps need the rule names and the formula (the site computes ρ_k from its own prior and
training state; the server validates the rule it sends), so they live here, Flower-free.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FEDMAS_RULES", "check_fedmas_rule", "fedmas_robust_factor"]

FEDMAS_RULES = ("mas", "mas_inv", "mas_DRW")


def check_fedmas_rule(rule: str) -> None:
    if rule not in FEDMAS_RULES:
        raise ValueError(f"unknown FedMAS rule {rule!r}; valid rules are {list(FEDMAS_RULES)} (case-sensitive)")


def fedmas_robust_factor(prior: np.ndarray, state: np.ndarray, rule: str) -> float:
    """Robust factor ρ_k of one client (method.md §5, step 3).

    ρ = Σ_{c∈S} (p_c / Σ_{c'∈S} p_{c'}) · (s_c / Σ_{c'∈S} s_{c'}),

    where ``prior`` p and ``state`` s are the client's per-class mean losses (length C) and
    S = the classes whose prior is finite and > 0 and whose state is finite. For
    ``mas_inv`` s_c is replaced by 1/s_c on S; classes with s_c = 0 (present in the prior but
    never seen during training) have no inverse and are removed from S (zero-guard).
    ``mas_DRW`` uses the plain ``mas`` factor (its difference is server-side).

    Returns 0.0 when S is empty or a normaliser is zero; the server treats ρ <= 0 as
    missing and falls back to FedAvg weights for that round.

    Examples
    --------
    >>> fedmas_robust_factor(np.array([1.0, 2.0, 0.0, 1.0]), np.array([2.0, 1.0, 5.0, 1.0]), "mas")
    0.3125
    >>> round(fedmas_robust_factor(np.array([1.0, 2.0, 0.0, 1.0]), np.array([2.0, 1.0, 5.0, 1.0]), "mas_inv"), 12)
    0.35
    """
    check_fedmas_rule(rule)
    p = np.asarray(prior, dtype=np.float64).reshape(-1)
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    if p.shape != s.shape:
        raise ValueError(f"prior and state must have the same length (one value per class), got {p.size} and {s.size}")
    if (np.isfinite(p) & (p < 0)).any() or (np.isfinite(s) & (s < 0)).any():
        raise ValueError("prior and state are mean losses and must be >= 0 (or NaN for classes without samples)")
    support = np.isfinite(p) & (p > 0) & np.isfinite(s)
    if rule == "mas_inv":
        support &= s > 0
    if not support.any():
        return 0.0
    p_s = p[support]
    s_s = 1.0 / s[support] if rule == "mas_inv" else s[support]
    p_sum, s_sum = p_s.sum(), s_s.sum()
    if not (p_sum > 0 and s_sum > 0 and math.isfinite(p_sum) and math.isfinite(s_sum)):
        return 0.0
    rho = float(np.dot(p_s / p_sum, s_s / s_sum))
    return rho if math.isfinite(rho) else 0.0
