"""The teacher's view of a batch: resize, optional Fourier prompt, normalisation, features.

Kept apart from the trainer because three callers need exactly the same path: the
student step, the prompt step and the FedMAS per-class prior. ``prompt.domain`` decides
whether the prompt acts on raw [0, 1] pixels (then the teacher normalises the prompted
image, the default) or on already-normalised pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fopro_kd.data.transforms import resize_batch
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.prompt import FourierPrompt


def teacher_features(
    teacher: FrozenTeacher,
    x01: Tensor,
    prompt: FourierPrompt | None = None,
    domain: str = "raw",
) -> Tensor:
    """Features of the frozen teacher on the (optionally prompted) image ``x01`` in [0, 1].

    Gradients flow to ``prompt`` (the teacher's own parameters are frozen), so callers
    wrap this in ``torch.no_grad()`` when they only need the target.
    """
    x = teacher.resize(x01)
    if prompt is None:
        return teacher.features(teacher.normalize(x))
    if domain == "raw":
        return teacher.features(teacher.normalize(prompt(x)))
    if domain == "normalised":
        return teacher.features(prompt(teacher.normalize(x)))
    raise ValueError(f"prompt.domain must be 'raw' or 'normalised', got {domain!r}")


@torch.no_grad()
def teacher_targets(teacher: FrozenTeacher, x01: Tensor, prompt: FourierPrompt | None, domain: str) -> Tensor:
    """Distillation targets: teacher features without building an autograd graph."""
    return teacher_features(teacher, x01, prompt, domain)


@torch.no_grad()
def teacher_shift(teacher: FrozenTeacher, x01: Tensor, prompt: FourierPrompt, domain: str) -> float:
    """Mean 2 − 2 cos(T(x), T(FPG(x))) over ``x01``: how far the prompt moves the distillation target.

    The same geometry as ℓ_rep, so it reads against a training ℓ_rep (≈ 0.8 on HAM10000): a prompt
    whose shift is ~1e-4 cannot change what the student learns.
    """
    plain = torch.nn.functional.normalize(teacher_targets(teacher, x01, None, domain).float(), dim=1)
    prompted = torch.nn.functional.normalize(teacher_targets(teacher, x01, prompt, domain).float(), dim=1)
    return float((2.0 - 2.0 * (plain * prompted).sum(dim=1)).mean())


def prompted_student_input(teacher: FrozenTeacher, x01: Tensor, prompt: FourierPrompt, size: int) -> Tensor:
    """x̃ = FPG(x) as the teacher sees it (``prompt.domain: raw``), resized to the student's ``size``.

    ``akd.student_input: prompted``: the student learns on the very image whose features it is
    asked to match, not on the un-prompted one. Differentiable w.r.t. the prompt (the advkd
    prompt step needs that); the student step calls it under ``torch.no_grad()``.
    """
    return resize_batch(prompt(teacher.resize(x01)), size)
