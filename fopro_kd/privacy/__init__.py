"""Differential privacy for fopro-kd (docs/privacy.md).

* ``local`` mode (sample-level DP-SGD per hospital): :class:`~fopro_kd.privacy.local_dp.DPContext`,
  created by :class:`~fopro_kd.training.trainer.LocalTrainer` itself; model surgery in
  :mod:`~fopro_kd.privacy.surgery` (the DP student is built by
  :func:`fopro_kd.training.components.build_dp_student`); Poisson batches in :mod:`~fopro_kd.privacy.sampling`;
  accounting and budget checks in :mod:`~fopro_kd.privacy.accounting`; statistics in
  :mod:`~fopro_kd.privacy.statistics`.
* ``central`` mode (user-level DP at the server, DP-FedAvg with a fixed denominator): pure numpy helpers in
  :mod:`~fopro_kd.privacy.central`.

Importing this package does not import Opacus; the submodules that need it import it lazily.
"""

from __future__ import annotations

from fopro_kd.privacy.accounting import (
    PrivacyBudgetExhausted,
    budget_reason,
    derive_noise_multiplier,
    epsilon_of_history,
    make_accountant,
    sample_rate_for,
    would_exceed_budget,
)
from fopro_kd.privacy.central import (
    add_central_noise,
    central_epsilon,
    central_noise_std,
    central_sensitivity,
    clip_update,
    dp_fedavg_estimate,
    fixed_denominator,
    update_norm,
)
from fopro_kd.privacy.statistics import privatize_class_counts, privatize_statistics, statistics_event, statistics_policy

__all__ = [
    "PrivacyBudgetExhausted",
    "add_central_noise",
    "budget_reason",
    "central_epsilon",
    "central_noise_std",
    "central_sensitivity",
    "clip_update",
    "derive_noise_multiplier",
    "dp_fedavg_estimate",
    "epsilon_of_history",
    "fixed_denominator",
    "make_accountant",
    "make_student_private_compatible",
    "privatize_class_counts",
    "privatize_statistics",
    "sample_rate_for",
    "statistics_event",
    "statistics_policy",
    "update_norm",
    "would_exceed_budget",
]


def __getattr__(name: str):
    if name == "make_student_private_compatible":  # lazily: surgery imports timm
        from fopro_kd.privacy import surgery

        return getattr(surgery, name)
    raise AttributeError(name)
