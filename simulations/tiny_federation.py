"""The tiny federation that the tests and ``bench --quick`` run.

Three hospitals, 4 classes at 32 px, ~30 training images each, timm's ``test_resnet`` student
and a random ``test_resnet`` teacher, 2 local steps: a round takes seconds on 2 cores and its
accuracy means nothing. One definition, so the quick benchmarks and the tests exercise the
same federation instead of drifting copies of it.
"""

from __future__ import annotations

import copy
from typing import Any

_TINY_FEDERATION: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "data": {"kind": "synthetic", "image_size": 32, "num_classes": 4, "max_per_class": 40, "imbalance_factor": 4},
    "split": {"val_per_class": 4, "test_per_class": 4},
    "student": {"arch": "test_resnet"},
    "teacher": {"arch": "test_resnet", "source": "none", "input_size": 32},
    "train": {"method": "fopro-kd", "batch_size": 8, "eval_batch_size": 64},
    "federation": {"num_clients": 3, "num_rounds": 2, "local_steps": 2, "min_available_clients": 3},
}


def tiny_federation_values(**sections: dict[str, Any]) -> dict[str, Any]:
    """Config values of the tiny federation; each keyword names a section whose keys update the defaults.

    The update is one level deep: ``federation={"partition": {...}}`` replaces the partition section.
    """
    values = copy.deepcopy(_TINY_FEDERATION)
    for name, extra in sections.items():
        values[name] = {**values.get(name, {}), **copy.deepcopy(extra)}
    return values
