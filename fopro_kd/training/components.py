"""Builds the method's models from a config: shared teacher, student (plain or DP), prompt.

The teacher is loaded once per process and shared (a simulation process serves many
virtual hospitals; a teacher copy per hospital would multiply memory for nothing).
The DP student is built here too (:func:`build_dp_student`): this module imports the model
surgery of :mod:`fopro_kd.privacy.surgery`, which converts a given model and imports no builder.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from fopro_kd.config import Config, TeacherConfig
from fopro_kd.models.demo_teacher import demo_teacher_path
from fopro_kd.models.student import EKDStudent, build_student
from fopro_kd.models.teacher import FrozenTeacher, build_teacher
from fopro_kd.privacy.surgery import make_student_private_compatible
from fopro_kd.prompt import FourierPrompt, build_prompt
from fopro_kd.run_plan import resolve_run_plan

logger = logging.getLogger("fopro_kd.training")

_TEACHERS: dict[tuple, FrozenTeacher] = {}
_LOCK = threading.Lock()


def uses_teacher(cfg: Config) -> bool:
    """The method distils from the frozen teacher (:attr:`fopro_kd.run_plan.RunPlan.uses_teacher`)."""
    return resolve_run_plan(cfg).uses_teacher


def planned_teacher(cfg: Config) -> TeacherConfig:
    """``cfg.teacher`` with the input size of the one rule (:func:`fopro_kd.run_plan.teacher_input_size`).

    Only a demo teacher without ``teacher.input_size`` changes: it is built at ``data.image_size``,
    the size it is pretrained (and cached) at, not at its architecture's ImageNet size.
    """
    size = resolve_run_plan(cfg).teacher_input_size
    if size is None or size == cfg.teacher.input_size:
        return cfg.teacher
    return dataclasses.replace(cfg.teacher, input_size=size)


def _teacher_key(t: TeacherConfig, fold_batchnorm: bool) -> tuple:
    return (t.arch, t.source, t.file, t.input_size, t.mean, t.std, tuple(sorted(t.model_kwargs.items())),
            fold_batchnorm)


def shared_teacher(cfg: Config) -> FrozenTeacher | None:
    """The process-wide frozen teacher for ``cfg`` (None for methods without a teacher)."""
    if not uses_teacher(cfg):
        return None
    planned = planned_teacher(cfg)
    fold = resolve_run_plan(cfg).teacher_folds_batchnorm
    key = _teacher_key(planned, fold)
    with _LOCK:
        teacher = _TEACHERS.get(key)
        if teacher is None:
            demo_file = str(demo_teacher_path(cfg)) if cfg.teacher.source == "demo" else None
            teacher = build_teacher(planned, demo_file=demo_file, fold_batchnorm=fold)
            logger.info("teacher %s loaded: %s (feature dim %d)", teacher.arch, teacher.weights_desc, teacher.feature_dim)
            _TEACHERS[key] = teacher
        return teacher


def clear_teacher_cache() -> None:
    with _LOCK:
        _TEACHERS.clear()


def build_configured_student(
    cfg: Config, num_classes: int, teacher_dim: int | None, load_weights: bool = True
) -> EKDStudent:
    """:func:`build_student` with what ``student.init: teacher`` needs from the teacher section.

    ``load_weights=False``: architecture only, for callers that load a whole state dict next
    (no weights file read, no demo teacher pretrained on a cache miss).
    """
    demo_file = None
    if load_weights and cfg.student.init == "teacher" and cfg.teacher.source == "demo":
        demo_file = str(demo_teacher_path(cfg))
    return build_student(cfg.student, num_classes, teacher_dim, teacher=cfg.teacher, demo_teacher_file=demo_file,
                         load_weights=load_weights)


def build_dp_student(cfg: Config, num_classes: int, teacher_dim: int | None, load_weights: bool = True) -> EKDStudent:
    """The DP student every participant builds: :func:`build_configured_student` then the conversion
    (:func:`fopro_kd.privacy.surgery.make_student_private_compatible`).

    Seed torch before calling it (as for ``build_student``) to get the same initial weights.
    """
    student = build_configured_student(cfg, num_classes, teacher_dim, load_weights=load_weights)
    return make_student_private_compatible(student, zero_init_last=cfg.student.init == "random")


def build_federated_student(
    cfg: Config, num_classes: int, teacher_dim: int | None, load_weights: bool = True
) -> EKDStudent:
    """The student every participant builds for ``cfg``: with DP on, the converted student of
    :func:`build_dp_student` (what the federation aggregates, docs/privacy.md)."""
    if resolve_run_plan(cfg).any_dp:
        return build_dp_student(cfg, num_classes, teacher_dim, load_weights=load_weights)
    return build_configured_student(cfg, num_classes, teacher_dim, load_weights=load_weights)


def build_models(
    cfg: Config, num_classes: int, teacher: FrozenTeacher | None, load_weights: bool = True
) -> tuple[EKDStudent, FourierPrompt | None]:
    """A fresh student (with EKD heads when a teacher is used) and, for fopro-kd, a prompt.

    ``load_weights=False`` skips reading the student's pretrained weights (a client that loads
    the global model into it next).
    """
    teacher_dim = teacher.feature_dim if teacher is not None else None
    student = build_federated_student(cfg, num_classes, teacher_dim, load_weights=load_weights)
    return student, build_configured_prompt(cfg, teacher)


def build_configured_prompt(cfg: Config, teacher: FrozenTeacher | None) -> FourierPrompt | None:
    """A fresh Fourier prompt at the teacher's input size for ``fopro-kd``; None for the other methods."""
    if not resolve_run_plan(cfg).uses_prompt:
        return None
    if teacher is None:
        raise ValueError("train.method 'fopro-kd' needs a teacher")
    return build_prompt(cfg.prompt, teacher.input_size)
