"""Classification losses for long-tailed data, the representation loss and the EKD objective.

Every classification loss is registered by the name used in ``train.loss`` (see
:class:`fopro_kd.config.TrainConfig`) and is built from the *training* class counts of the
client / centralised training set (method.md §3.3)::

    loss = build_classification_loss("bsm", class_counts, cfg.train)
    value = loss(logits, targets)          # scalar mean over the batch
    per_sample = loss.per_sample(logits, targets)   # (B,), for per-class statistics and DP

Losses whose behaviour depends on the schedule (LDAM-DRW) switch in
:meth:`ClassificationLoss.set_epoch`; for all others it is a no-op. The federated trainer
calls it with rounds instead of epochs.

All class priors are ``π_c = n_c / N``; an absent class (``n_c = 0``) gets the prior
``1e-12`` inside the logarithm, so losses stay finite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fopro_kd.config import TrainConfig

__all__ = [
    "LOSSES",
    "PRIOR_EPS",
    "DRW_BETA",
    "ClassificationLoss",
    "CrossEntropyLoss",
    "BalancedSoftmaxLoss",
    "LogitAdjustedLoss",
    "LDAMLoss",
    "FocalLoss",
    "EKDLoss",
    "build_ekd_loss",
    "register_loss",
    "list_losses",
    "build_classification_loss",
    "representation_loss",
    "class_balanced_weights",
    "class_priors",
]

PRIOR_EPS: float = 1e-12
"""Added to ``π_c`` inside ``log`` so that absent classes get a tiny prior (method.md §3.3)."""

DRW_BETA: float = 0.9999
"""Effective-number β of deferred re-weighting (Cao et al. 2019, §4.2; method.md §8)."""

REP_EPS: float = 1e-12
"""Norm floor in :func:`representation_loss`: a zero vector is normalised to the zero vector."""

LOSSES: dict[str, type[ClassificationLoss]] = {}
"""Registry: ``train.loss`` name -> loss class (constructor ``(class_counts, cfg)``)."""

_L = TypeVar("_L", bound="type[ClassificationLoss]")


def register_loss(name: str) -> Callable[[_L], _L]:
    """Class decorator registering a classification loss under ``name``.

    Parameters
    ----------
    name : str
        The name used in ``train.loss``; must be unique.

    Raises
    ------
    ValueError
        If ``name`` is already registered.
    """

    def decorator(cls: _L) -> _L:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {LOSSES[name].__name__})")
        LOSSES[name] = cls
        cls.name = name
        return cls

    return decorator


def list_losses() -> list[str]:
    """Names of all registered classification losses, sorted."""
    return sorted(LOSSES)


def _as_counts(class_counts: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(class_counts, Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"class_counts must be finite and >= 0, got {counts.tolist()}")
    if counts.sum() <= 0:
        raise ValueError(f"class_counts must contain at least one sample, got {counts.tolist()}")
    return counts


def class_priors(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Class priors ``π_c = n_c / N`` (float64); absent classes get ``0``."""
    counts = _as_counts(class_counts)
    return counts / counts.sum()


def class_balanced_weights(class_counts: Sequence[int] | np.ndarray, beta: float) -> np.ndarray:
    """Effective-number class weights (Cui et al., "Class-Balanced Loss Based on Effective
    Number of Samples", CVPR 2019, eq. 3 and §4).

    ``w_c ∝ 1 / E_{n_c} = (1 - β) / (1 - β^{n_c})``, normalised so that the weights of the
    *present* classes sum to the number of present classes; absent classes (``n_c = 0``) get
    weight 0. ``β = 0`` gives uniform weights (1 for every present class); ``β → 1`` tends to
    inverse-frequency weights.

    Parameters
    ----------
    class_counts : sequence of int
        Training samples per class.
    beta : float
        Effective-number hyper-parameter in ``[0, 1)``.

    Returns
    -------
    numpy.ndarray
        Float64 weights of shape ``(C,)``.

    Examples
    --------
    >>> class_balanced_weights([1, 2, 0], beta=0.5).round(6).tolist()
    [1.2, 0.8, 0.0]

    (``1/E = [0.5/0.5, 0.5/0.75] = [1, 2/3]``, rescaled to sum 2.)
    """
    if not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    counts = _as_counts(class_counts)
    present = counts > 0
    weights = np.zeros_like(counts)
    # (1 - β) / (1 - β^n); for β = 0 every present class gets 1.
    weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    weights[present] *= present.sum() / weights[present].sum()
    return weights


# --------------------------------------------------------------------------- base class


class ClassificationLoss(nn.Module):
    """Base class: ``forward`` is the batch mean of :meth:`per_sample`.

    Parameters
    ----------
    class_counts : sequence of int
        Training samples per class (length C = number of logits).
    cfg : TrainConfig
        Hyper-parameters (``focal_gamma``, ``logit_adjust_tau``, ``ldam_*``, ``drw_start_fraction``).
    """

    name: str = "?"

    def __init__(self, class_counts: Sequence[int] | np.ndarray, cfg: TrainConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else TrainConfig()
        self.class_counts = _as_counts(class_counts)
        self.num_classes = int(self.class_counts.size)
        log_prior = np.log(self.class_counts / self.class_counts.sum() + PRIOR_EPS)
        self.register_buffer("log_prior", torch.as_tensor(log_prior, dtype=torch.float32), persistent=False)

    def _check(self, logits: Tensor, targets: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: logits must have shape (B, {self.num_classes}) to match the "
                f"{self.num_classes} class counts, got {tuple(logits.shape)}"
            )
        if targets.shape != (logits.shape[0],):
            raise ValueError(f"{type(self).__name__}: targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")

    def _log_prior(self, logits: Tensor) -> Tensor:
        return self.log_prior.to(device=logits.device, dtype=logits.dtype)

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Loss of each sample, shape ``(B,)``."""
        raise NotImplementedError

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Scalar mean of :meth:`per_sample` over the batch."""
        return self.per_sample(logits, targets).mean()

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Tell the loss where training is (0-based epoch or round); no-op unless overridden."""

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


# --------------------------------------------------------------------------- losses


@register_loss("ce")
class CrossEntropyLoss(ClassificationLoss):
    """Plain softmax cross-entropy.

    ``ℓ_CE(z, y) = −log( e^{z_y} / Σ_j e^{z_j} )``.
    """

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._check(logits, targets)
        return F.cross_entropy(logits, targets, reduction="none")


@register_loss("bsm")
class BalancedSoftmaxLoss(ClassificationLoss):
    """Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition", NeurIPS 2020, eq. 4; method.md §3.3).

    ``ℓ_BS(z, y) = −log( π_y e^{z_y} / Σ_j π_j e^{z_j} ) = CE(z + log(π + 1e-12), y)``
    with ``π_c = n_c / N``. With uniform priors it equals cross-entropy.
    """

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._check(logits, targets)
        return F.cross_entropy(logits + self._log_prior(logits), targets, reduction="none")


@register_loss("logit_adjust")
class LogitAdjustedLoss(ClassificationLoss):
    """Logit-adjusted loss (Menon et al., "Long-Tail Learning via Logit Adjustment",
    ICLR 2021, eq. 10).

    ``ℓ_LA(z, y) = CE(z + τ log(π + 1e-12), y)`` with ``τ = cfg.logit_adjust_tau``;
    ``τ = 1`` is the balanced softmax, ``τ = 0`` plain cross-entropy.
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray, cfg: TrainConfig | None = None) -> None:
        super().__init__(class_counts, cfg)
        self.tau = float(self.cfg.logit_adjust_tau)

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._check(logits, targets)
        return F.cross_entropy(logits + self.tau * self._log_prior(logits), targets, reduction="none")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"


@register_loss("ldam")
class LDAMLoss(ClassificationLoss):
    """LDAM with deferred re-weighting (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019, eq. 10 and Alg. 1).

    ``ℓ_LDAM(z, y) = w_y · CE(s · (z − Δ_y e_y), y)``, ``Δ_c = K / n_c^{1/4}`` with ``K`` chosen
    so that ``max_c Δ_c = cfg.ldam_max_margin``; a class with ``n_c = 0`` gets the maximum
    margin. ``s = cfg.ldam_scale``.

    The paper (and method.md §3.3) pairs LDAM with a *cosine* classifier whose logits are
    bounded in [-1, 1]; the student's main head here is a plain ``Linear``, so the scale ``s``
    is applied to the logits as given.

    Deferred re-weighting (DRW): ``w_c = 1`` before epoch ``⌊drw_start_fraction · total⌋``
    (0-based), and the effective-number weights :func:`class_balanced_weights` with
    ``β = 0.9999`` from that epoch on (switched by :meth:`set_epoch`). The batch loss is the
    plain mean of the weighted per-sample losses (not divided by the sum of weights), so that
    ``forward == per_sample(...).mean()``.
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray, cfg: TrainConfig | None = None) -> None:
        super().__init__(class_counts, cfg)
        if self.cfg.ldam_max_margin <= 0:
            raise ValueError(f"ldam_max_margin must be > 0, got {self.cfg.ldam_max_margin!r}")
        if self.cfg.ldam_scale <= 0:
            raise ValueError(f"ldam_scale must be > 0, got {self.cfg.ldam_scale!r}")
        if not 0.0 <= self.cfg.drw_start_fraction <= 1.0:
            raise ValueError(f"drw_start_fraction must be in [0, 1], got {self.cfg.drw_start_fraction!r}")
        counts = self.class_counts
        present = counts > 0
        raw = np.full_like(counts, np.nan)
        raw[present] = 1.0 / np.power(counts[present], 0.25)
        margins = np.full_like(counts, float(self.cfg.ldam_max_margin))
        margins[present] = raw[present] * (self.cfg.ldam_max_margin / raw[present].max())
        self.scale = float(self.cfg.ldam_scale)
        self.drw_start_fraction = float(self.cfg.drw_start_fraction)
        self.register_buffer("margins", torch.as_tensor(margins, dtype=torch.float32), persistent=False)
        self.register_buffer("class_weights", torch.ones(self.num_classes), persistent=False)
        self._drw_weights = torch.as_tensor(class_balanced_weights(counts, DRW_BETA), dtype=torch.float32)
        self.drw_active = False

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Switch to effective-number weights at epoch ``⌊drw_start_fraction · total_epochs⌋``."""
        if total_epochs <= 0 or epoch < 0:
            raise ValueError(f"need epoch >= 0 and total_epochs > 0, got epoch={epoch}, total_epochs={total_epochs}")
        start = int(np.floor(self.drw_start_fraction * total_epochs))
        self.drw_active = epoch >= start
        weights = self._drw_weights if self.drw_active else torch.ones(self.num_classes)
        self.class_weights = weights.to(self.class_weights.device).clone()

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._check(logits, targets)
        margins = self.margins.to(device=logits.device, dtype=logits.dtype)
        shifted = logits - F.one_hot(targets, self.num_classes).to(logits.dtype) * margins[targets].unsqueeze(1)
        losses = F.cross_entropy(self.scale * shifted, targets, reduction="none")
        weights = self.class_weights.to(device=logits.device, dtype=logits.dtype)
        return weights[targets] * losses

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, scale={self.scale}, drw_active={self.drw_active}"


@register_loss("focal")
class FocalLoss(ClassificationLoss):
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, eq. 4,
    without the α term).

    ``ℓ_FL(z, y) = −(1 − p_y)^γ log p_y`` with ``p = softmax(z)`` and ``γ = cfg.focal_gamma``;
    ``γ = 0`` is cross-entropy.
    """

    def __init__(self, class_counts: Sequence[int] | np.ndarray, cfg: TrainConfig | None = None) -> None:
        super().__init__(class_counts, cfg)
        if self.cfg.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.cfg.focal_gamma!r}")
        self.gamma = float(self.cfg.focal_gamma)

    def per_sample(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._check(logits, targets)
        log_p = F.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
        if self.gamma == 0:
            return -log_p
        p = log_p.exp()
        return -((1.0 - p).clamp(min=0.0) ** self.gamma) * log_p

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}"


def build_classification_loss(
    name: str, class_counts: Sequence[int] | np.ndarray, cfg: TrainConfig | None = None
) -> ClassificationLoss:
    """Build the registered classification loss ``name`` for the given training class counts.

    Parameters
    ----------
    name : str
        One of :func:`list_losses` (``ce``, ``bsm``, ``logit_adjust``, ``ldam``, ``focal``).
    class_counts : sequence of int
        Training samples per class; its length is the number of classes.
    cfg : TrainConfig, optional
        Loss hyper-parameters; defaults to ``TrainConfig()``.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the valid names) or invalid ``class_counts``.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown classification loss {name!r}; valid names: {list_losses()} (set 'train.loss')")
    return LOSSES[name](class_counts, cfg)


# --------------------------------------------------------------------------- EKD


def representation_loss(u: Tensor, t: Tensor) -> Tensor:
    """Representation loss of EKD (Elbatel et al., FoPro-KD, IEEE TMI 2024; method.md §3.3).

    ``ℓ_rep(u, t) = ‖u/‖u‖ − t/‖t‖‖² = 2 − 2 cos(u, t)`` per sample; norms are floored at
    ``1e-12`` so a zero vector is normalised to zero (giving ``ℓ_rep = 1`` against any
    non-zero vector) instead of NaN. Scale-invariant in both arguments; 0 for parallel,
    2 for orthogonal, 4 for opposite vectors.

    Parameters
    ----------
    u : Tensor (B, D)
        Student projection.
    t : Tensor (B, D)
        Teacher features (no gradient needed); cast to ``u``'s dtype and device.

    Returns
    -------
    Tensor (B,)
    """
    if u.ndim != 2 or t.shape != u.shape:
        raise ValueError(
            f"representation_loss needs u and t of the same shape (B, D), got {tuple(u.shape)} and {tuple(t.shape)}; "
            "the projector's output size must equal the teacher's feature size"
        )
    t = t.to(device=u.device, dtype=u.dtype)
    u_bar = F.normalize(u, dim=1, eps=REP_EPS)
    t_bar = F.normalize(t, dim=1, eps=REP_EPS)
    return (u_bar - t_bar).pow(2).sum(dim=1)


class EKDLoss(nn.Module):
    """Effective Knowledge Distillation objective (FoPro-KD, Elbatel et al., IEEE TMI 2024;
    method.md §3.3).

    ``L = mean_i [ ℓ_cls(z_i, y_i) + ℓ_cls(a_i, y_i) + λ · ℓ_rep(u_i, t_i) ]`` with ``z`` the
    main-head logits, ``a`` the auxiliary-head logits, ``u`` the projection and ``t`` the
    teacher features; ``ℓ_cls`` is any registered classification loss (balanced softmax in
    the paper) and ``λ = lambda_rep`` (3 in every published command).

    When ``lambda_rep == 0`` the projection and teacher features may be ``None`` (the term is
    then 0 and not computed).

    Parameters
    ----------
    classification : nn.Module
        A classification loss with ``per_sample(logits, targets)`` (see :func:`build_classification_loss`).
    lambda_rep : float
        Weight λ >= 0 of the representation loss.
    """

    def __init__(
        self,
        classification: nn.Module,
        lambda_rep: float,
        rep_class_weights: Sequence[float] | np.ndarray | None = None,
        rep_weighting_start: float = 0.0,
    ) -> None:
        super().__init__()
        if not hasattr(classification, "per_sample"):
            raise ValueError(f"classification loss {type(classification).__name__} has no per_sample(logits, targets)")
        if not float(lambda_rep) >= 0:
            raise ValueError(f"lambda_rep must be >= 0, got {lambda_rep!r}")
        if not 0.0 <= float(rep_weighting_start) <= 1.0:
            raise ValueError(f"rep_weighting_start must be in [0, 1], got {rep_weighting_start!r}")
        self.classification = classification
        self.lambda_rep = float(lambda_rep)
        self.rep_class_weights: Tensor | None = None
        if rep_class_weights is not None:
            self.rep_class_weights = torch.as_tensor(np.asarray(rep_class_weights, dtype=np.float32))
        self.rep_weighting_start = float(rep_weighting_start)
        self.rep_weights_active = self.rep_class_weights is not None and self.rep_weighting_start == 0.0

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Forward the schedule to the classification loss (LDAM-DRW); switch the ℓ_rep class weights on.

        The weights apply from epoch ``rep_weighting_start · total_epochs`` on (0-based epochs),
        as Fed-MAS switches them on after 80% of the rounds (method.md §3.4).
        """
        set_epoch = getattr(self.classification, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch, total_epochs)
        if self.rep_class_weights is not None:
            self.rep_weights_active = epoch >= self.rep_weighting_start * total_epochs

    def per_sample_rep(self, projection: Tensor | None, teacher_features: Tensor | None) -> Tensor:
        """``ℓ_rep(u_i, t_i)`` per sample, shape ``(B,)``."""
        if projection is None or teacher_features is None:
            raise ValueError("per_sample_rep needs both the projection and the teacher features, got None")
        return representation_loss(projection, teacher_features)

    def _terms(
        self,
        logits: Tensor,
        aux_logits: Tensor,
        projection: Tensor | None,
        teacher_features: Tensor | None,
        targets: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        cls = self.classification.per_sample(logits, targets)
        aux = self.classification.per_sample(aux_logits, targets)
        if projection is None or teacher_features is None:
            if self.lambda_rep != 0:
                raise ValueError(
                    f"lambda_rep={self.lambda_rep} needs the projection and the teacher features, got None; "
                    "pass them or set lambda_rep to 0"
                )
            rep = torch.zeros_like(cls)
        else:
            rep = representation_loss(projection, teacher_features)
            if self.rep_weights_active and self.rep_class_weights is not None:
                rep = rep * self.rep_class_weights.to(rep.device, rep.dtype)[targets]
        return cls, aux, rep

    def per_sample(
        self,
        logits: Tensor,
        aux_logits: Tensor,
        projection: Tensor | None,
        teacher_features: Tensor | None,
        targets: Tensor,
    ) -> Tensor:
        """Total loss of each sample ``ℓ_cls(z_i) + ℓ_cls(a_i) + λ ℓ_rep(u_i, t_i)``, shape ``(B,)``."""
        cls, aux, rep = self._terms(logits, aux_logits, projection, teacher_features, targets)
        return cls + aux + self.lambda_rep * rep

    def forward(
        self,
        logits: Tensor,
        aux_logits: Tensor,
        projection: Tensor | None,
        teacher_features: Tensor | None,
        targets: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """Batch objective and its detached mean terms.

        Returns
        -------
        loss : Tensor
            Scalar ``mean(ℓ_cls(z) + ℓ_cls(a) + λ ℓ_rep)`` (differentiable).
        terms : dict[str, float]
            ``{"loss_cls", "loss_aux", "loss_rep", "loss"}`` batch means as python floats.
        """
        cls, aux, rep = self._terms(logits, aux_logits, projection, teacher_features, targets)
        loss_cls, loss_aux, loss_rep = cls.mean(), aux.mean(), rep.mean()
        loss = loss_cls + loss_aux + self.lambda_rep * loss_rep
        terms = {
            "loss_cls": float(loss_cls.detach()),
            "loss_aux": float(loss_aux.detach()),
            "loss_rep": float(loss_rep.detach()),
            "loss": float(loss.detach()),
        }
        return loss, terms

    def extra_repr(self) -> str:
        weighted = "" if self.rep_class_weights is None else f", rep class weights from {self.rep_weighting_start:g}"
        return f"lambda_rep={self.lambda_rep}{weighted}"


def build_ekd_loss(classification: nn.Module, class_counts: Sequence[int] | np.ndarray, cfg: TrainConfig) -> EKDLoss:
    """The EKD objective of ``cfg`` (``lambda_rep``, ``rep_weighting``) for a site with ``class_counts``.

    ``rep_weighting: class_balanced`` weights each sample's ℓ_rep by the effective-number weight
    of its class (:func:`class_balanced_weights` with ``rep_weighting_beta``, normalised to sum
    to the number of classes, as Fed-MAS's optional schedule, method.md §3.4): the teacher's
    representation is pulled towards the rare classes' images instead of being dominated by the
    common class's. The weights are a function of ``class_counts`` only, so under DP the trainer
    passes the released (noisy) counts and the weights are post-processing.
    """
    weights = None
    if cfg.rep_weighting == "class_balanced":
        weights = class_balanced_weights(class_counts, cfg.rep_weighting_beta)
    return EKDLoss(classification, cfg.lambda_rep, weights, cfg.rep_weighting_start)
