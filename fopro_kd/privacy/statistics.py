"""Statistics that leave a hospital under DP: the Gaussian mechanism, or nothing.

Class counts, FedMAS per-class priors / states and the robust factor are computed from
private data. In DP mode each is either

* ``"noised"``: released through the Gaussian mechanism with an L2 sensitivity bounded by
  construction (``clip``) and accounted in the *same* accountant history as DP-SGD, as an
  event ``(σ_stat, 1.0, 1)`` (every example counted once, no subsampling); or
* ``"withheld"``: not sent at all (the server falls back to statistic-free aggregation).

Raw values are never returned by these functions: :func:`privatize_statistics` refuses a
zero noise multiplier.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from fopro_kd.config import Config
from fopro_kd.run_plan import resolve_run_plan

__all__ = [
    "PER_ROUND_STATISTICS_RELEASES",
    "statistics_releases_per_round",
    "REP_LOSS_BOUND",
    "class_means_from_release",
    "privatize_class_counts",
    "privatize_statistics",
    "statistics_event",
    "statistics_policy",
]

REP_LOSS_BOUND = 4.0
"""ℓ_rep = 2 − 2·cos(u, t) lies in [0, 4]: the per-example bound of FedMAS' per-class sums."""


PER_ROUND_STATISTICS_RELEASES = {"fedmas": 2}
"""Per-class statistics a site releases each round for a strategy (FedMAS: its prior before training and its
state after), Gaussian-noised and charged under local DP with ``privacy.statistics: noised``. Read by the budget
plan (fopro_kd/privacy/local_dp.py) and by the strategy's client hook (client/strategy_hooks.py)."""


def statistics_releases_per_round(strategy: str, policy: str) -> int:
    """Noised per-class statistics releases per round of ``strategy`` (0 when statistics are withheld)."""
    return PER_ROUND_STATISTICS_RELEASES.get(strategy, 0) if policy == "noised" else 0


def statistics_policy(cfg: Config) -> Literal["noised", "withheld", "raw"]:
    """What a hospital does with statistics that would leave it.

    ``privacy.statistics`` (``"noised"`` or ``"withheld"``) whenever DP is on; ``"raw"`` only
    when ``privacy.mode`` is ``off`` (no guarantee is claimed then).
    """
    if not resolve_run_plan(cfg).any_dp:
        return "raw"
    return cfg.privacy.statistics


def statistics_event(cfg: Config) -> tuple[float, float, int]:
    """The accountant event of one statistics release: ``(σ_stat, 1.0, 1)``."""
    return (float(cfg.privacy.statistics_noise_multiplier), 1.0, 1)


def privatize_statistics(
    values: np.ndarray | list[float],
    clip: float,
    noise_multiplier: float,
    generator: np.random.Generator | torch.Generator,
) -> np.ndarray:
    """Gaussian mechanism: ``values + N(0, (noise_multiplier · clip)²)`` per coordinate, float64.

    ``clip`` must bound the L2 change of the whole ``values`` vector when one example is added
    or removed (e.g. 1 for a class-count histogram, where each example adds 1 to one bin).
    The caller accounts the release (``(noise_multiplier, 1.0, 1)``) with its accountant;
    :meth:`fopro_kd.privacy.local_dp.DPContext.release_statistics` does both.

    Parameters
    ----------
    values : the exact statistic (any shape).
    clip : L2 sensitivity bound (> 0).
    noise_multiplier : σ (> 0); the noise std is σ · clip.
    generator : a *secretly* seeded ``numpy.random.Generator`` or CPU ``torch.Generator``.
    """
    raw = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(raw)):
        raise ValueError("statistics to privatize must be finite")
    if not clip > 0:
        raise ValueError(f"clip (the L2 sensitivity bound) must be > 0, got {clip!r}")
    if not noise_multiplier > 0:
        raise ValueError(
            f"noise_multiplier must be > 0 (a zero multiplier would release the raw statistic), got {noise_multiplier!r}"
        )
    std = float(noise_multiplier) * float(clip)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(raw.shape, generator=generator, dtype=torch.float64).numpy() * std
    elif isinstance(generator, np.random.Generator):
        noise = generator.normal(0.0, std, size=raw.shape)
    else:
        raise TypeError(f"generator must be a numpy Generator or a torch Generator, got {type(generator).__name__}")
    return raw + noise


def privatize_class_counts(counts: np.ndarray, noise_multiplier: float, generator) -> np.ndarray:
    """Noisy class histogram (sensitivity 1: one example adds 1 to one class)."""
    return privatize_statistics(np.asarray(counts, dtype=np.float64), 1.0, noise_multiplier, generator)


def class_means_from_release(noisy: np.ndarray, num_classes: int, value_bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Post-process a released ``[sums, counts · value_bound]`` vector into (means, counts).

    Means are clamped to ``[0, value_bound]``; classes whose noisy count is below 1 get NaN
    (no reliable estimate), as a class without samples does in the non-private code.
    """
    noisy = np.asarray(noisy, dtype=np.float64).reshape(-1)
    if noisy.size != 2 * num_classes:
        raise ValueError(f"expected {2 * num_classes} released values (sums and counts), got {noisy.size}")
    sums = noisy[:num_classes]
    counts = noisy[num_classes:] / value_bound
    means = np.full(num_classes, np.nan)
    ok = counts >= 1.0
    means[ok] = np.clip(sums[ok] / counts[ok], 0.0, value_bound)
    return means, np.clip(counts, 0.0, None)
