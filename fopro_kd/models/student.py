"""The EKD student: a timm backbone with a main head, a projector and an auxiliary head (method.md §3.1).

Only the main head is used at test time (``forward``). During training (``forward_train``)
the projector maps the backbone feature *h* into the teacher's feature space (*u = P(h)*,
matched to the teacher feature *t* by ℓ_rep) and the auxiliary head classifies *u*, which keeps
the projector's training balanced across classes. Plain ``ce``/``bsm`` baselines have no
teacher, hence no projector and no auxiliary head (``teacher_dim=None``).

The student takes [0, 1] pixels and normalises them itself. Its mean/std are *non-persistent*
buffers, so the state dict that travels between clients and server holds only learnable
weights and BatchNorm statistics (nothing a federated average should touch by accident).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn

from fopro_kd.config import StudentConfig, TeacherConfig
from fopro_kd.models.weights import WeightsLoadError, create_timm_model, feature_dim_of

logger = logging.getLogger(__name__)

__all__ = ["EKDStudent", "StudentLoadError", "StudentOutput", "build_student"]


class StudentLoadError(WeightsLoadError):
    """The student's ImageNet weights could not be loaded; the message names the ``student.*`` field to fix."""


class StudentOutput(NamedTuple):
    """Everything ``EKDStudent.forward_train`` computes.

    Attributes
    ----------
    logits
        Main-head logits *z* (B, C).
    aux_logits
        Auxiliary-head logits *a = V u* (B, C), or ``None`` without a teacher.
    projection
        Projector output *u = P(h)* (B, D_T), or ``None`` without a teacher.
    features
        Backbone feature *h* (B, d).
    """

    logits: Tensor
    aux_logits: Tensor | None
    projection: Tensor | None
    features: Tensor


class EKDStudent(nn.Module):
    """Student network of EKD: backbone φ, main head W, projector P and auxiliary head V.

    Parameters
    ----------
    backbone
        timm model created with ``num_classes=0`` so that ``backbone(x)`` is the pooled feature *h*.
    num_classes
        Number of classes C.
    teacher_dim
        Teacher feature size D_T; ``None`` builds no projector/auxiliary head (methods ``ce``/``bsm``).
    projector_hidden
        Hidden width of the projector; ``None`` = the backbone feature size d, as in EKD.
    drop_rate
        Dropout before the *main* head only (EKD's EfficientNet-B0 student uses 0.2); the projector
        sees the clean feature so that distillation is not perturbed.
    mean, std
        Input normalisation applied to [0, 1] pixels; ImageNet statistics by default.
    freeze_backbone
        Fix φ (parameters *and* BatchNorm statistics: the backbone stays in eval mode whatever
        ``train()`` says). Only the heads learn, so DP-SGD noises far fewer coordinates, and the
        frozen BatchNorm keeps the public statistics instead of summarising private batches.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        teacher_dim: int | None,
        projector_hidden: int | None,
        drop_rate: float = 0.0,
        mean: Sequence[float] = timm.data.IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = timm.data.IMAGENET_DEFAULT_STD,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (data.num_classes), got {num_classes}")
        if teacher_dim is not None and teacher_dim <= 0:
            raise ValueError(f"teacher_dim must be a positive feature size or None, got {teacher_dim}")
        if projector_hidden is not None and projector_hidden <= 0:
            raise ValueError(f"student.projector_hidden must be > 0 or null, got {projector_hidden}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"student.drop_rate must be in [0, 1), got {drop_rate}")
        self.backbone = backbone
        self.feature_dim = feature_dim_of(backbone)
        self.num_classes = num_classes
        self.teacher_dim = teacher_dim
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self.projector: nn.Sequential | None = None
        self.aux_classifier: nn.Linear | None = None
        if teacher_dim is not None:
            hidden = projector_hidden or self.feature_dim
            self.projector = nn.Sequential(
                nn.Linear(self.feature_dim, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),  # not in-place: Opacus hooks reject in-place ops on views
                nn.Linear(hidden, teacher_dim),
            )
            self.aux_classifier = nn.Linear(teacher_dim, num_classes)
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1), persistent=False)
        self.backbone_frozen = bool(freeze_backbone)
        if self.backbone_frozen:
            for param in self.backbone.parameters():
                param.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> EKDStudent:
        """As ``nn.Module.train``, except that a frozen backbone always stays in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def frozen_state_keys(self) -> frozenset[str]:
        """State-dict keys that training never changes (the frozen backbone): public constants."""
        if not self.backbone_frozen:
            return frozenset()
        return frozenset(f"backbone.{key}" for key in self.backbone.state_dict())

    def features(self, x01: Tensor) -> Tensor:
        """Backbone feature *h* (B, d) of a [0, 1] batch."""
        if x01.ndim != 4 or x01.shape[1] != self.mean.shape[1]:
            channels = self.mean.shape[1]
            raise ValueError(
                f"student input must be a (B, {channels}, H, W) batch of [0, 1] pixels, got {tuple(x01.shape)}"
            )
        return self.backbone((x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype))

    def forward(self, x01: Tensor) -> Tensor:
        """Main-head logits (B, C): the only output used at inference."""
        return self.classifier(self.dropout(self.features(x01)))

    def forward_train(self, x01: Tensor) -> StudentOutput:
        """All heads at once: main logits, auxiliary logits, projection and backbone feature."""
        h = self.features(x01)
        logits = self.classifier(self.dropout(h))
        if self.projector is None or self.aux_classifier is None:
            return StudentOutput(logits, None, None, h)
        u = self.projector(h)
        return StudentOutput(logits, self.aux_classifier(u), u, h)


def build_student(
    cfg: StudentConfig,
    num_classes: int,
    teacher_dim: int | None,
    *,
    teacher: TeacherConfig | None = None,
    demo_teacher_file: str | None = None,
    load_weights: bool = True,
) -> EKDStudent:
    """Build the student described by ``cfg`` (see :class:`~fopro_kd.config.StudentConfig`).

    ``init: imagenet`` loads ``cfg.weights_file`` when set (checked against the architecture),
    otherwise timm's default Hub weights with a bounded timeout and an error that says how to
    use a local file. ``init: teacher`` loads the public weights the teacher is built from
    (``teacher``; ``demo_teacher_file`` for ``teacher.source: demo``), with the teacher's model
    kwargs and normalisation. ``init: random`` never touches the network. With pretrained weights the
    input is normalised with the statistics of the weights' own pretrained config; a random
    student uses ImageNet statistics. ``load_weights=False`` builds the same architecture and
    normalisation without reading any weights, for callers that load a whole state dict next (a
    client receiving the global model, a checkpoint being evaluated).

    Raises
    ------
    StudentLoadError
        Unknown architecture, missing/incompatible weights file, or Hub unavailable.
    """
    file, prefix, field, model_kwargs, overlay = cfg.weights_file, "student", "weights_file", {}, {}
    if cfg.init == "imagenet":
        source = "file" if cfg.weights_file else "hub"
    elif cfg.init == "random":
        if cfg.weights_file:
            logger.warning("student.weights_file is ignored because student.init is 'random'")
        source = "none"
    elif cfg.init == "teacher":
        source, file = _teacher_weights(cfg, teacher, demo_teacher_file, need_file=load_weights)
        assert teacher is not None  # _teacher_weights raised otherwise
        prefix, field = "teacher", "file"  # a bad teacher file is fixed in the teacher section
        model_kwargs = dict(teacher.model_kwargs)
        if teacher.mean is not None:
            overlay["mean"] = tuple(teacher.mean)
        if teacher.std is not None:
            overlay["std"] = tuple(teacher.std)
    else:
        raise StudentLoadError(f"'student.init' must be 'random', 'imagenet' or 'teacher', got {cfg.init!r}")
    if cfg.freeze_backbone and source == "none":
        raise StudentLoadError("'student.freeze_backbone' needs pretrained weights ('student.init' imagenet or teacher)")
    pretrained_init = source != "none"
    backbone, desc = create_timm_model(
        cfg.arch, source=source if load_weights else "none", file=file, overlay=overlay, model_kwargs=model_kwargs,
        prefix=prefix, file_field=field, error_cls=StudentLoadError,
    )
    if not load_weights:
        desc = "not loaded (the caller loads a full state dict)"
    # the weights' normalisation: timm's pretrained config of the architecture, with the overlay
    pretrained = {**dict(getattr(backbone, "pretrained_cfg", None) or {}), **overlay}
    mean = pretrained.get("mean") if pretrained_init else None
    std = pretrained.get("std") if pretrained_init else None
    logger.info("student %s (%s): weights %s", cfg.arch, cfg.init, desc)
    return EKDStudent(
        backbone,
        num_classes=num_classes,
        teacher_dim=teacher_dim,
        projector_hidden=cfg.projector_hidden,
        drop_rate=cfg.drop_rate,
        mean=mean or timm.data.IMAGENET_DEFAULT_MEAN,
        std=std or timm.data.IMAGENET_DEFAULT_STD,
        freeze_backbone=cfg.freeze_backbone,
    )


def _teacher_weights(
    cfg: StudentConfig, teacher: TeacherConfig | None, demo_teacher_file: str | None, need_file: bool
) -> tuple[str, str | None]:
    """(source, file) of the teacher's weights, for ``init: teacher`` (``need_file``: they will be read)."""
    if teacher is None:
        raise StudentLoadError("'student.init' is 'teacher' but no teacher config was given to build the student from")
    if cfg.arch != teacher.arch:
        raise StudentLoadError(
            f"'student.init' is 'teacher' but student.arch {cfg.arch!r} differs from teacher.arch {teacher.arch!r}"
        )
    if teacher.source == "demo":
        if need_file and not demo_teacher_file:
            raise StudentLoadError("'student.init' is 'teacher' with 'teacher.source: demo' but no demo teacher file")
        return "file", demo_teacher_file
    if teacher.source == "file":
        return "file", teacher.file
    if teacher.source == "none":
        logger.warning("student.init is 'teacher' but teacher.source is 'none': the student starts from RANDOM weights")
    return teacher.source, None
