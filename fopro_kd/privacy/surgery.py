"""Model surgery that makes the EKD student trainable with per-sample gradients (Opacus).

What DP-SGD needs from the student (libraries.md §2):

* **no BatchNorm**: BatchNorm mixes the examples of a batch (and its running statistics are
  a non-private summary of the data). Every BatchNorm, including the projector's
  ``BatchNorm1d``, becomes ``GroupNorm(gcd(32, C), C)`` via ``ModuleValidator.fix`` (a *new*
  module, with fresh affine parameters 1 / 0). timm's fused ``BatchNormAct2d`` (EfficientNet,
  MobileNet) is a BatchNorm subclass that also applies dropout and the activation; a plain
  fix would silently drop the activation, so it becomes ``Sequential(GroupNorm, drop, act)``.
* **no in-place operations** on tensors that Opacus' backward hooks see: every module with an
  ``inplace`` flag gets ``inplace = False`` and timm's ResNet ``BasicBlock`` / ``Bottleneck``
  (``x += shortcut``) switch to subclasses with an out-of-place residual add (same computation).
* the result has no buffers in any trainable layer (what ``GradSampleModule`` validates).

Every hospital and the server must build the *same* converted student, because the
GroupNorm student is what the federation aggregates in DP mode: use
:func:`fopro_kd.training.components.build_dp_student` (or
:func:`~fopro_kd.training.components.build_models`, which calls it when ``privacy.mode`` is
not ``off``).

This module only converts a given model; building one from a config is the builders' job
(:mod:`fopro_kd.training.components` imports this module, never the other way round).
"""

from __future__ import annotations

import logging
import math

from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from fopro_kd.config import Config
from fopro_kd.models.student import EKDStudent
from fopro_kd.run_plan import resolve_run_plan

logger = logging.getLogger("fopro_kd.privacy")

__all__ = [
    "is_private_compatible",
    "make_student_private_compatible",
    "needs_private_student",
    "private_compatibility_problems",
]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def needs_private_student(cfg: Config) -> bool:
    """The GroupNorm student is used whenever DP is on (``local`` or ``central``).

    ``local``: per-sample gradients forbid BatchNorm. ``central``: noise added to an
    aggregated BatchNorm ``running_var`` can make it negative, and BatchNorm statistics are a
    data summary outside the clipping of trainable weights' updates; GroupNorm has neither.
    """
    return resolve_run_plan(cfg).any_dp


# --------------------------------------------------------------------------- timm residual blocks


def _residual_sum(block: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    """The tail shared by timm's residual blocks (SE, drop-path, downsample), added out of place."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    return x + shortcut


class _OutOfPlaceBasicBlock(BasicBlock):
    """timm ``BasicBlock`` with ``x = x + shortcut`` instead of ``x += shortcut`` (Opacus hooks)."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        return self.act2(_residual_sum(self, x, shortcut))


class _OutOfPlaceBottleneck(Bottleneck):
    """timm ``Bottleneck`` with an out-of-place residual add (Opacus hooks)."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        return self.act3(_residual_sum(self, x, shortcut))


# --------------------------------------------------------------------------- conversion


def _group_norm_for(bn: nn.Module) -> nn.GroupNorm:
    channels = int(bn.num_features)
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=float(bn.eps), affine=bool(bn.affine))


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _frozen_module_ids(model: nn.Module) -> set[int]:
    """Modules of a frozen backbone: eval mode for good, their BatchNorm statistics are public constants."""
    if not getattr(model, "backbone_frozen", False):
        return set()
    return {id(m) for m in model.backbone.modules()}


def _replace_fused_norm_act(model: nn.Module) -> int:
    """timm ``BatchNormAct2d`` -> ``Sequential(GroupNorm, drop, act)``; returns the number replaced."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm always has it in the pinned version
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d) and _trainable(child):
                setattr(parent, name, nn.Sequential(_group_norm_for(child), child.drop, child.act))
                replaced += 1
    return replaced


def make_student_private_compatible(student: EKDStudent, *, zero_init_last: bool = False) -> EKDStudent:
    """Return a DP-compatible copy of ``student`` (the input is left untouched).

    BatchNorm -> GroupNorm everywhere (backbone and projector), no in-place operations, timm
    residual blocks with an out-of-place add. A frozen backbone (``student.freeze_backbone``)
    keeps its BatchNorm: it is in eval mode for good, so it mixes no examples, its statistics are
    the public pretrained ones, and it has no parameter that needs a per-sample gradient.
    ``zero_init_last`` re-applies timm's zero initialisation of the last norm layer of each
    residual block (what a random-init timm ResNet has; ``ModuleValidator.fix`` resets it to 1).
    Idempotent.

    Raises
    ------
    ValueError
        Some module still has BatchNorm or buffers in a trainable layer after the conversion.
    """
    from opacus.validators import ModuleValidator

    model = _copy(student)
    fused = _replace_fused_norm_act(model)
    quiet = [logging.getLogger(name) for name in ("opacus.validators.module_validator", "opacus.validators.batch_norm")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.WARNING)  # one INFO line per replaced layer otherwise
    try:
        model = ModuleValidator.fix(model)  # a NEW module (deep copy): build optimizers afterwards
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    blocks = {BasicBlock: _OutOfPlaceBasicBlock, Bottleneck: _OutOfPlaceBottleneck}
    swapped = 0
    for module in model.modules():
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False
        replacement = blocks.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            swapped += 1
        if zero_init_last and isinstance(module, (_OutOfPlaceBasicBlock, _OutOfPlaceBottleneck)):
            module.zero_init_last()
    problems = private_compatibility_problems(model)
    if problems:
        raise ValueError("student is not DP-compatible after conversion: " + "; ".join(problems))
    logger.info(
        "DP student: BatchNorm -> GroupNorm (%d fused norm-act layers), %d residual blocks out-of-place, in-place flags off",
        fused, swapped,
    )
    return model


def _copy(student: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(student)


def private_compatibility_problems(model: nn.Module) -> list[str]:
    """Human-readable reasons why ``model`` cannot be trained with Opacus hooks (empty = fine)."""
    from opacus.validators import ModuleValidator

    problems: list[str] = []
    frozen = _frozen_module_ids(model)
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORM) and (id(module) not in frozen or _trainable(module)):
            problems.append(f"{name or '<root>'} is {type(module).__name__} (mixes examples of a batch)")
        if getattr(module, "inplace", False) is True:
            problems.append(f"{name} has inplace=True")
        if type(module) in (BasicBlock, Bottleneck):
            problems.append(f"{name} is timm {type(module).__name__} with an in-place residual add")
        own_params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        own_buffers = list(module.buffers(recurse=False))
        if own_params and own_buffers:
            problems.append(f"{name} is a trainable layer with buffers")
    problems += [str(e) for e in ModuleValidator.validate(model, strict=False) if "BatchNorm" not in str(e)]
    return problems


def is_private_compatible(model: nn.Module) -> bool:
    return not private_compatibility_problems(model)


def group_norm_layers(model: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORM) for m in model.modules())
