"""Central (user-level) DP at the server: DP-FedAvg with a fixed denominator, pure numpy.

A strategy wrapper (server/strategies/central_dp.py) calls these on the ``reply − global``
updates. The estimator is the one of McMahan et al., ICLR 2018 ("Learning differentially
private recurrent language models", the fixed-denominator estimator f̃_f):

    Δ = ( Σ_{k∈S} w_k · clip_C(Δ_k) + N(0, (σ · ŵ · C)² I) ) / W

with S the clients sampled this round (Poisson, rate q), public weights 0 ≤ w_k ≤ ŵ that do
not depend on any other client, and a denominator **W fixed before the run**
(:func:`fixed_denominator`: W = q · N · ŵ, N the planned number of hospitals). Nothing in W
depends on who replied, so the estimator's L2 sensitivity is exact and small
(:func:`central_sensitivity`):

* add / remove one hospital (the adjacency of Opacus' subsampled-Gaussian accountant): the sum
  gains or loses one term of norm ≤ ŵ·C, so ‖Δ(D) − Δ(D')‖ ≤ ŵ·C / W;
* replace one hospital: one term changes from a to b, ‖a − b‖ ≤ 2ŵ·C, so ≤ 2ŵ·C / W.

The noise std on the aggregate is σ · ŵ·C / W (:func:`central_noise_std`), i.e. σ times the
add/remove sensitivity: σ is the noise multiplier of the accountant event (σ, q, 1). The old
rule σ · max_k α_k · C with α renormalised over the replying clients was wrong: removing one
client rescales all the others (up to 2·α_k·C, more when α came from private statistics).

* :func:`clip_update`: the L2 norm is taken over the **floating** arrays only; integer and
  boolean arrays (e.g. BatchNorm's ``num_batches_tracked``) are left out of the norm and
  returned unchanged (libraries.md §1.9). The DP student (GroupNorm) has no such buffers; any
  integer array that is still sent is outside the guarantee.
* :func:`dp_fedavg_estimate`: Σ w_k clip(Δ_k) / W without the noise (what the tests compare on
  neighbouring rounds).
* :func:`central_epsilon`: ε of ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism
  at client sampling rate ``q`` (``q = 1``: every hospital every round, no amplification),
  composed by Opacus' RDP (or PRV) accountant, for add/remove-one-hospital adjacency.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fopro_kd.privacy.accounting import epsilon_of_history

__all__ = [
    "ADJACENCIES",
    "add_central_noise",
    "central_epsilon",
    "central_noise_std",
    "central_sensitivity",
    "check_weights",
    "clip_update",
    "dp_fedavg_estimate",
    "fixed_denominator",
    "replace_one_bound",
    "update_norm",
]


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


ADJACENCIES = ("add-remove", "replace")
"""Neighbouring federations: one hospital added or removed (the accountant's), or one replaced."""


def fixed_denominator(population: int, sample_rate: float, weight_cap: float = 1.0) -> float:
    """W = q · N · ŵ: the expected total weight of a round when each of the N hospitals has weight ŵ.

    N (``federation.num_clients``), q (``federation.fraction_train``) and ŵ are configuration,
    fixed before the first round: W must not depend on who is sampled or who replies, or
    one hospital's presence rescales every other contribution. With uniform weights w_k = ŵ = 1
    and every sampled hospital replying, the estimator is unbiased for the mean update.
    """
    if isinstance(population, bool) or int(population) != population or population < 1:
        raise ValueError(f"population must be an int >= 1 (the planned number of hospitals), got {population!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (weight_cap > 0 and math.isfinite(weight_cap)):
        raise ValueError(f"weight_cap must be a finite number > 0, got {weight_cap!r}")
    return float(sample_rate) * int(population) * float(weight_cap)


def central_sensitivity(clip_norm: float, denominator: float, weight_cap: float = 1.0,
                        adjacency: str = "add-remove") -> float:
    """L2 sensitivity of Σ w_k clip(Δ_k) / W: ŵ·C/W (add/remove one hospital) or 2ŵ·C/W (replace one).

    Proof: W is a constant; the sum has one term per participating hospital, each of norm
    ≤ w_k·‖clip(Δ_k)‖ ≤ ŵ·C and depending on that hospital alone. Adding or removing a hospital
    adds or removes one term; replacing it changes one term a → b with ‖a − b‖ ≤ 2ŵ·C.
    """
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {list(ADJACENCIES)}, got {adjacency!r}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator!r}")
    if not weight_cap > 0:
        raise ValueError(f"weight_cap must be > 0, got {weight_cap!r}")
    factor = 1.0 if adjacency == "add-remove" else 2.0
    return factor * float(weight_cap) * float(clip_norm) / float(denominator)


def central_noise_std(clip_norm: float, denominator: float, noise_multiplier: float, weight_cap: float = 1.0) -> float:
    """Noise std on the aggregate, σ · ŵ·C / W: σ times the add/remove sensitivity.

    σ is then exactly the noise multiplier of the accountant's subsampled Gaussian event
    (σ, q, 1), whose adjacency is add/remove one hospital. Independent of the replies.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    return float(noise_multiplier) * central_sensitivity(clip_norm, denominator, weight_cap, "add-remove")


def check_weights(weights: Sequence[float] | np.ndarray, weight_cap: float = 1.0) -> np.ndarray:
    """Weights as float64, each finite and in [0, ŵ]; ``ValueError`` otherwise (they are *not* normalised)."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w > weight_cap * (1 + 1e-12)):
        raise ValueError(
            f"DP-FedAvg weights must be finite and in [0, {weight_cap:g}] (the public cap), got {w.tolist()}"
        )
    return w


def dp_fedavg_estimate(
    template: Mapping[str, np.ndarray],
    updates: Iterable[Mapping[str, np.ndarray]],
    weights: Sequence[float] | np.ndarray,
    clip_norm: float,
    denominator: float,
    weight_cap: float = 1.0,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Σ_k w_k · clip_C(Δ_k) / W (float64, no noise) and the pre-clipping norm of each update.

    ``template`` gives the keys and shapes (the floating arrays of the global model), so zero
    updates give the zero estimate: a round in which nobody was sampled or nobody replied
    validly still has a well-defined output (the noise alone). ``updates`` may be a generator
    (one decoded reply at a time).
    """
    w = check_weights(weights, weight_cap)
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator!r}")
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in template.items()}
    norms: list[float] = []
    for update in updates:
        if len(norms) >= w.size:
            raise ValueError(f"{w.size} weights for more updates")
        clipped, norm = clip_update({k: np.asarray(update[k], dtype=np.float64) for k in total}, clip_norm)
        a = w[len(norms)]
        norms.append(float(norm))
        for k in total:
            total[k] += a * clipped[k]
    if len(norms) != w.size:
        raise ValueError(f"{w.size} weights for {len(norms)} updates")
    return {k: v / float(denominator) for k, v in total.items()}, norms


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

    ``noise_multiplier`` is σ of :func:`central_noise_std` (noise std / add-remove sensitivity);
    ``sample_rate`` the probability q with which each hospital independently takes part in a
    round (Poisson sampling; 1.0 for full participation: no amplification). The adjacency is
    add/remove one hospital; :func:`replace_one_bound` converts to replace-one.
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


def replace_one_bound(epsilon: float, delta: float) -> tuple[float, float]:
    """(ε, δ) for replace-one-hospital adjacency from an add/remove (ε, δ): (2ε, (1 + e^ε)·δ).

    Replacing a hospital is removing it and adding another: two add/remove steps D ~ D₁ ~ D'.
    Chaining them, P[M(D) ∈ S] ≤ e^ε (e^ε P[M(D') ∈ S] + δ) + δ = e^{2ε} P[M(D') ∈ S] + (1 + e^ε) δ
    (group privacy for a group of 2).
    """
    if not epsilon >= 0 or not 0 <= delta < 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1), got {epsilon!r}, {delta!r}")
    return 2.0 * float(epsilon), min(1.0, (1.0 + math.exp(min(float(epsilon), 700.0))) * float(delta))
