"""Central (user-level) DP at the server: DP-FedAvg with a fixed denominator and Poisson client sampling.

Used by :class:`~server.strategies.base.ValidatedWeightedAvg` when ``privacy.mode: central``
(docs/privacy.md §3). The mechanism is McMahan et al., ICLR 2018 ("Learning differentially
private recurrent language models"), with the fixed-denominator estimator:

1. **Sampling** (the strategy's ``configure_train``): every hospital of the grid takes part
   independently with probability q = ``federation.fraction_train``
   (:meth:`CentralDP.sample_clients`, a secret RNG; Flower's own fixed-size ``random.sample``
   is not used). A round may sample nobody: it still releases (step 4) and is accounted.
2. Δ_k = θ_k − θ (reply minus the global arrays sent this round), **floating arrays only**,
   clipped to L2 norm ≤ C = ``privacy.central_clip_norm``
   (:func:`fopro_kd.privacy.central.clip_update`). Integer / boolean arrays are merged by the
   base rule (element-wise max) and are outside the guarantee (the DP GroupNorm student has none).
3. Δ = Σ_k w_k clip(Δ_k) / W with **public uniform weights** w_k = ŵ = 1 and W = q · N fixed
   before the run (N = ``federation.num_clients``, :func:`~fopro_kd.privacy.central.fixed_denominator`).
   A sampled hospital that fails, sends an invalid reply or none contributes 0. Strategies
   whose weights come from private statistics (FedMAS ρ, class-balanced counts) are refused
   (:meth:`ValidatedWeightedAvg.central_dp` setter); FedAvg / FedProx do not use their
   ``num-examples`` weights here.
4. Δ += N(0, s²) on every floating coordinate, s = σ · ŵC/W
   (:func:`~fopro_kd.privacy.central.central_noise_std`), where ŵC/W is the L2 sensitivity of
   step 3 for add/remove one hospital (:attr:`CentralDP.sensitivity`; 2ŵC/W for replace-one);
   θ ← θ + Δ, cast back to each array's dtype. **Every round releases**, whatever the number of
   valid replies (``federation.min_valid_replies`` does not apply): skipping a round on the
   number of replies would be a release that depends on the data.

Arrays of a frozen pretrained backbone (``student.freeze_backbone``; :attr:`CentralDP.public_keys`)
are public constants: they are outside steps 2-4 and keep the value the server sent.

Accounting: one event (σ, q, 1) per released round, composed by Opacus' accountant
(:func:`fopro_kd.privacy.accounting.epsilon_of_history`) = :func:`fopro_kd.privacy.central_epsilon`
(σ, q, rounds, δ); the accountant's adjacency is add/remove one hospital, which is what s is
calibrated to. The amplification by q assumes the sample stays secret: the run directory
records who took part (weights, bytes, failures), so for a reader of it the bound is
:meth:`CentralDP.epsilon_unamplified` (q = 1). Per-client update norms are kept in memory only
(:attr:`CentralDP.last_norms`, for tests), never logged or written.

The noise and sampling generators are seeded from the OS (``secrets``) unless
``privacy.noise_seed`` is set (tests only: the guarantee is then void and a warning is logged).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fopro_kd.privacy.accounting import epsilon_of_history, normalise_history
from fopro_kd.privacy.central import (
    add_central_noise,
    central_noise_std,
    central_sensitivity,
    check_weights,
    dp_fedavg_estimate,
    fixed_denominator,
    replace_one_bound,
)

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["CENTRAL_DP_STATE_FORMAT", "CLIENT_SAMPLING", "CentralDP"]

CENTRAL_DP_STATE_FORMAT = "fopro-kd-central-dp/2"
CLIENT_SAMPLING = "poisson"
"""How clients are sampled under central DP: each independently with probability q (secret RNG)."""
ADJACENCY = "add-remove"
"""The neighbouring relation the accountant (and so the noise calibration) assumes: one hospital added or removed."""


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


class CentralDP:
    """Poisson client sampling, DP-FedAvg with a fixed denominator, calibrated noise and the ε of the releases.

    Parameters
    ----------
    clip_norm : float
        C, the L2 bound of each client's update (floating arrays).
    noise_multiplier : float
        σ; the noise std on the aggregate is σ · ŵC/W (σ times the add/remove sensitivity).
    delta : float
        δ at which ε is reported.
    accountant : {"rdp", "prv"}
    noise_seed : int, optional
        Reproducible noise and sampling for tests (voids the guarantee); None draws a secret OS seed.
    population : int
        N, the planned number of hospitals (``federation.num_clients``), fixed before the run.
    sample_rate : float
        q, the probability with which each hospital takes part in a round (``federation.fraction_train``).

    Attributes
    ----------
    weight_cap : float
        ŵ = 1: the weights are uniform, w_k = 1 for every participating hospital.
    denominator : float
        W = q · N · ŵ.
    sensitivity : float
        ŵC/W, the L2 sensitivity of the estimator for add/remove one hospital.
    noise_std : float
        σ · sensitivity.
    history : list of (σ, q, 1)
        One accountant event per released round.
    last_norms : dict[int, float]
        Pre-clipping update norm of each contributing node in the last round (memory only: outside
        the guarantee, never logged or written).
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float, accountant: str = "rdp",
                 noise_seed: int | None = None, *, population: int, sample_rate: float = 1.0) -> None:
        if not clip_norm > 0:
            raise ValueError(f"central clip norm must be > 0, got {clip_norm!r}")
        if not noise_multiplier > 0:
            raise ValueError(f"central noise multiplier must be > 0, got {noise_multiplier!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.accountant = accountant
        self.population = int(population)
        self.sample_rate = float(sample_rate)
        self.weight_cap = 1.0
        self.denominator = fixed_denominator(self.population, self.sample_rate, self.weight_cap)
        self.sensitivity = central_sensitivity(self.clip_norm, self.denominator, self.weight_cap, ADJACENCY)
        self.noise_std = central_noise_std(self.clip_norm, self.denominator, self.noise_multiplier, self.weight_cap)
        if noise_seed is None:
            seed = np.random.SeedSequence(secrets.randbits(128))
        else:
            logger.warning("privacy.noise_seed is set: central DP noise and client sampling are reproducible, "
                           "the guarantee is void")
            seed = np.random.SeedSequence(int(noise_seed))
        noise_seed_seq, sampling_seed_seq = seed.spawn(2)
        self.generator = np.random.default_rng(noise_seed_seq)
        """Noise of step 4."""
        self.sampling_generator = np.random.default_rng(sampling_seed_seq)
        """Poisson client sampling of step 1 (kept apart from the noise, both secret)."""
        self.history: list[tuple[float, float, int]] = []
        self.last_norms: dict[int, float] = {}
        self.last_noise_std: float = 0.0
        self.last_clipped: int = 0
        self.last_sampled: int = 0
        self.public_keys: frozenset[str] = frozenset()
        """State keys that no training changes (a frozen pretrained backbone, ``student.freeze_backbone``):
        they are public, so they are neither in the clipping norm nor noised, and the aggregate keeps the
        global value (noise on them would only destroy the public features)."""

    @classmethod
    def from_config(cls, cfg: Any) -> CentralDP:
        """From a full :class:`~fopro_kd.config.Config` with ``privacy.mode: central``.

        N = ``federation.num_clients`` and q = ``federation.fraction_train`` are configuration,
        so W is fixed before the first round.
        """
        p, fed = cfg.privacy, cfg.federation
        return cls(p.central_clip_norm, p.central_noise_multiplier, p.delta, p.accountant, p.noise_seed,
                   population=fed.num_clients, sample_rate=fed.fraction_train)

    # ------------------------------------------------------------------ sampling
    def sample_clients(self, node_ids: Iterable[int]) -> list[int]:
        """Poisson sampling: each node independently with probability q (secret RNG); may return [].

        The nodes are sorted first, so with a fixed ``noise_seed`` the sample does not depend on
        the order in which the grid lists them.
        """
        nodes = sorted(int(n) for n in node_ids)
        if self.sample_rate >= 1.0:
            chosen = nodes
        else:
            draws = self.sampling_generator.random(len(nodes))
            chosen = [n for n, u in zip(nodes, draws) if u < self.sample_rate]
        self.last_sampled = len(chosen)
        if len(nodes) != self.population:
            logger.warning(
                "central DP: the grid has %d node(s) but federation.num_clients is %d; the denominator W = q x N = %.4g "
                "stays fixed (the guarantee holds; the average is scaled by the planned, not the actual, population)",
                len(nodes), self.population, self.denominator,
            )
        return chosen

    # ------------------------------------------------------------------ weights
    def client_weights(self, metrics: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Public weights w_k = ŵ = 1 for every valid reply: nothing a client reports enters the weight."""
        return np.full(len(metrics), self.weight_cap, dtype=np.float64)

    # ------------------------------------------------------------------ aggregation
    def aggregate(
        self,
        server_round: int,
        reference: Mapping[str, np.ndarray],
        replies: Iterable[Mapping[str, np.ndarray]],
        weights: Sequence[float] | np.ndarray,
        node_ids: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """θ + (Σ w_k clip(θ_k − θ) + N(0, (σŵC)²)) / W on the private floating arrays; see the module docstring.

        ``reference`` are the global arrays sent this round, ``replies`` the validated client
        arrays (same keys, shapes and dtypes; may be empty or a generator), ``weights`` their
        public weights in [0, ŵ] (not normalised: W is fixed).
        """
        w = check_weights(weights, self.weight_cap)
        node_ids = list(node_ids) if node_ids is not None else list(range(w.size))
        if len(node_ids) != w.size:
            raise ValueError(f"{w.size} weights for {len(node_ids)} node ids")
        private_float = {k: np.asarray(v) for k, v in reference.items()
                         if _is_float(np.asarray(v)) and k not in self.public_keys}
        integer_values: dict[str, list[np.ndarray]] = {
            k: [] for k, v in reference.items() if not _is_float(np.asarray(v)) and k not in self.public_keys
        }

        def updates() -> Iterable[dict[str, np.ndarray]]:
            for values in replies:
                for key in integer_values:
                    integer_values[key].append(np.asarray(values[key]))
                yield {k: np.asarray(values[k], dtype=np.float64) - ref.astype(np.float64)
                       for k, ref in private_float.items()}

        estimate, norms = dp_fedavg_estimate(private_float, updates(), w, self.clip_norm, self.denominator,
                                             self.weight_cap)
        self.last_norms = {int(n): float(v) for n, v in zip(node_ids, norms)}
        self.last_clipped = sum(int(v > self.clip_norm) for v in norms)
        noisy = add_central_noise(estimate, self.noise_std, self.generator)
        out: dict[str, np.ndarray] = {}
        for key, ref in reference.items():
            ref = np.asarray(ref)
            if key in noisy:
                out[key] = (ref.astype(np.float64) + noisy[key]).astype(ref.dtype)
            elif key in self.public_keys or not integer_values.get(key):
                # a frozen public constant (kept as sent, whatever a client replied), or an integer
                # array in a round without contributions
                out[key] = ref.copy()
            else:  # integer / boolean arrays: base rule (element-wise max), not clipped, not noised
                out[key] = np.maximum.reduce(integer_values[key]).astype(ref.dtype)
        self.last_noise_std = float(self.noise_std)
        self.history.append((self.noise_multiplier, float(self.sample_rate), 1))
        # no per-client norms and no clipped count here: both are outside the guarantee
        logger.info(
            "round %s: central DP released the noised aggregate (DP-FedAvg, fixed W = %.4g, C = %.4g, sensitivity "
            "%.4g, noise std %.4g = sigma %.4g x sensitivity, Poisson q = %.4g); central epsilon %.4f (delta %g)",
            server_round, self.denominator, self.clip_norm, self.sensitivity, self.noise_std, self.noise_multiplier,
            self.sample_rate, self.epsilon(), self.delta,
        )
        return out

    # ------------------------------------------------------------------ accounting
    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """ε (add/remove one hospital) of all noised global models released so far (0 before the first)."""
        return float(epsilon_of_history(self.history, self.delta, self.accountant))

    def epsilon_unamplified(self) -> float:
        """ε of the same releases without amplification by sampling (q = 1): the bound for whoever knows the sample."""
        return float(epsilon_of_history([(s, 1.0, n) for s, _, n in self.history], self.delta, self.accountant))

    def summary(self) -> dict[str, Any]:
        """``metrics.json`` → ``privacy.central``: what the released models are private against, and how."""
        eps = self.epsilon()
        eps_replace, delta_replace = replace_one_bound(eps, self.delta)
        return {
            "estimator": "dp-fedavg-fixed-denominator",
            "adjacency": ADJACENCY,
            "weights": "uniform",
            "weight_cap": self.weight_cap,
            "population": self.population,
            "denominator": self.denominator,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": self.sensitivity,
            "sensitivity_replace_one": central_sensitivity(self.clip_norm, self.denominator, self.weight_cap,
                                                           "replace"),
            "noise_std": self.noise_std,
            "client_sampling": CLIENT_SAMPLING,
            "sample_rate": self.sample_rate,
            "rounds": self.rounds,
            "epsilon": eps,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon_replace_one": eps_replace,
            "delta_replace_one": delta_replace,
            "epsilon_if_sample_known": self.epsilon_unamplified(),
        }

    def metrics(self) -> dict[str, float]:
        return {
            "central_epsilon": self.epsilon(),
            "central_delta": self.delta,
            "central_noise_multiplier": self.noise_multiplier,
            "central_clip_norm": self.clip_norm,
            "central_noise_std": self.last_noise_std,
            "central_sensitivity": self.sensitivity,
            "central_rounds": float(self.rounds),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain state for the server checkpoint (the generators are not kept: a resume redraws them)."""
        return {
            "format": CENTRAL_DP_STATE_FORMAT,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.history],
            "last_noise_std": float(self.last_noise_std),
            "denominator": float(self.denominator),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.history = list(normalise_history(state.get("history", [])))
        self.last_noise_std = float(state.get("last_noise_std", 0.0))
