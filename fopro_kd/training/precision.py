"""The numeric precision of every training and evaluation forward pass.

Its own module because the trainer, the FedMAS statistics (:mod:`fopro_kd.training.results`)
and prediction all need the same rule, and the DP code imports the statistics without the
trainer (no import circle between :mod:`fopro_kd.privacy.local_dp` and the trainer).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_context"]


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (the step is matmul/conv bound there); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
