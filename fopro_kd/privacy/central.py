"""Central (user-level) DP at the server: clip each client's update, add calibrated Gaussian noise.

Pure numpy, no Flower: a strategy wrapper calls these on the ``reply − global`` updates.

* :func:`clip_update`: the L2 norm is taken over the **floating** arrays only; integer and
  boolean arrays (e.g. BatchNorm's ``num_batches_tracked``) are left out of the norm and
  returned unchanged (libraries.md §1.9: with Flower's wrappers they enter the norm and swamp
  it). The DP student (GroupNorm) has no such buffers; any integer array that is still sent
  is outside the guarantee.
* :func:`central_noise_std`: with aggregation weights α_k (normalised to sum 1) the weighted
  average Σ α_k Δ_k changes by at most ``max_k α_k · C`` when one client's clipped update is
  added or removed, so the noise std on the aggregate is ``σ · max_k α_k · C`` — not
  ``σ · C / m``, which is right only for uniform weights. The weights themselves must not
  depend on private data unless they are privatised too (docs/privacy.md).
* :func:`central_epsilon`: ε of ``rounds`` rounds of the subsampled Gaussian mechanism, with
  client sampling rate ``q`` (Poisson sampling assumed; ``q = 1`` when every client trains
  every round), composed across rounds by Opacus' RDP (or PRV) accountant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fopro_kd.privacy.accounting import epsilon_of_history

__all__ = ["add_central_noise", "central_epsilon", "central_noise_std", "clip_update", "update_norm"]


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over the floating arrays of ``update`` (integer / bool arrays excluded)."""
    total = 0.0
    for value in update.values():
        array = np.asarray(value)
        if _is_float(array):
            total += float(np.sum(np.square(array, dtype=np.float64)))
    return math.sqrt(total)


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the floating arrays of ``update`` so that their joint L2 norm is at most ``clip_norm``.

    Returns ``(clipped, norm_before)``. Dtypes and shapes are kept; non-floating arrays are
    copied unchanged and do not count towards the norm.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    norm = update_norm(update)
    factor = min(1.0, float(clip_norm) / norm) if norm > 0 else 1.0
    clipped: dict[str, np.ndarray] = {}
    for key, value in update.items():
        array = np.asarray(value)
        if _is_float(array):
            clipped[key] = (array.astype(np.float64) * factor).astype(array.dtype, copy=False)
        else:
            clipped[key] = array.copy()
    return clipped, norm


def _normalised_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ValueError("central_noise_std needs at least one aggregation weight")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"aggregation weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum()
    if not total > 0:
        raise ValueError("aggregation weights must not all be 0")
    return w / total


def central_noise_std(weights: Sequence[float] | np.ndarray, clip_norm: float, noise_multiplier: float) -> float:
    """Noise std for the weighted average of clipped updates: ``σ · max_k α_k · C``.

    ``weights`` are the aggregation weights of this round's clients (any positive scale; they
    are normalised). Uniform weights over m clients give ``σ · C / m``, Flower's formula.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    alpha = _normalised_weights(weights)
    return float(noise_multiplier) * float(alpha.max()) * float(clip_norm)


def add_central_noise(
    aggregate: Mapping[str, np.ndarray], std: float, generator: np.random.Generator
) -> dict[str, np.ndarray]:
    """Add N(0, std²) to every floating array of ``aggregate`` (dtypes kept; others unchanged)."""
    out: dict[str, np.ndarray] = {}
    for key, value in aggregate.items():
        array = np.asarray(value)
        if _is_float(array):
            out[key] = (array.astype(np.float64) + generator.normal(0.0, std, size=array.shape)).astype(array.dtype)
        else:
            out[key] = array.copy()
    return out


def central_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε after ``rounds`` rounds of user-level DP-FedAvg (subsampled Gaussian, composed over rounds).

    ``noise_multiplier`` is σ of :func:`central_noise_std`; ``sample_rate`` the probability that a
    client takes part in a round (1.0 for full participation: no amplification).
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return epsilon_of_history([(noise_multiplier, sample_rate, int(rounds))], delta, accountant)
