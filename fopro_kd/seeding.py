"""Seeding and device selection: every run is reproducible from its config's seed.

The seeds derived from a run's seed have their formulas here, each named, with why it has its
offset (:func:`site_seed`, :func:`dp_stream_seeds`, :func:`support_draw_seed`, :func:`fold_run_seed`,
:func:`local_test_seed`, :func:`site_style_seed`): a caller uses the
function, never the arithmetic, so two modules cannot derive "the same" seed differently.
"""

from __future__ import annotations

import os
import random
from typing import NamedTuple

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; on CPU torch kernels are then deterministic."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


class DPSeeds(NamedTuple):
    """Seeds of the three random streams of one DP mechanism (:func:`dp_stream_seeds`)."""

    sample: int
    """Poisson sampling of the batches (which examples a step sees)."""
    noise: int
    """The Gaussian noise added to the clipped gradients."""
    statistics: int
    """The Gaussian noise of the released class counts."""


def dp_stream_seeds(seed: int) -> DPSeeds:
    """The sampling, gradient-noise and count-noise seeds of one DP-SGD run: ``seed``, ``seed + 1``, ``seed + 2``.

    Why three offsets of one seed: the DP analysis assumes the batch sampling, the gradient noise
    and the noise of the class-count release are independent draws; three generators seeded alike
    would draw the same random sequence (the torch sampler and the torch noise generator would
    replay each other's numbers). ``seed`` is secret (``secrets.randbits``) unless
    ``privacy.noise_seed`` fixes it for reproducible tests, which voids the guarantee. Used by the
    trainer's DP context (:mod:`fopro_kd.privacy.local_dp`) and the DP feature probe
    (:mod:`fopro_kd.privacy.feature_probe`), so both draw the same streams from the same seed.
    """
    seed = int(seed)
    return DPSeeds(sample=seed, noise=seed + 1, statistics=seed + 2)


def site_seed(seed: int, site_id: int) -> int:
    """The torch seed of a federated site's prompt and probe initialisation: ``seed * 1000 + site_id``.

    Why: every hospital starts its own Fourier prompt and AKD probe (they never leave the site),
    and the sites' initialisations should be different draws, yet reproducible from the run
    seed. Seeding after the student (which may or may not be built in that call: the client
    reuses models across rounds) gives the same initialisation either way. The factor 1000
    keeps ``(seed, site_id)`` pairs apart for up to 1000 sites (seed 1, site 0 would otherwise
    meet seed 0, site 1).
    """
    return int(seed) * 1000 + int(site_id)


def support_draw_seed(seed: int) -> int:
    """The seed of the prototype objective's per-step support draws: ``seed + 1``.

    Why the offset: the support fold itself is drawn with ``seed``
    (:func:`fopro_kd.prompt_objectives.support_fold`); the draws of support images at each step
    come from a second generator, which with the same seed would start by replaying the
    fold's own random numbers.
    """
    return int(seed) + 1


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def configure_threads(num_threads: int | None) -> None:
    if num_threads is not None and num_threads > 0:
        torch.set_num_threads(num_threads)


FOLD_SEED_STRIDE = 1000
"""Run seeds of the folds of one repeat are ``seed * FOLD_SEED_STRIDE + fold`` (folds < 1000)."""


def fold_run_seed(seed: int, fold: int | None) -> int:
    """The run seed of fold ``fold`` of repeat ``seed`` in a k-fold benchmark: ``seed * 1000 + fold``.

    Why not ``seed`` for every fold: each fold is a separate training run, and its
    initialisation and batch order should be independent draws (the fold interval of
    :func:`fopro_kd.stats.fold_t_interval` treats them so); ``seed`` stays the label of the
    repeat. Without folds (``fold`` None) the run seed is ``seed`` itself.
    """
    return int(seed) if fold is None else int(seed) * FOLD_SEED_STRIDE + int(fold)


def local_test_seed(seed: int, site_id: int) -> int:
    """The seed of site ``site_id``'s local test cut: ``seed * 1_000_003 + 7919 * (site_id + 1)``.

    Why these constants: two primes keep every (run seed, site) pair on its own seed (no two
    sites of one run, and no site of seed s and another of seed s + 1, share a cut), so a
    site's local test images change with the run seed but never coincide with another site's draw.
    """
    return int(seed) * 1_000_003 + 7919 * (int(site_id) + 1)


def site_style_seed(synthetic_seed: int, site_id: int, part: str) -> int:
    """The seed that regenerates a synthetic site's ``part`` (``train`` or test) under its scanner style.

    ``synthetic_seed * 1_000_003 + 104_729 * (site_id + 1) + (0 for train, 1 otherwise)``: a
    distinct prime from :func:`local_test_seed`'s so style draws and test cuts never share a seed,
    and the train and test images of one site are different draws.
    """
    return int(synthetic_seed) * 1_000_003 + 104_729 * (int(site_id) + 1) + (0 if part == "train" else 1)
