"""What the Fourier prompt is trained for (``akd.mode``): one registered objective per mode.

Every objective maps the prompted teacher's features of a training batch to a scalar that the
prompt *descends* (the trainer adds the prompt's identity regulariser). Formulas, and why each
one exists, are in docs/method-notes.md ("Prompt objectives"):

- ``discriminative``: a balanced-softmax linear probe Q on the features, trained with the prompt,
  ``CE(Q f + log π, y)``. Probe and prompt see the same batch, so with 50-100 images of a rare
  class they can memorise it; kept as the baseline of the paper-style "make the teacher's
  features separable" idea.
- ``minmax`` (AKD): ``−ℓ_rep(u, f)``, the prompt ascends the student's distillation loss.
- ``prototype``: class-balanced cross-entropy of the batch's cosine similarities to class
  prototypes computed, with the same prompt, on a *separate* held-out support fold of the
  training split (whole groups). No learnable head, and the images scored are never the images
  that define the classes, so the prompt cannot memorise the batch; cosine is the geometry of
  ``ℓ_rep = 2 − 2 cos``; every class present weighs the same, so rare classes count as much as
  the common ones.
- ``bn_stats``: label-free. The prompted images' per-channel batch statistics at every
  BatchNorm input of the teacher are pulled towards the running statistics the teacher learnt
  on its public data (as in DeepInversion), i.e. the prompt makes the hospital's images look
  like what the teacher's normalisation expects. It reads no labels.

Adding an objective: one class with ``__call__(feats, labels, keep)`` (and optional
``parameters()`` for what trains with the prompt), registered in :data:`PROMPT_OBJECTIVES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.transforms import to_float_on
from fopro_kd.losses import representation_loss
from fopro_kd.seeding import support_draw_seed

__all__ = ["PROMPT_OBJECTIVES", "ObjectiveContext", "build_prompt_objective", "objective_metric_key", "support_fold"]

logger = logging.getLogger("fopro_kd.prompt")

FeaturesOf = Callable[[Tensor], Tensor]


@dataclass
class ObjectiveContext:
    """What an objective may use: the frozen teacher, the site's training data and its counts."""

    teacher: nn.Module
    feature_dim: int
    class_counts: np.ndarray
    data: ImageSet
    features_of: FeaturesOf
    """x01 (N, 3, H, W) in [0, 1] -> prompted teacher features, differentiable w.r.t. the prompt."""
    device: torch.device
    seed: int
    support_per_class: int
    support_per_step: int
    temperature: float
    probe: nn.Module | None = None
    """``discriminative``: the linear probe, owned by the trainer (its optimizer and DP wrapper train it)."""
    log_prior: Tensor | None = None


class DiscriminativeObjective(nn.Module):
    """``CE(Q f + log π, y)`` with a linear probe Q trained jointly with the prompt."""

    needs_student = False
    metric_key = "prompt_probe_loss"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        if ctx.probe is None or ctx.log_prior is None:
            raise ValueError("akd.mode 'discriminative' needs the trainer's probe and class prior")
        object.__setattr__(self, "probe", ctx.probe)  # not a submodule: the trainer owns and saves it
        object.__setattr__(self, "log_prior", ctx.log_prior)

    def forward(self, feats: Tensor, labels: Tensor, keep: Tensor, projection: Tensor | None = None):
        loss = F.cross_entropy(self.probe(feats) + self.log_prior, labels)
        return loss, {"prompt_probe_loss": float(loss.detach())}


class MinmaxObjective(nn.Module):
    """``−ℓ_rep(u, f)``: the prompt makes the teacher's target harder for the current student."""

    needs_student = True
    metric_key = "prompt_discrepancy"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()

    def forward(self, feats: Tensor, labels: Tensor, keep: Tensor, projection: Tensor | None = None):
        if projection is None:
            raise ValueError("akd.mode 'minmax' needs the student's projection")
        discrepancy = representation_loss(projection, feats).mean()
        return -discrepancy, {"prompt_discrepancy": float(discrepancy.detach())}


def support_fold(data: ImageSet, per_class: int, seed: int) -> np.ndarray:
    """Indices of a held-out support fold: up to ``per_class`` images per class, by whole groups.

    At most half of a class's groups go to the support, so the batch side keeps images of every
    class. A class present with fewer than 2 groups cannot be split: it gets no prototype (its
    images are not scored by the objective; a warning names it), which is the normal case for a
    rare disease at one hospital of a federation (one patient with dermatofibroma). Fewer than
    2 classes with a prototype leave nothing to discriminate: an error that names ``akd.mode``.
    """
    labels = data.labels.numpy()
    groups = np.asarray(data.groups if data.groups is not None else [str(i) for i in range(len(labels))])
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    unsplittable: list[str] = []
    present = np.unique(labels)
    for c in present:
        members = np.flatnonzero(labels == c)
        class_groups = np.unique(groups[members])
        if len(class_groups) < 2:
            unsplittable.append(f"{data.class_names[int(c)]!r} ({len(class_groups)} group)")
            continue
        rng.shuffle(class_groups)
        taken: list[int] = []
        for g in class_groups[: len(class_groups) // 2]:
            taken.extend(members[groups[members] == g].tolist())
            if len(taken) >= per_class:
                break
        chosen.extend(taken[:per_class])
    if len(present) - len(unsplittable) < 2:
        raise ValueError(
            "akd.mode 'prototype' needs a held-out support fold of at least 2 classes with 2 or more training "
            f"groups each; classes {', '.join(unsplittable)} cannot be split; use another akd.mode for this site")
    if unsplittable:
        logger.warning("akd.mode 'prototype': no prototype for class(es) %s (fewer than 2 training groups to hold one "
                       "out); the prompt objective scores the other %d classes", ", ".join(unsplittable),
                       len(present) - len(unsplittable))
    return np.asarray(sorted(chosen), dtype=np.int64)


class PrototypeObjective(nn.Module):
    """Class-balanced CE of cos(f_i, p_c)/τ, prototypes p_c from the held-out support fold.

    Each step draws ``support_per_step`` support images per class, computes their prompted features
    (with gradient: the prompt shapes the prototypes too) and averages them per class. The loss of
    each class present in the batch is averaged first, then the classes: rare classes weigh as
    much as common ones. Support images met in a training batch are left out of the loss (``keep``).
    """

    needs_student = False
    metric_key = "prompt_proto_loss"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.support = support_fold(ctx.data, ctx.support_per_class, ctx.seed)
        labels = ctx.data.labels.numpy()
        self.by_class = {int(c): self.support[labels[self.support] == c] for c in np.unique(labels[self.support])}
        self.generator = np.random.default_rng(support_draw_seed(ctx.seed))  # not the fold's own stream
        self.num_classes = len(ctx.class_counts)

    def prototypes(self) -> tuple[Tensor, Tensor]:
        """(C_present, D) unit prototypes and the class index of each row."""
        picks, owners = [], []
        for c, members in self.by_class.items():
            k = min(self.ctx.support_per_step, len(members))
            picks.extend(self.generator.choice(members, size=k, replace=False).tolist())
            owners.extend([c] * k)
        x = to_float_on(self.ctx.data.images[torch.as_tensor(picks)], self.ctx.device)
        feats = F.normalize(self.ctx.features_of(x).float(), dim=1)
        owner = torch.as_tensor(owners, device=feats.device)
        classes = torch.as_tensor(sorted(self.by_class), device=feats.device)
        protos = torch.stack([feats[owner == c].mean(0) for c in classes.tolist()])
        return F.normalize(protos, dim=1), classes

    def forward(self, feats: Tensor, labels: Tensor, keep: Tensor, projection: Tensor | None = None):
        protos, classes = self.prototypes()
        column = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
        column[classes] = torch.arange(len(classes), device=labels.device)
        target = column[labels]
        keep = keep & (target >= 0)
        if not bool(keep.any()):
            zero = feats.sum() * 0.0
            return zero, {"prompt_proto_loss": 0.0}
        logits = F.normalize(feats[keep], dim=1) @ protos.t() / self.ctx.temperature
        per_image = F.cross_entropy(logits, target[keep], reduction="none")
        y = labels[keep]
        per_class = [per_image[y == c].mean() for c in torch.unique(y)]
        loss = torch.stack(per_class).mean()
        return loss, {"prompt_proto_loss": float(loss.detach())}

    def excluded(self) -> np.ndarray:
        return self.support


class BNStatsObjective(nn.Module):
    """Σ_l mean_c [(μ_lc − μ̂_lc)² / σ̂²_lc + (σ_lc / σ̂_lc − 1)²] / L over the teacher's BatchNorms.

    μ_lc, σ_lc: batch statistics of the prompted images at the input of BatchNorm l; μ̂, σ̂²: its
    running statistics (public, from the teacher's pre-training). Hooks record the statistics
    between :meth:`start_recording` and :meth:`stop_recording`, i.e. during the prompt step's
    teacher forward; the hooks are removed afterwards (the teacher is shared by every trainer of
    the process).
    """

    needs_student = False
    records_teacher_forward = True
    metric_key = "prompt_bn_loss"

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        if getattr(ctx.teacher, "batchnorm_folded", False):
            raise ValueError("akd.mode 'bn_stats' reads the teacher's BatchNorm layers, but this teacher has them "
                             "folded into its convolutions: build it with fold_batchnorm=False (shared_teacher does)")
        norms = [m for m in ctx.teacher.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        if not norms:
            raise ValueError("akd.mode 'bn_stats' needs a teacher with BatchNorm layers (running statistics)")
        object.__setattr__(self, "norms", norms)  # the teacher's modules, not ours
        self._terms: list[Tensor] = []
        self._handles: list = []

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        std = (x.var(dim=(0, 2, 3), unbiased=False) + module.eps).sqrt()
        run_var = module.running_var.float() + module.eps
        term = ((mean - module.running_mean.float()) ** 2 / run_var).mean() + ((std / run_var.sqrt() - 1) ** 2).mean()
        self._terms.append(term)

    def start_recording(self) -> None:
        self.stop_recording()
        self._terms = []
        self._handles = [norm.register_forward_pre_hook(self._hook) for norm in self.norms]

    def stop_recording(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forward(self, feats: Tensor, labels: Tensor, keep: Tensor, projection: Tensor | None = None):
        if not self._terms:
            raise RuntimeError("bn_stats: no BatchNorm statistics were recorded during the teacher forward")
        loss = torch.stack(self._terms).mean()
        self._terms = []
        return loss, {"prompt_bn_loss": float(loss.detach())}


PROMPT_OBJECTIVES: dict[str, type[nn.Module]] = {
    "discriminative": DiscriminativeObjective,
    "minmax": MinmaxObjective,
    "prototype": PrototypeObjective,
    "bn_stats": BNStatsObjective,
}


def objective_metric_key(mode: str) -> str:
    """The loss term an ``akd.mode`` objective reports (the same key at every site of a federation)."""
    return PROMPT_OBJECTIVES[mode].metric_key


def build_prompt_objective(mode: str, ctx: ObjectiveContext) -> nn.Module:
    """The registered objective for ``akd.mode`` (``off`` has none)."""
    if mode not in PROMPT_OBJECTIVES:
        raise ValueError(f"akd.mode must be one of {['off', *PROMPT_OBJECTIVES]}, got {mode!r}")
    return PROMPT_OBJECTIVES[mode](ctx)
