"""Resume a stopped single-site run at the next epoch, with the result it would have had.

Long comparisons (HAM10000 5-fold: ~6 h of a 2-core machine) outlive a working session; a run
stopped at epoch 6 of 8 should not start over. After every epoch the run directory gets
``resume_state.pt`` (atomic, with a checksum: :mod:`fopro_kd.checkpoint`): the student, the
trainer's state (optimizer moments, prompt and its optimizer, probe, the augmentation
generator, epochs done, the prompt objective's draw stream), the best-so-far selection, the
history rows, torch's global random state and the config. ``fopro-kd train --resume`` (and
``benchmark_methods --skip-finished``) continues from it; a config that differs in any setting
(not in where its caches live) is refused naming the file. The file is removed once the run has written its metrics (a
finished run is not resumable, it is done). Teacher features are not stored: the cache comes
back from ``train.feature_cache_dir`` or is recomputed, and it is a function of the frozen
prompt, so the targets are the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fopro_kd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fopro_kd.config import Config, experiment_settings
from fopro_kd.run_dir import RunDir

__all__ = ["RESUME_FILE", "ResumeState", "drop_resume_state", "load_resume_state", "save_resume_state"]

RESUME_FILE = "resume_state.pt"
RESUME_FORMAT = "fopro-kd-single-site-resume/1"


def _config_text(cfg: Config) -> str:
    """The experiment ``cfg`` describes (:func:`~fopro_kd.config.experiment_settings`), as canonical text."""
    return json.dumps(experiment_settings(cfg.to_dict()), sort_keys=True, default=str)


@dataclass
class ResumeState:
    """What a run needs to continue after ``epochs_done`` epochs."""

    epochs_done: int
    student: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    torch_rng: torch.Tensor


def save_resume_state(run: RunDir, cfg: Config, state: ResumeState) -> Path:
    """Write the state after an epoch (atomic: a crash mid-write leaves the previous epoch's file)."""
    path = run.resolve(RESUME_FILE)
    save_checkpoint(path, {
        "format": RESUME_FORMAT, "config": _config_text(cfg), "epochs_done": int(state.epochs_done),
        "student": state.student, "trainer": state.trainer, "best": state.best, "history": state.history,
        "torch_rng": state.torch_rng,
    })
    return path


def load_resume_state(run: RunDir, cfg: Config) -> ResumeState | None:
    """The state of a stopped run of exactly ``cfg`` in ``run``; ``None`` when there is none to resume.

    Raises
    ------
    ValueError
        The file belongs to a run with another config (naming the file), or is not a resume state.
    CheckpointError
        The file is corrupt (its checksum does not match).
    """
    path = run.resolve(RESUME_FILE)
    if not path.is_file():
        return None
    payload = load_checkpoint(path)
    if payload.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path} is not a single-site resume state (format {payload.get('format')!r})")
    if payload["config"] != _config_text(cfg):
        raise ValueError(f"{path} belongs to a run with another config; resume with that config or start the run "
                         "in a new directory")
    return ResumeState(epochs_done=int(payload["epochs_done"]), student=payload["student"],
                       trainer=payload["trainer"], best=payload["best"], history=[dict(r) for r in payload["history"]],
                       torch_rng=payload["torch_rng"])


def drop_resume_state(run: RunDir) -> None:
    """The run finished: its resume state (and checksum) go, so that nothing resumes a finished run."""
    path = run.resolve(RESUME_FILE)
    for victim in (path, path.with_name(path.name + ".sha256")):
        victim.unlink(missing_ok=True)
