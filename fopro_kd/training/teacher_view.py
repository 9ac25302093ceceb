"""The teacher's view of a batch: resize, optional Fourier prompt, normalisation, features.

Kept apart from the trainer because three callers need exactly the same path: the
student step, the prompt step and the FedMAS per-class prior. ``prompt.domain`` decides
whether the prompt acts on raw [0, 1] pixels (then the teacher normalises the prompted
image, the default) or on already-normalised pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
