"""The frozen teacher of EKD / FoPro-KD (method.md §3.2): :class:`FrozenTeacher` and :func:`build_teacher`.

The teacher is a timm model with its classifier removed, so ``model(x)`` returns the pooled
pre-logits feature *t* that the student's projector is trained to match. It is frozen for
good: its parameters never receive gradients and it stays in eval mode even when a parent
module calls ``.train()`` (BatchNorm statistics of a pretrained teacher must not drift on a
hospital's small, long-tailed data). Gradients *do* flow through it to its input, because the
Fourier prompt (``fopro_kd.prompt``) is trained through the teacher.

A teacher normalises its own input with the mean/std of its *own* pretrained config (e.g.
mean = std = 0.5 for Keras-origin MobileNetV2 weights), never with hard-coded ImageNet
constants: the student and the teacher may expect different pixel statistics.

The generic, offline-safe timm/Hub weight loading (shared with the student) is in
:mod:`fopro_kd.models.weights`; every failure is a :class:`~fopro_kd.models.weights.TeacherLoadError`
naming the ``teacher.*`` field to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fopro_kd.config import TeacherConfig
from fopro_kd.models.batchnorm_folding import fold_batchnorms
from fopro_kd.models.weights import (
    TeacherLoadError,
    check_state_dict_compatible,
    checked_create_model,
    create_timm_model,
    feature_dim_of,
    read_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FrozenTeacher",
    "build_teacher",
    "check_teacher_startup",
]


def check_teacher_startup(cfg: TeacherConfig, demo_file: str | None = None) -> str:
    """Cheap start-up check of the teacher, before any data is decoded; returns what was checked.

    * ``teacher.source`` is one of hub, file, demo, none;
    * ``teacher.arch`` is a timm architecture and accepts ``teacher.model_kwargs`` (the model is
      built on the ``meta`` device: no memory, no weights);
    * ``source: file`` (and ``demo`` with a file): the file exists and its state-dict *keys* are
      those of the architecture (:func:`check_state_dict_compatible`, shapes left to the load).

    The Hub itself is not contacted (``build_teacher`` bounds that by ``teacher.hub_timeout_s``).

    Raises
    ------
    TeacherLoadError
        Naming the ``teacher.*`` field to fix.
    """
    if cfg.source not in ("hub", "file", "demo", "none"):
        raise TeacherLoadError(f"'teacher.source' must be one of hub, file, demo, none; got {cfg.source!r}")
    arch = cfg.arch
    if ":" not in arch and not timm.is_model(arch.split(".", 1)[0]):
        raise TeacherLoadError(f"'teacher.arch': unknown timm architecture {arch!r} (see timm.list_models())")
    kwargs = dict(cfg.model_kwargs or {})
    try:
        with torch.device("meta"):
            shell = checked_create_model(arch, "teacher", TeacherLoadError, pretrained=False, num_classes=0, **kwargs)
    except TeacherLoadError:
        raise
    except Exception:  # noqa: BLE001 - a model that cannot be built on "meta": leave the check to build_teacher
        logger.debug("teacher start-up check: %s cannot be built on the meta device; skipped", arch)
        return f"{arch} (not checked on the meta device)"
    file = cfg.file if cfg.source == "file" else (cfg.file or demo_file) if cfg.source == "demo" else None
    if cfg.source == "file" and not file:
        raise TeacherLoadError("'teacher.file' is not set: set 'teacher.source: file' and "
                               "'teacher.file: /path/to/weights.pth|.safetensors'")
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise TeacherLoadError(
                f"teacher.file: weights file not found: {path} (resolved to {path.resolve()}). Fix 'teacher.file' in "
                "the config or pass --set teacher.file=/path/to/weights"
            )
        state_dict = read_state_dict(path, "teacher.file", TeacherLoadError)
        check_state_dict_compatible(shell, state_dict, source=str(path), field="teacher.file", arch=arch,
                                    error_cls=TeacherLoadError, check_shapes=False)
        return f"{arch} from {path} (state-dict keys match)"
    return f"{arch} ({cfg.source})"


# --------------------------------------------------------------------------- the module


def _as_stat_buffer(values: Sequence[float], name: str, arch: str) -> Tensor:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"teacher.{name}: expected 3 values (one per RGB channel) for '{arch}', got {values}")
    if name == "std" and any(v <= 0 for v in values):
        raise ValueError(f"teacher.std: all values must be > 0, got {values}")
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


class FrozenTeacher(nn.Module):
    """A frozen timm feature extractor that resizes and normalises its own [0, 1] input.

    Parameters
    ----------
    model
        timm model created with ``num_classes=0`` (``model(x)`` returns pooled pre-logits).
    arch
        Architecture name (for logs); defaults to the model's pretrained config.
    input_size
        Square input size the teacher sees; defaults to its pretrained config's (224 if absent).
    mean, std
        Normalisation; default to the model's *own* pretrained config, because a teacher must be
        fed the statistics it was trained with (Keras MobileNetV2: 0.5/0.5, not ImageNet's).
    weights_desc
        Where the weights came from (file + sha256, Hub tag, or random) for the run record.
    channels_last
        Hold the weights and feed the batches in channels-last memory layout. The teacher is
        inference-only, where oneDNN's channels-last convolutions are the fast path on CPU
        (real MobileNetV2 at 128 px, 2 cores, ``python -m simulations.bench two_stage``: 1.28x the
        images/s of a no-grad feature pass, 1.35x of a pass with the prompt's input gradient). The
        features are the same function up to float rounding (tested); a feature store records the
        layout, so a cached target is always the one this teacher computes.
    fold_batchnorm
        Fold the eval-mode BatchNorms into their convolutions (:mod:`fopro_kd.models.batchnorm_folding`):
        the same features up to float rounding, one activation pass fewer per BatchNorm. Off here
        (a teacher as timm builds it); :func:`fopro_kd.training.components.shared_teacher` turns it on
        unless the prompt's objective reads the BatchNorm layers (``akd.mode: bn_stats``).

    Notes
    -----
    ``features`` deliberately does not use ``torch.no_grad``: the teacher's parameters are
    frozen, but the Fourier prompt upstream is trained through it. Callers that need no input
    gradient (plain EKD) wrap the call in ``torch.no_grad()`` themselves.
    """

    feature_dim: int
    input_size: int
    arch: str
    weights_desc: str
    mean: Tensor
    std: Tensor
    memory_format: torch.memory_format

    def __init__(
        self,
        model: nn.Module,
        arch: str | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        weights_desc: str = "unknown",
        channels_last: bool = True,
        fold_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.arch = arch or str(cfg.get("architecture") or type(model).__name__)
        self.feature_dim = feature_dim_of(model)
        size = input_size if input_size is not None else (cfg.get("input_size") or (3, 224, 224))[-1]
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"teacher.input_size must be a positive integer, got {size!r}")
        self.input_size = size
        default_mean = cfg.get("mean") or timm.data.IMAGENET_DEFAULT_MEAN
        default_std = cfg.get("std") or timm.data.IMAGENET_DEFAULT_STD
        self.register_buffer("mean", _as_stat_buffer(mean if mean is not None else default_mean, "mean", self.arch),
                             persistent=False)
        self.register_buffer("std", _as_stat_buffer(std if std is not None else default_std, "std", self.arch),
                             persistent=False)
        self.weights_desc = weights_desc
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)
        self.batchnorm_folded = False
        if fold_batchnorm:
            # a fixed probe batch (own generator: building a teacher must not move the run's RNG)
            probe = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
            self.model, folded = fold_batchnorms(self.model, probe.contiguous(memory_format=self.memory_format))
            self.batchnorm_folded = folded > 0

    @property
    def numerics(self) -> str:
        """How the features are computed beyond the weights (layout, folding): part of a feature-cache key,
        since each changes the features at float-rounding level."""
        return str(self.memory_format) + (" batchnorm-folded" if self.batchnorm_folded else "")

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignore ``mode``: the teacher stays in eval mode (frozen BatchNorm statistics, no dropout)."""
        return super().train(False)

    def resize(self, x01: Tensor) -> Tensor:
        """Bilinearly resize a (B, 3, H, W) batch to the teacher's square input size (no-op if equal)."""
        if x01.ndim != 4:
            raise ValueError(f"teacher input must be a (B, 3, H, W) batch, got shape {tuple(x01.shape)}")
        if x01.shape[-2:] == (self.input_size, self.input_size):
            return x01
        return F.interpolate(x01, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)

    def normalize(self, x: Tensor) -> Tensor:
        """Apply the teacher's own mean/std to [0, 1] pixels."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x_normalised: Tensor) -> Tensor:
        """Pooled pre-logits features (B, feature_dim) of an already resized and normalised batch."""
        return self.model(self._in_layout(x_normalised))

    def _in_layout(self, x: Tensor) -> Tensor:
        """``x`` in the teacher's memory layout; unchanged inside ``torch.func.vmap`` (prompt DP's per-sample
        gradients), which cannot re-lay a tensor out in channels-last: there the convolutions pick their own."""
        if self.memory_format == torch.contiguous_format:
            return x
        try:
            return x.contiguous(memory_format=self.memory_format)
        except RuntimeError:
            return x

    def forward(self, x01: Tensor) -> Tensor:
        """Features of a [0, 1] batch: ``features(normalize(resize(x01)))``."""
        return self.features(self.normalize(self.resize(x01)))

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, feature_dim={self.feature_dim}, input_size={self.input_size}, "
            f"weights={self.weights_desc!r}"
        )


def build_teacher(cfg: TeacherConfig, demo_file: str | None = None, fold_batchnorm: bool = False) -> FrozenTeacher:
    """Build the frozen teacher described by ``cfg`` (see :class:`~fopro_kd.config.TeacherConfig`).

    Parameters
    ----------
    cfg
        ``teacher`` config section. ``source``: ``file`` (``cfg.file``), ``demo`` (``demo_file``),
        ``hub`` (timm's default pretrained tag, bounded by ``cfg.hub_timeout_s``) or ``none``
        (random weights, tests only).
    demo_file
        Path of the built-in demo teacher checkpoint, used when ``cfg.source == "demo"``.
    fold_batchnorm
        See :class:`FrozenTeacher`.

    Raises
    ------
    TeacherLoadError
        Missing/unreadable file, checkpoint of another architecture, or Hub unavailable.
    """
    overlay: dict[str, Any] = {}
    if cfg.mean is not None:
        overlay["mean"] = tuple(cfg.mean)
    if cfg.std is not None:
        overlay["std"] = tuple(cfg.std)
    common = dict(overlay=overlay, model_kwargs=cfg.model_kwargs, hub_timeout_s=cfg.hub_timeout_s, prefix="teacher")
    if cfg.source == "none":
        logger.warning(
            "teacher.source is 'none': the teacher '%s' has RANDOM weights, distillation results are meaningless "
            "(use this for tests only)", cfg.arch,
        )
        model, desc = create_timm_model(cfg.arch, source="none", **common)
    elif cfg.source == "file":
        model, desc = create_timm_model(cfg.arch, source="file", file=cfg.file, **common)
    elif cfg.source == "demo":
        if demo_file is None or not Path(demo_file).is_file():
            where = f" (expected at {demo_file})" if demo_file else ""
            raise TeacherLoadError(
                f"teacher.source is 'demo' but the demo teacher checkpoint does not exist{where}. Create it with "
                "`fopro-kd teacher pretrain`, or set 'teacher.source: file' and 'teacher.file: /path/to/weights.pth'"
            )
        model, desc = create_timm_model(cfg.arch, source="file", file=demo_file, **common)
        desc = f"demo: {desc}"
    elif cfg.source == "hub":
        model, desc = create_timm_model(cfg.arch, source="hub", **common)
    else:
        raise TeacherLoadError(f"'teacher.source' must be one of hub, file, demo, none; got {cfg.source!r}")
    return FrozenTeacher(
        model, arch=cfg.arch, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std, weights_desc=desc,
        fold_batchnorm=fold_batchnorm,
    )
