"""Values derived from the config, resolved in one place so that no two modules default them differently.

A config leaves some values to be derived (``student.input_size: null`` means the data's
size; ``federation.local_steps`` turns into a number of local epochs and a step cap). Every
reader calls the function here instead of re-deriving it (issue 15: "values defaulted twice").
"""

from __future__ import annotations

import math

from fopro_kd.config import Config

__all__ = ["local_schedule", "student_input_size"]


def student_input_size(cfg: Config) -> int:
    """Side of the square images the student sees: ``student.input_size``, else ``data.image_size``."""
    return int(cfg.student.input_size or cfg.data.image_size)


def local_schedule(cfg: Config, num_train: int) -> tuple[int, int | None]:
    """(epochs, max_steps) of one federated round: ``local_epochs``, or enough epochs for ``local_steps`` batches."""
    steps = cfg.federation.local_steps
    if steps is None:
        return cfg.federation.local_epochs, None
    batches = max(1, math.ceil(num_train / cfg.train.batch_size))
    return max(1, math.ceil(steps / batches)), int(steps)
