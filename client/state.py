"""Client state that survives between federated rounds and never leaves the hospital.

What persists (per site): the :class:`~fopro_kd.training.trainer.LocalTrainer` state
(optimizer moments, the Fourier prompt and its probe, the prompt optimizer, the RNG,
epochs done; with ``privacy.mode: local`` also ``trainer.state_dict()["privacy"]``, the DP
accountant history and the released class counts, so ε composes over the whole federation),
the local class counts and a round counter. The student weights are *not* stored: they
arrive from the server every round. A round declined for lack of privacy budget saves
nothing (nothing was spent).

The DP history kept here is a copy, not the authority: this state may legitimately be
reloaded from an earlier round (resume) or start fresh when its file is unreadable, so the
privacy spent is kept in the append-only privacy ledger
(:mod:`fopro_kd.privacy.ledger`, ``<root>/privacy-ledger/site-<id>.json``), which the client
loads over it every round and which nothing here rolls back.

Why a directory and not only ``context.state``: in deployment every message runs in a fresh
``flwr-clientapp`` process, where ``context.state`` persistence is not confirmed
(libraries.md §5). The state file is written atomically with a checksum
(:mod:`fopro_kd.checkpoint`) and read back with ``weights_only=True``. A small summary is
mirrored into ``context.state`` so the engine's own record of the node shows what the
client remembers.

In **simulation** the state also lives in memory: Flower's simulation engine keeps each
node's ``context.state`` in the driver and hands it to whichever Ray actor serves the node
next (``flwr/server/superlink/fleet/vce/vce_api.py``: ``retrieve_context`` /
``update_context``), so a per-actor dict would be wrong (a site is not pinned to an actor)
while ``context.state`` is right. :class:`ClientStateStore` with ``memory=context.state``
keeps the serialised state there every round (:data:`MEMORY_STATE_KEY`, about the size of
the optimizer moments: 89.5 MB for a ResNet-18 student, held by the driver for every site)
and writes the file only when asked (``persist``, every ``federation.state_persist_every``
rounds: :func:`fopro_kd.round_schedule.persists_round`). A killed simulation loses the
memory copy and resumes from the files of the last persisted round, the round of the
server's last checkpoint too.

Where the kept state lives (``federation.state_memory``): with ``context`` the serialised
state itself is the ``context.state`` record, so Ray carries it from the driver to the actor
and back with every message (twice 89.5 MB per site and round). With ``node`` (the default on
one machine) it is a file in this machine's shared memory (:func:`new_live_root`, under
``/dev/shm``), written without fsync and read by whichever actor serves the site next; the
``context.state`` record holds only a one-use token (a random nonce also stored in the file),
so a file left by another run, another round or a killed run is never mistaken for the
site's state: a missing or mismatched file is :class:`ClientStateLost`, not a fresh start.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from flwr.app import ConfigRecord, RecordDict

from fopro_kd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fopro_kd.federation.wire import STATE_KEY

if TYPE_CHECKING:
    from fopro_kd.config import Config

logger = logging.getLogger("fopro_kd.federation")

__all__ = [
    "CLIENT_STATE_FORMAT",
    "MEMORY_STATE_KEY",
    "ClientState",
    "ClientStateLost",
    "LIVE_STATE_ENV",
    "STATE_KEY",
    "ClientStateStore",
    "check_state_key",
    "default_state_root",
    "new_live_root",
    "remove_live_root",
    "state_memory_mode",
    "site_has_state",
]

CLIENT_STATE_FORMAT = "fopro-kd-client-state/1"
MEMORY_STATE_KEY = "fopro-kd-client-state"
"""``context.state`` record holding a simulated site's serialised state between persists."""
STATE_FILE = "client_state.pt"
PREV_STATE_FILE = "client_state.prev.pt"


LIVE_STATE_ENV = "FOPRO_KD_LIVE_STATE"
"""Environment variable naming the folder for :func:`new_live_root` (default: ``/dev/shm``, else the temp dir)."""


class ClientStateLost(RuntimeError):
    """A simulated site's state kept on this machine between persists is gone or belongs to someone else."""


def state_memory_mode(cfg: Config) -> Literal["node", "context"]:
    """Where a simulated site keeps its state between persists: ``federation.state_memory``, ``auto`` resolved.

    ``auto``: ``node`` (a shared-memory file on this machine) unless the simulation joins a Ray
    cluster (``federation.ray_address``), where a site may be served by another machine next
    round and only ``context`` (the engine carries the state) is right.
    """
    mode = cfg.federation.state_memory
    if mode == "auto":
        return "context" if cfg.federation.ray_address else "node"
    return mode


SHARED_MEMORY_MIN_FREE = 2 * 2**30
"""``/dev/shm`` is used only with this much free (bytes): containers often mount it with 64 MB."""


def new_live_root() -> Path:
    """A fresh folder for one simulation's kept states: ``$FOPRO_KD_LIVE_STATE`` or ``/dev/shm``, else the temp dir.

    One folder per simulation process (a random name), removed by :func:`remove_live_root` when
    the simulation ends, so nothing of a killed or finished run is read by the next one.
    ``/dev/shm`` is memory: no disk writes between persists, like ``context.state``; it is
    skipped when it has less than :data:`SHARED_MEMORY_MIN_FREE` free (the temp dir then: files
    in the page cache, written back to disk by the kernel).
    """
    env = os.environ.get(LIVE_STATE_ENV)
    shm = Path("/dev/shm")
    if env:
        base = Path(env).expanduser()
    elif shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= SHARED_MEMORY_MIN_FREE:
        base = shm
    else:
        base = Path(tempfile.gettempdir())
        logger.info("simulated sites keep their state between persists in %s (no roomy /dev/shm)", base)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="fopro-kd-live-", dir=base))


def remove_live_root(root: Path | None) -> None:
    """Remove a :func:`new_live_root` folder and every state kept in it (end of a simulation, also after a failure)."""
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


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


def site_has_state(root: str | Path, site_id: int) -> bool:
    """Whether ``site_id`` left client state under ``root`` in any federation (any run key).

    Evidence for the privacy ledger (:mod:`fopro_kd.privacy.ledger`) that the site has
    trained before: a missing ledger is then a refusal, not a fresh start.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        return False
    return any(any(base.glob(f"*/site-{int(site_id)}/{name}")) for name in (STATE_FILE, PREV_STATE_FILE))


STATE_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What a run key (a folder name under the state root) may look like: no separators, no ``..``."""


def check_state_key(key: str, where: str = "client state") -> str:
    """``key`` if it is a safe single folder name, else ``ValueError`` naming ``where`` and the key.

    The key arrives from the server in the train instruction (``"state-key"``); a key such as
    ``../../etc`` must never make a hospital write outside its state root.
    """
    if not isinstance(key, str) or not STATE_KEY_PATTERN.fullmatch(key) or ".." in key:
        raise ValueError(
            f"{where}: refusing state key {key!r}: it must be one folder name of letters, digits, '.', '_' or '-' "
            "(max 128 characters, no '..', no path separators)"
        )
    return key


class ClientStateStore:
    """One site's state directory: ``<root>/<run key>/site-<id>/client_state.pt`` (+ ``client_state.prev.pt``).

    The two newest states are kept (the current one and the one of the round before), so a
    federation resumed from the server's checkpoint of round k finds the client's state of
    round k even when the site had already trained round k + 1 before the server was killed
    (:meth:`load` with ``before_round``).

    Parameters
    ----------
    root : Path
        Private folder of the node (simulation: the run directory's ``client_state``;
        deployment: node config ``state-dir`` or :func:`default_state_root`).
    run_key : str
        Separates runs, so a new run never resumes an old run's optimizer. Must be a plain
        folder name (:func:`check_state_key`).
    site_id : int
        The site whose state this is.
    memory : RecordDict, optional
        Simulation: the node's ``context.state``; the state is kept there (or named there) every
        round and written to the directory only when :meth:`save` is asked to persist.
    live_root : Path, optional
        With ``memory``: keep the state in a file under this :func:`new_live_root` folder and only
        its token in ``memory`` (``federation.state_memory: node``).
    """

    def __init__(self, root: str | Path, run_key: str, site_id: int, memory: RecordDict | None = None,
                 live_root: Path | None = None) -> None:
        self.site_id = int(site_id)
        self.run_key = check_state_key(run_key, f"site-{self.site_id}")
        self.root = Path(root).expanduser().resolve()
        self.directory = (self.root / run_key / f"site-{self.site_id}").resolve()
        if self.root not in self.directory.parents:
            raise ValueError(f"site-{self.site_id}: state directory {self.directory} escapes the state root {self.root}")
        self.path = self.directory / STATE_FILE
        self.prev_path = self.directory / PREV_STATE_FILE
        self._current_round: int | None = None  # last_round of ``path``, known once it was read or written
        self._current_known = False
        self.memory = memory
        """``context.state`` of the node in simulation (the state is kept there every round), else None."""
        self.live_path = None if live_root is None else Path(live_root) / self.run_key / f"site-{self.site_id}.pt"
        """With ``memory``: the shared-memory file holding the kept state (``federation.state_memory: node``);
        None keeps the serialised state in ``memory`` itself."""

    def _read(self, path: Path) -> ClientState | None:
        if not path.is_file():
            return None
        try:
            payload = load_checkpoint(path, expected_format=CLIENT_STATE_FORMAT)
            state = ClientState.from_payload(payload)
        except (CheckpointError, KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("site-%d: ignoring unreadable client state %s (%s)", self.site_id, path, exc)
            return None
        if state.site_id != self.site_id:
            logger.warning("site-%d: state file %s belongs to site-%d; ignoring it", self.site_id, path,
                           state.site_id)
            return None
        return state

    def _read_current(self) -> ClientState | None:
        state = self._read(self.path)
        self._current_round = None if state is None else state.last_round
        self._current_known = True
        return state

    def _load_memory(self, before_round: int | None) -> ClientState | None:
        record = None if self.memory is None else self.memory.get(MEMORY_STATE_KEY)
        if not isinstance(record, ConfigRecord) or record.get("run-key") != self.run_key:
            return None
        if int(record.get("site-id", -1)) != self.site_id:
            return None
        if before_round is not None and before_round > 0 and int(record["last-round"]) >= before_round:
            return None  # not expected within one run (the engine's memory dies with it); the files decide
        persisted = int(record.get("persisted-round", -1))
        if persisted >= 0:  # this run wrote the current file: no need to read it back before the next save
            self._current_round, self._current_known = persisted, True
        if "live-nonce" not in record:
            return ClientState.from_payload(torch.load(io.BytesIO(bytes(record["payload"])), weights_only=True))
        return ClientState.from_payload(self._read_live(str(record["live-nonce"]), int(record["last-round"])))

    def _read_live(self, nonce: str, last_round: int) -> dict[str, Any]:
        """The payload of the kept-state file whose nonce the node's ``context.state`` names; else ClientStateLost."""
        path = self.live_path
        kept = None
        if path is not None and path.is_file():
            kept = torch.load(path, weights_only=True)
        if not isinstance(kept, dict) or kept.get("nonce") != nonce:
            raise ClientStateLost(
                f"site-{self.site_id}: its state of round {last_round}, kept on this machine between persists, is "
                f"{'missing' if kept is None else 'replaced by another'} at {path} (was the site served by another "
                "machine, or the folder removed?); resume the simulation from its last persisted round "
                "('fopro-kd simulate --resume RUN'), and on a Ray cluster set federation.state_memory: context")
        return kept["state"]

    def _write_live(self, state: ClientState) -> str:
        """Write the kept state to :attr:`live_path` (atomic rename, no fsync: memory, not a persist); its nonce."""
        assert self.live_path is not None
        nonce = uuid.uuid4().hex
        self.live_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.live_path.with_name(self.live_path.name + ".partial")
        torch.save({"nonce": nonce, "state": state.to_payload()}, partial)
        os.replace(partial, self.live_path)
        return nonce

    def load(self, before_round: int | None = None) -> ClientState:
        """The newest readable state (with ``last_round < before_round`` when given), else a fresh one.

        ``before_round`` is the round about to be trained: a state saved for that round or a
        later one (left by a run that was killed and resumed from an earlier checkpoint) is
        skipped in favour of the previous state. Unreadable files are logged and skipped.
        With ``memory``, a state kept there by an earlier round of this run comes first (it is
        never older than the files).
        """
        kept = self._load_memory(before_round)
        if kept is not None:
            return kept
        for path in (self.path, self.prev_path):
            state = self._read_current() if path == self.path else self._read(path)
            if state is None:
                continue
            if before_round is not None and before_round > 0 and state.last_round >= before_round:
                logger.info("site-%d: state of round %d in %s is not before round %d; looking further back",
                            self.site_id, state.last_round, path.name, before_round)
                continue
            return state
        if before_round is not None and before_round > 1 and (self.path.is_file() or self.prev_path.is_file()):
            logger.warning("site-%d: no saved state from before round %d; starting fresh", self.site_id, before_round)
        return ClientState(self.site_id)

    def save(self, state: ClientState, persist: bool = True) -> str | None:
        """Keep ``state`` (in ``memory`` when set) and, with ``persist``, write the file; return its SHA-256.

        The file is written atomically, keeping the previous persisted state: when the current
        file holds an *earlier* round it becomes ``client_state.prev.pt``; a state for the same
        round (a round trained again after a resume) replaces it in place. ``persist=False``
        (simulation, between persists) writes nothing and returns None; without ``memory`` the
        state is always written.
        """
        digest = None
        if persist or self.memory is None:
            digest = self._write(state)
        if self.memory is not None:
            previous = self.memory.get(MEMORY_STATE_KEY)
            persisted = int(state.last_round) if digest is not None else (
                int(previous.get("persisted-round", -1)) if isinstance(previous, ConfigRecord)
                and previous.get("run-key") == self.run_key else -1)
            record: dict[str, Any] = {"run-key": self.run_key, "site-id": self.site_id,
                                      "last-round": int(state.last_round), "persisted-round": persisted}
            if self.live_path is not None:
                record["live-nonce"] = self._write_live(state)
            else:
                buffer = io.BytesIO()
                torch.save(state.to_payload(), buffer)
                record["payload"] = buffer.getvalue()
            self.memory[MEMORY_STATE_KEY] = ConfigRecord(record)
        return digest

    def _write(self, state: ClientState) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._current_known:
            self._read_current()
        if self._current_round is not None and self._current_round < state.last_round:
            for suffix in (".sha256", ""):  # sidecar first: a crash in between leaves the current file loadable
                src = self.path.with_name(self.path.name + suffix)
                if src.is_file():
                    os.replace(src, self.prev_path.with_name(self.prev_path.name + suffix))
        digest = save_checkpoint(self.path, state.to_payload())
        self._current_round, self._current_known = int(state.last_round), True
        return digest
