"""Server checkpoints after every round, and what a resumed federation reads back.

After each round (the server-side evaluation of round k) the ServerApp writes
``<run dir>/checkpoints/server-round-XXXX.pt`` with :func:`fopro_kd.checkpoint.save_checkpoint`
(temporary file + fsync + rename, SHA-256 sidecar) and deletes all but the newest
:data:`KEEP_CHECKPOINTS`. A checkpoint holds everything the server needs to continue as if
it had never stopped:

* ``arrays``: the global model after round k (tensors, original dtypes and key order);
* ``round``, ``num_rounds``, ``config_hash`` (:func:`config_hash`), ``state_key`` (the
  clients' state folder name, sent to them every round) and ``run_uid``;
* ``strategy``: name, FedMAS rule, the DRW switch round and phase (derived from the round,
  stored for the record), the last round's robust factors per site;
* ``best``: best-validation round, its score, its test metrics and (when it is not round
  k itself) its weights;
* ``history`` (the rows of ``history.csv``), ``recorder`` (per-round weights, failures,
  rejections, site results), ``timings``, ``failed_streak``;
* ``rng``: Python, NumPy and torch random states at the end of round k.

:meth:`ServerCheckpointStore.load_latest` walks the checkpoints newest first: a corrupted,
truncated or sidecar-less file is logged and skipped in favour of the previous one; a
checkpoint whose config hash differs from the config being resumed is refused outright.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fopro_kd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fopro_kd.config import Config, experiment_settings
from fopro_kd.run_dir import RunDir

logger = logging.getLogger("fopro_kd.federation")

__all__ = [
    "CHECKPOINT_DIR",
    "KEEP_CHECKPOINTS",
    "SERVER_CHECKPOINT_FORMAT",
    "ResumeError",
    "ServerCheckpointStore",
    "arrays_from_tensors",
    "config_hash",
    "get_rng_state",
    "plain",
    "set_rng_state",
    "tensors_from_arrays",
]

SERVER_CHECKPOINT_FORMAT = "fopro-kd-server-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
_NAME = re.compile(r"^server-round-(\d{4,})\.pt$")
_REQUIRED = ("round", "num_rounds", "config_hash", "state_key", "arrays", "history", "recorder", "best", "rng")


class ResumeError(CheckpointError):
    """A run cannot be resumed (no usable checkpoint, another run's checkpoint, not a run directory)."""


# --------------------------------------------------------------------------- identity


def config_hash(cfg: Config) -> str:
    """SHA-256 of the resolved config (canonical JSON): a resumed run must be the identical experiment.

    Over :func:`fopro_kd.config.experiment_settings`: paths compared resolved, cache locations
    left out, so moving a feature cache does not orphan a federation's checkpoints.
    """
    text = json.dumps(experiment_settings(cfg.to_dict()), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- payload helpers


def plain(value: Any) -> Any:
    """Containers of Python scalars only (NumPy scalars/arrays converted), loadable with ``weights_only=True``."""
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (int, str)) else str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return plain(value.detach().cpu().tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def tensors_from_arrays(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` copies of an ArrayRecord (dtype and key order kept)."""
    return {key: torch.from_numpy(np.array(arrays[key].numpy(), copy=True)) for key in arrays.keys()}


def arrays_from_tensors(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({key: value.detach().cpu() for key, value in tensors.items()})


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch CPU random states as checkpoint-safe values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": int(np_state["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    })
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- store


class ServerCheckpointStore:
    """The rotating server checkpoints of one run directory (paths always through :meth:`RunDir.resolve`)."""

    def __init__(self, run: RunDir, keep: int = KEEP_CHECKPOINTS) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run = run
        self.keep = keep
        self.directory = run.resolve(CHECKPOINT_DIR)

    def path_for(self, server_round: int) -> Path:
        return self.run.resolve(f"{CHECKPOINT_DIR}/server-round-{int(server_round):04d}.pt")

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(round, path)`` of every checkpoint file present, newest round first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def save(self, payload: dict[str, Any]) -> Path:
        """Write the checkpoint of ``payload["round"]`` atomically, then drop all but the newest ``keep``.

        Old checkpoints are removed only after the new one (and its checksum) is on disk, so a
        failed write leaves the previous good checkpoint in place.
        """
        path = self.path_for(int(payload["round"]))
        save_checkpoint(path, {"format": SERVER_CHECKPOINT_FORMAT, **payload})
        for _, old in self.checkpoints()[self.keep:]:
            for victim in (old, old.with_name(old.name + ".sha256")):
                victim.unlink(missing_ok=True)
        return path

    def _check_payload(self, path: Path, payload: dict[str, Any]) -> None:
        missing = [key for key in _REQUIRED if key not in payload]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {missing}")
        match = _NAME.match(path.name)
        if match and int(match.group(1)) != int(payload["round"]):
            raise CheckpointError(f"checkpoint {path} holds round {payload['round']}, not the round in its name")
        bad = [k for k, v in payload["arrays"].items() if not isinstance(v, torch.Tensor)]
        if not payload["arrays"] or bad:
            raise CheckpointError(f"checkpoint {path} has no global model tensors (bad entries: {bad[:3]})")
        non_finite = [k for k, v in payload["arrays"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if non_finite:
            raise CheckpointError(f"checkpoint {path}: global model arrays {non_finite[:3]} are not finite")

    def load_latest(self, expected_hash: str, config_source: str = "the config") -> tuple[dict[str, Any], Path]:
        """The newest valid checkpoint, falling back past corrupted ones (each logged).

        Raises
        ------
        ResumeError
            When no checkpoint is usable, or the newest readable one belongs to another run
            (its config hash differs from ``expected_hash``; the message names both).
        """
        found = self.checkpoints()
        if not found:
            raise ResumeError(
                f"cannot resume {self.run.path}: no server checkpoint in {self.directory} (a run writes "
                "checkpoints/server-round-XXXX.pt after every round; this directory has none)"
            )
        problems: list[str] = []
        for _, path in found:
            sidecar = path.with_name(path.name + ".sha256")
            try:
                if not sidecar.is_file():
                    raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name} (incomplete write)")
                payload = load_checkpoint(path, expected_format=SERVER_CHECKPOINT_FORMAT)
                self._check_payload(path, payload)
            except CheckpointError as exc:
                logger.warning("refusing checkpoint: %s; trying the previous one", exc)
                problems.append(str(exc))
                continue
            if payload["config_hash"] != expected_hash:
                raise ResumeError(
                    f"checkpoint {path} belongs to another run: it was written with config hash "
                    f"{payload['config_hash'][:16]}, but {config_source} has config hash {expected_hash[:16]}; "
                    "resume with the run's own config (omit --config to use RUN_DIR/config.yaml)"
                )
            if problems:
                logger.warning("resuming from %s after skipping %d unusable newer checkpoint(s)", path, len(problems))
            return payload, path
        raise ResumeError(
            f"cannot resume {self.run.path}: no usable checkpoint ({len(problems)} refused): " + " | ".join(problems)
        )


def check_fresh_run_dir(path: str | Path) -> None:
    """Refuse to start a *new* run in a directory that already holds a run's server checkpoints.

    Starting over would overwrite the old run's history and checkpoints; the message says how
    to continue it instead.
    """
    directory = Path(path).resolve() / CHECKPOINT_DIR
    if not directory.is_dir():
        return
    rounds = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    if rounds:
        raise ResumeError(
            f"{Path(path).resolve()} already holds a federation's checkpoints (newest: round {rounds[-1]}); "
            f"continue it with `fopro-kd simulate --resume {Path(path)}` or choose another output directory"
        )
