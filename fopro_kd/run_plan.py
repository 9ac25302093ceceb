"""Values derived from the config, resolved in one place so that no two modules default them differently.

A config leaves some values to be derived (``student.input_size: null`` means the data's
size; ``federation.local_steps`` turns into a number of local epochs and a step cap; the
``ce`` method forces the ``ce`` loss; AKD only exists for ``fopro-kd``). Every reader takes
them from here instead of re-deriving them (issue 15: "values defaulted twice"): a
:class:`RunPlan` built by :func:`resolve_run_plan` from the validated config, plus
:func:`local_schedule` (which also needs the site's number of training images).

The plan is a pure function of the config, cheap to build; a module that holds the config
builds it where it needs it (``resolve_run_plan(cfg).local_dp``) or keeps one (the trainer).
Nothing here loads a model or reads a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fopro_kd.config import Config

__all__ = [
    "METHODS",
    "MethodTraits",
    "RunPlan",
    "local_schedule",
    "resolve_run_plan",
    "student_input_size",
    "teacher_input_size",
]


@dataclass(frozen=True)
class MethodTraits:
    """What a ``train.method`` uses: the frozen public teacher, the Fourier prompt, a forced loss."""

    uses_teacher: bool
    uses_prompt: bool
    forced_loss: str | None = None
    """The classification loss the method always uses whatever ``train.loss`` says (``ce`` for ``ce``)."""


METHODS: dict[str, MethodTraits] = {
    "ce": MethodTraits(uses_teacher=False, uses_prompt=False, forced_loss="ce"),
    "bsm": MethodTraits(uses_teacher=False, uses_prompt=False),
    "ekd": MethodTraits(uses_teacher=True, uses_prompt=False),
    "fopro-kd": MethodTraits(uses_teacher=True, uses_prompt=True),
}
"""Registry: ``train.method`` name -> what it uses (the config's ``Literal`` repeats these names;
tests/test_run_plan.py checks that the two agree)."""


OBJECTIVES_READING_BATCHNORM = frozenset({"bn_stats"})
"""``akd.mode`` objectives that hook the teacher's BatchNorm layers, so its BatchNorms must not be folded."""


@dataclass(frozen=True)
class RunPlan:
    """What a validated config resolves to; read these fields instead of comparing config strings.

    Built by :func:`resolve_run_plan`. Frozen: a plan describes one config; a changed config
    (e.g. the feature probe's per-setting copies) gets its own plan.
    """

    method: str
    """``train.method``."""
    uses_teacher: bool
    """The method distils from the frozen public teacher (``ekd``, ``fopro-kd``)."""
    uses_prompt: bool
    """The method trains through a Fourier prompt (``fopro-kd``)."""
    classification_loss: str
    """The loss name actually built (a :data:`fopro_kd.losses.LOSSES` key): ``ce`` for method ``ce``, else ``train.loss``."""
    akd_mode: str
    """The prompt's objective (``akd.mode``) for ``fopro-kd``, ``off`` for every other method. Under
    ``privacy.mode: local`` with ``privacy.prompt: frozen`` the DP context still turns it off when
    training starts (:class:`fopro_kd.privacy.local_dp.DPContext`); the reply's metric keys follow
    this field, so every site of a federation reports the same columns."""
    teacher_folds_batchnorm: bool
    """The shared teacher is built with its BatchNorms folded into its convolutions (same features up to
    float rounding, a faster forward and input gradient: fopro_kd/models/batchnorm_folding.py); false only
    for the objective that reads the teacher's BatchNorm layers (``akd.mode: bn_stats``)."""
    student_input_size: int
    """Side of the student's square input (:func:`student_input_size`)."""
    teacher_input_size: int | None
    """Side of the teacher's square input where the config fixes it (:func:`teacher_input_size`);
    None: the teacher's pretrained config decides when it is loaded (``FrozenTeacher.input_size``)."""
    privacy_mode: str
    """``privacy.mode`` (``off``, ``local`` or ``central``)."""
    local_dp: bool
    """Sample-level DP-SGD at every site (``privacy.mode: local``)."""
    central_dp: bool
    """User-level DP-FedAvg at the server (``privacy.mode: central``)."""
    any_dp: bool
    """Either DP mode: the GroupNorm DP student, no federated evaluation counts, no model reuse."""


def student_input_size(cfg: Config) -> int:
    """Side of the square images the student sees: ``student.input_size``, else ``data.image_size``."""
    return int(cfg.student.input_size or cfg.data.image_size)


def teacher_input_size(cfg: Config) -> int | None:
    """Side of the square images the teacher sees, where it is known without loading the teacher.

    The one rule: ``teacher.input_size`` when set; else the size the teacher's weights were
    trained at. For the built-in demo teacher (``teacher.source: demo``) that is
    ``data.image_size``, the size :func:`fopro_kd.models.demo_teacher.demo_teacher_path`
    pretrains (and names) the cached demo teacher at; for Hub / file / random weights it is the
    pretrained config of the timm model, known only once the model is created, so this returns
    None and :class:`fopro_kd.models.teacher.FrozenTeacher` takes it from the model (224 when the
    model has none).
    """
    if cfg.teacher.input_size is not None:
        return int(cfg.teacher.input_size)
    if cfg.teacher.source == "demo":
        return int(cfg.data.image_size)
    return None


def resolve_run_plan(cfg: Config) -> RunPlan:
    """The :class:`RunPlan` of a validated config (``ValueError`` for a method no registry knows)."""
    method = cfg.train.method
    traits = METHODS.get(method)
    if traits is None:
        raise ValueError(f"train.method must be one of {sorted(METHODS)}, got {method!r}")
    mode = cfg.privacy.mode
    return RunPlan(
        method=method,
        uses_teacher=traits.uses_teacher,
        uses_prompt=traits.uses_prompt,
        classification_loss=traits.forced_loss or cfg.train.loss,
        akd_mode=cfg.akd.mode if traits.uses_prompt else "off",
        teacher_folds_batchnorm=not (traits.uses_prompt and cfg.akd.mode in OBJECTIVES_READING_BATCHNORM),
        student_input_size=student_input_size(cfg),
        teacher_input_size=teacher_input_size(cfg),
        privacy_mode=mode,
        local_dp=mode == "local",
        central_dp=mode == "central",
        any_dp=mode != "off",
    )


def local_schedule(cfg: Config, num_train: int) -> tuple[int, int | None]:
    """(epochs, max_steps) of one federated round: ``local_epochs``, or enough epochs for ``local_steps`` batches."""
    steps = cfg.federation.local_steps
    if steps is None:
        return cfg.federation.local_epochs, None
    batches = max(1, math.ceil(num_train / cfg.train.batch_size))
    return max(1, math.ceil(steps / batches)), int(steps)
