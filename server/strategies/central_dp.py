"""Central (user-level) DP at the server: clip every client's update, noise the weighted aggregate.

Used by :class:`~server.strategies.base.ValidatedWeightedAvg` when ``privacy.mode: central``
(docs/privacy.md §3). Per round, after the replies were validated and the strategy chose its
weights α_k (normalised to sum to 1):

1. Δ_k = θ_k − θ (the client's reply minus the global arrays sent this round), **floating
   arrays only**; Δ_k is clipped to L2 norm ≤ C = ``privacy.central_clip_norm`` with
   :func:`fopro_kd.privacy.clip_update` (integer / boolean arrays neither enter the norm nor
   are clipped; they are merged by the base rule, element-wise max, and are outside the
   guarantee — the DP GroupNorm student has none);
2. Δ = Σ_k α_k clip(Δ_k) with the *strategy's* weights (FedAvg, FedMAS, class-balanced ...);
3. Δ += N(0, s²) on every floating coordinate, s = :func:`~fopro_kd.privacy.central_noise_std`
   (α, C, σ) = σ · max_k α_k · C: one client's clipped update moves the weighted average by at
   most max_k α_k · C, so σ·C/m (Flower's ``DifferentialPrivacyServerSide*`` wrappers, uniform
   weights only) would under-noise the heaviest client of a non-uniform rule;
4. θ ← θ + Δ, cast back to each array's dtype.

Arrays of a frozen pretrained backbone (``student.freeze_backbone``; ``public_keys``) are public
constants: they are outside steps 1-3 and keep the value the server sent.

The noise generator is seeded from the OS (``secrets``) unless ``privacy.noise_seed`` is set
(tests only: the guarantee is then void and a warning is logged). ε is accounted over the
aggregated rounds as the subsampled Gaussian mechanism with the client sampling rate
q = sampled / available nodes of each round (Poisson sampling assumed; q = 1, exact, when every
hospital trains every round), composed with Opacus' accountant
(:func:`fopro_kd.privacy.accounting.epsilon_of_history`; equal to
:func:`fopro_kd.privacy.central_epsilon` when q is the same every round).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fopro_kd.privacy.accounting import epsilon_of_history, normalise_history
from fopro_kd.privacy.central import add_central_noise, central_noise_std, clip_update

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["CENTRAL_DP_STATE_FORMAT", "CentralDP"]

CENTRAL_DP_STATE_FORMAT = "fopro-kd-central-dp/1"


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


class CentralDP:
    """Clipping, weighted aggregation with calibrated noise, and the ε of the released models.

    Parameters
    ----------
    clip_norm : float
        C, the L2 bound of each client's update (floating arrays).
    noise_multiplier : float
        σ; the noise std on the aggregate is σ · max_k α_k · C.
    delta : float
        δ at which ε is reported.
    accountant : {"rdp", "prv"}
    noise_seed : int, optional
        Reproducible noise for tests (voids the guarantee); None draws a secret OS seed.

    Attributes
    ----------
    history : list of (σ, q, 1)
        One accountant event per round that released a noised model.
    last_norms : dict[int, float]
        Pre-clipping update norm of each aggregated node in the last round.
    last_noise_std : float
        s of the last round.
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float, accountant: str = "rdp",
                 noise_seed: int | None = None) -> None:
        if not clip_norm > 0:
            raise ValueError(f"central clip norm must be > 0, got {clip_norm!r}")
        if not noise_multiplier > 0:
            raise ValueError(f"central noise multiplier must be > 0, got {noise_multiplier!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.accountant = accountant
        if noise_seed is None:
            self.generator = np.random.default_rng(secrets.randbits(128))
        else:
            logger.warning("privacy.noise_seed is set: central DP noise is reproducible, the guarantee is void")
            self.generator = np.random.default_rng(int(noise_seed))
        self.history: list[tuple[float, float, int]] = []
        self.sample_rate: float = 1.0
        """q of the round being aggregated (set by the strategy's ``configure_train``)."""
        self.last_norms: dict[int, float] = {}
        self.last_noise_std: float = 0.0
        self.last_clipped: int = 0
        self.public_keys: frozenset[str] = frozenset()
        """State keys that no training changes (a frozen pretrained backbone, ``student.freeze_backbone``):
        they are public, so they are neither in the clipping norm nor noised, and the aggregate keeps the
        global value (noise on them would only destroy the public features)."""

    @classmethod
    def from_config(cls, cfg: Any) -> CentralDP:
        """From a full :class:`~fopro_kd.config.Config` with ``privacy.mode: central``."""
        p = cfg.privacy
        return cls(p.central_clip_norm, p.central_noise_multiplier, p.delta, p.accountant, p.noise_seed)

    # ------------------------------------------------------------------ sampling
    def set_sample_rate(self, sampled: int, available: int) -> None:
        """q = sampled / available nodes of this round (1.0 when it cannot be known)."""
        if sampled > 0 and available >= sampled:
            self.sample_rate = float(sampled) / float(available)
        else:
            self.sample_rate = 1.0

    # ------------------------------------------------------------------ aggregation
    def aggregate(
        self,
        server_round: int,
        reference: Mapping[str, np.ndarray],
        replies: Sequence[Mapping[str, np.ndarray]],
        alpha: np.ndarray,
        node_ids: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """θ + Σ α_k clip(θ_k − θ) + N(0, (σ · max α · C)²) on the floating arrays; see the module docstring.

        ``reference`` are the global arrays sent this round, ``replies`` the validated client
        arrays (same keys, shapes and dtypes), ``alpha`` their normalised weights.
        """
        if not replies:
            raise ValueError("central DP aggregation needs at least one reply")
        alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
        if alpha.shape[0] != len(replies):
            raise ValueError(f"{alpha.shape[0]} weights for {len(replies)} replies")
        alpha = alpha / alpha.sum()
        node_ids = list(node_ids) if node_ids is not None else list(range(len(replies)))
        float_keys = [k for k, v in reference.items() if _is_float(np.asarray(v)) and k not in self.public_keys]
        delta_sum = {k: np.zeros(np.asarray(reference[k]).shape, dtype=np.float64) for k in float_keys}
        self.last_norms = {}
        self.last_clipped = 0
        for node, a, values in zip(node_ids, alpha, replies):
            update = {k: np.asarray(values[k], dtype=np.float64) - np.asarray(reference[k], dtype=np.float64)
                      for k in float_keys}
            clipped, norm = clip_update(update, self.clip_norm)
            self.last_norms[int(node)] = float(norm)
            self.last_clipped += int(norm > self.clip_norm)
            for k in float_keys:
                delta_sum[k] += a * clipped[k]
        std = central_noise_std(alpha, self.clip_norm, self.noise_multiplier)
        noisy = add_central_noise(delta_sum, std, self.generator)
        out: dict[str, np.ndarray] = {}
        for key, ref in reference.items():
            ref = np.asarray(ref)
            if key in noisy:
                out[key] = (ref.astype(np.float64) + noisy[key]).astype(ref.dtype)
            elif key in self.public_keys:  # a frozen public constant: kept as sent, whatever a client replied
                out[key] = ref.copy()
            else:  # integer / boolean arrays: base rule (element-wise max), not clipped, not noised
                out[key] = np.maximum.reduce([np.asarray(v[key]) for v in replies]).astype(ref.dtype)
        self.last_noise_std = float(std)
        self.history.append((self.noise_multiplier, float(self.sample_rate), 1))
        logger.info(
            "round %s: central DP: %d/%d update(s) clipped to C=%.4g (norms %s), noise std %.4g "
            "(sigma %.4g x max weight %.4f x C), q=%.4g; central epsilon %.4f (delta %g)",
            server_round, self.last_clipped, len(replies), self.clip_norm,
            [round(n, 4) for n in self.last_norms.values()], std, self.noise_multiplier, float(alpha.max()),
            self.sample_rate, self.epsilon(), self.delta,
        )
        return out

    # ------------------------------------------------------------------ accounting
    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """ε of all noised global models released so far (0 before the first)."""
        return float(epsilon_of_history(self.history, self.delta, self.accountant))

    def metrics(self) -> dict[str, float]:
        return {
            "central_epsilon": self.epsilon(),
            "central_delta": self.delta,
            "central_noise_multiplier": self.noise_multiplier,
            "central_clip_norm": self.clip_norm,
            "central_noise_std": self.last_noise_std,
            "central_rounds": float(self.rounds),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain state for the server checkpoint (the noise generator is not kept: a resume redraws it)."""
        return {
            "format": CENTRAL_DP_STATE_FORMAT,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.history],
            "last_noise_std": float(self.last_noise_std),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.history = list(normalise_history(state.get("history", [])))
        self.last_noise_std = float(state.get("last_noise_std", 0.0))
