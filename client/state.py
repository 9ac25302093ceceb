"""Client state that survives between federated rounds and never leaves the hospital.

What persists (per site): the :class:`~fopro_kd.training.trainer.LocalTrainer` state
(optimizer moments, the Fourier prompt and its probe, the prompt optimizer, the RNG,
epochs done), the local class counts and a round counter. The student weights are *not*
stored: they arrive from the server every round.

Why a directory and not only ``context.state``: in simulation a node's Ray actor may be
reused or not, and in deployment every message runs in a fresh ``flwr-clientapp``
process, where ``context.state`` persistence is not confirmed (libraries.md §5). The
state file is written atomically with a checksum (:mod:`fopro_kd.checkpoint`) and read
back with ``weights_only=True``. A small summary is mirrored into ``context.state`` so the
engine's own record of the node shows what the client remembers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fopro_kd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["CLIENT_STATE_FORMAT", "ClientState", "ClientStateStore", "default_state_root"]

CLIENT_STATE_FORMAT = "fopro-kd-client-state/1"
STATE_FILE = "client_state.pt"


def default_state_root() -> Path:
    """``$FOPRO_KD_CACHE/client-state`` (default ``~/.cache/fopro-kd/client-state``)."""
    base = Path(os.environ.get("FOPRO_KD_CACHE", Path.home() / ".cache" / "fopro-kd"))
    return base / "client-state"


@dataclass
class ClientState:
    """What one site remembers between rounds."""

    site_id: int
    trainer: dict[str, Any] | None = None
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rounds_trained: int = 0
    last_round: int = 0

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": CLIENT_STATE_FORMAT,
            "site_id": int(self.site_id),
            "trainer": self.trainer,
            "class_counts": torch.as_tensor(np.asarray(self.class_counts, dtype=np.int64)),
            "rounds_trained": int(self.rounds_trained),
            "last_round": int(self.last_round),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ClientState:
        return cls(
            site_id=int(payload["site_id"]),
            trainer=payload.get("trainer"),
            class_counts=np.asarray(payload["class_counts"].numpy(), dtype=np.int64),
            rounds_trained=int(payload["rounds_trained"]),
            last_round=int(payload["last_round"]),
        )


class ClientStateStore:
    """One site's state directory: ``<root>/<run>/site-<id>/client_state.pt``.

    Parameters
    ----------
    root : Path
        Private folder of the node (simulation: the run directory's ``client_state``;
        deployment: node config ``state-dir`` or :func:`default_state_root`).
    run_key : str
        Separates runs, so a new run never resumes an old run's optimizer.
    site_id : int
        The site whose state this is.
    """

    def __init__(self, root: str | Path, run_key: str, site_id: int) -> None:
        self.site_id = int(site_id)
        self.directory = Path(root).expanduser() / run_key / f"site-{self.site_id}"
        self.path = self.directory / STATE_FILE

    def load(self) -> ClientState:
        """The saved state, or a fresh one (first round, or an unreadable file, which is logged)."""
        if not self.path.is_file():
            return ClientState(self.site_id)
        try:
            payload = load_checkpoint(self.path, expected_format=CLIENT_STATE_FORMAT)
        except CheckpointError as exc:
            logger.warning("site-%d: ignoring unreadable client state (%s); starting fresh", self.site_id, exc)
            return ClientState(self.site_id)
        state = ClientState.from_payload(payload)
        if state.site_id != self.site_id:
            logger.warning("site-%d: state file %s belongs to site-%d; starting fresh", self.site_id, self.path,
                           state.site_id)
            return ClientState(self.site_id)
        return state

    def save(self, state: ClientState) -> str:
        """Write atomically; return the SHA-256 of the file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(self.path, state.to_payload())
