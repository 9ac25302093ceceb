"""A prompt shared by the federation (``prompt.scope: federated``): the rule, without Flower.

With per-site prompts every hospital distils towards its own T∘FPG_k, so FedMAS's
teacher-distance priors of different sites measure distances to different targets. With
``scope: federated`` the prompt's parameters are averaged by the server during the exploration
rounds of ``prompt.schedule: two_stage``, then frozen: every site distils towards the same
T∘FPG and caches the same targets for its own images.

Protocol (wire keys below; both apps import them from here):

- every train instruction of a federated-prompt run carries ``prompt-explore`` (1 while the
  round explores, 0 after) and, once the server holds one, the global prompt as the ArrayRecord
  ``prompt``;
- a site loads the global prompt (over its own state) before training; in an exploring round it
  trains the prompt online with the student and replies with its prompt under ``prompt``; after
  exploration it freezes the received prompt and caches T(FPG(v(x))); it sends no prompt;
- the server averages the valid replies' prompts with the same weights as the students.

What leaves a hospital: during exploration, the prompt's parameters (``radial``: rings ×
channels, 24 numbers by default), trained on its images (and labels, for label-using
objectives). That is a release like the student's weights; under differential privacy it is
not privatised, so the combination is refused (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fopro_kd.federation.wire import PROMPT_ARRAYS_KEY, PROMPT_EXPLORE_KEY
from fopro_kd.config import Config, ConfigError, PromptConfig

__all__ = [
    "MAX_FEDERATED_PROMPT_PARAMS",
    "PROMPT_ARRAYS_KEY",
    "PROMPT_EXPLORE_KEY",
    "average_prompts",
    "check_federated_prompt",
    "explore_rounds",
    "prompt_parameter_count",
]

MAX_FEDERATED_PROMPT_PARAMS = 100_000
"""A prompt with more parameters than this is not sent every round (a ``free`` mask at 224 px has
3 x 224 x 113 = 75,936; at 448 px four times more): use ``radial`` (K x 3) or ``generator``."""


def prompt_parameter_count(prompt: PromptConfig, image_size: int, channels: int = 3) -> int:
    """Number of learnable prompt parameters at the teacher input size ``image_size``."""
    if prompt.param == "radial":
        return channels * prompt.radial_bands
    if prompt.param == "free":
        width = image_size // 2 + 1 if prompt.fft == "rfft2" else image_size
        return channels * image_size * width
    h = prompt.generator_hidden  # conv3x3(C->h) + conv3x3(h->h) + conv1x1(h->C), with biases
    return (channels * h * 9 + h) + (h * h * 9 + h) + (h * channels + channels)


def explore_rounds(cfg: Config) -> int:
    """Rounds whose local training explores the prompt: ``explore_epochs`` local epochs' worth.

    With ``federation.local_epochs`` E per round, ⌈explore_epochs / E⌉ rounds; with
    ``federation.local_steps`` (a round is a fixed number of batches, a fraction of an epoch at
    large sites) every round counts as one epoch of exploration.
    """
    epochs = cfg.prompt.explore_epochs
    if cfg.federation.local_steps is not None:
        return epochs
    return math.ceil(epochs / max(1, cfg.federation.local_epochs))


def check_federated_prompt(cfg: Config, teacher_input_size: int | None) -> None:
    """``prompt.scope: federated`` rules; raises :class:`ConfigError` naming the field."""
    if cfg.prompt.scope != "federated":
        return
    if cfg.train.method != "fopro-kd" or cfg.prompt.schedule != "two_stage":
        raise ConfigError(
            "'prompt.scope' federated needs train.method 'fopro-kd' with prompt.schedule 'two_stage' (the prompt "
            f"is averaged during exploration, then frozen); got method {cfg.train.method!r}, schedule "
            f"{cfg.prompt.schedule!r}")
    if cfg.privacy.mode != "off":
        raise ConfigError(
            "'prompt.scope' federated cannot run with privacy.mode "
            f"{cfg.privacy.mode!r}: the prompt's update is not privatised (docs/privacy.md); use prompt.scope local")
    rounds = explore_rounds(cfg)
    if rounds >= cfg.federation.num_rounds:
        raise ConfigError(
            f"'prompt.explore_epochs' ({cfg.prompt.explore_epochs}) takes {rounds} round(s) of exploration, not fewer "
            f"than 'federation.num_rounds' ({cfg.federation.num_rounds}): no round would distil from the shared prompt")
    if teacher_input_size is not None:
        count = prompt_parameter_count(cfg.prompt, teacher_input_size)
        if count > MAX_FEDERATED_PROMPT_PARAMS:
            raise ConfigError(
                f"'prompt.param' {cfg.prompt.param!r} has {count} parameters at the teacher input size "
                f"{teacher_input_size}: too many to send every round with prompt.scope federated (limit "
                f"{MAX_FEDERATED_PROMPT_PARAMS}); use prompt.param 'radial'")


def average_prompts(prompts: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of prompt state dicts with identical keys and shapes (float32 result)."""
    if not prompts:
        raise ValueError("average_prompts: no prompts")
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(prompts) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"average_prompts: bad weights {list(weights)}")
    w = w / w.sum()
    keys = sorted(prompts[0])
    out: dict[str, np.ndarray] = {}
    for key in keys:
        stacked = np.stack([np.asarray(p[key], dtype=np.float64) for p in prompts])
        out[key] = np.tensordot(w, stacked, axes=1).astype(np.float32)
    return out


def prompt_problem(prompt: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> str | None:
    """Why a reply's prompt cannot be averaged (keys, shapes, non-finite values), or None."""
    if reference is not None:
        if sorted(prompt) != sorted(reference):
            return f"prompt: keys {sorted(prompt)} differ from {sorted(reference)}"
        for key, value in prompt.items():
            if np.shape(value) != np.shape(reference[key]):
                return f"prompt: {key!r} has shape {np.shape(value)}, expected {np.shape(reference[key])}"
    for key, value in prompt.items():
        if not np.all(np.isfinite(value)):
            return f"prompt: {key!r} holds non-finite values"
    return None
