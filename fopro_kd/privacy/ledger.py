"""The privacy ledger: an append-only, per-hospital record of every release under local DP.

Why a ledger apart from the client state. Under local DP the server is the party the
guarantee protects against, so nothing the server sends may reset or roll back the ε a
hospital has spent. The client *state* (optimizer moments, prompt, RNG) may legitimately be
reloaded from an earlier round (a resumed federation); if the accountant lived only there,
a server that replays a round, sends ``server-round = 1`` or a new ``state-key`` would get
a fresh or rolled-back accountant. The ledger is therefore

* **one file per site at the state root**, ``<state root>/privacy-ledger/site-<id>.json``,
  *not* inside the server-chosen ``<state-key>`` folder: a new state key (a new federation,
  or a server trying to reset) composes on everything the hospital spent before;
* **append-only**: :meth:`PrivacyLedgerStore.charge` re-reads the file under an exclusive
  lock and appends one entry; no code path removes or rewrites an entry;
* **the authority for ε**: the client loads the accountant history from the ledger (never
  from the model state) before its budget check, and charges the round's releases (DP-SGD
  steps, noised statistics, DP prompt updates: all events of the Opacus history) to disk
  *before* the reply leaves the site;
* **monotone in rounds**: per federation (state key) a round number that does not exceed
  the last charged one is refused (:class:`RoundNotIncreasing`, naming the round);
* **fail-closed**: written atomically (temporary file + fsync + rename + directory fsync)
  with a SHA-256 of its content inside; a missing ledger on a site that has trained before,
  or an unreadable one, is a refusal (:class:`PrivacyLedgerError`), never a fresh start. A
  site that starts a new ledger on purpose says so in its node config
  (:data:`FRESH_START_KEY`); an unreadable file is then moved aside, never overwritten.

The file is plain JSON so a data-protection officer can read it (one entry per charged
round: run key, round, events ``[σ, q, steps]``, ε after the charge at the δ in force).
This module is Flower-free; :mod:`client.client_app` uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fopro_kd.privacy.accounting import Event, epsilon_of_history, normalise_history

logger = logging.getLogger("fopro_kd.privacy")

__all__ = [
    "FRESH_START_KEY",
    "LEDGER_DIR",
    "LEDGER_FORMAT",
    "PrivacyLedger",
    "PrivacyLedgerError",
    "PrivacyLedgerStore",
    "RoundNotIncreasing",
    "events_since",
    "fresh_start_requested",
]

LEDGER_FORMAT = "fopro-kd-privacy-ledger/1"
LEDGER_DIR = "privacy-ledger"
FRESH_START_KEY = "privacy-ledger-fresh-start"
"""Node-config key: ``true`` lets a site that has trained before start a new, empty ledger when its
ledger is missing or unreadable (an unreadable one is kept aside). It never discards a readable
ledger, so leaving it set cannot let a server reset ε; remove it after the first round anyway."""


class PrivacyLedgerError(RuntimeError):
    """The ledger is missing, unreadable or inconsistent, or a charge was refused: the site must not train."""


class RoundNotIncreasing(PrivacyLedgerError):
    """The server asked for a round that is not after the last round this site charged (a replay or a reset)."""


def fresh_start_requested(node_config: Mapping[str, Any]) -> bool:
    """Whether the node config sets :data:`FRESH_START_KEY` to a true value (``true``/``1``/``yes``).

    Any other non-empty value is refused with an error naming the key: a typo must not look
    like consent to a fresh start, nor silently be ignored.
    """
    value = node_config.get(FRESH_START_KEY)
    if value is None or value is False or value == 0:
        return False
    if value is True or value == 1:
        return True
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise PrivacyLedgerError(f"node config {FRESH_START_KEY}={value!r}: expected true or false")


def _canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(body)).hexdigest()


def events_since(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]) -> list[Event]:
    """The events ``after`` adds to ``before`` (Opacus merges a step into the last event when σ and q match).

    ``after`` must extend ``before``: equal up to its last event, whose step count may have
    grown, then new events. Anything else means part of the charged history vanished, which
    is refused rather than charged as a difference.
    """
    b, a = normalise_history(before), normalise_history(after)
    if not b:
        return list(a)
    head, (sigma, q, steps) = b[:-1], b[-1]
    if len(a) < len(b) or a[: len(head)] != head or a[len(head)][:2] != (sigma, q) or a[len(head)][2] < steps:
        raise PrivacyLedgerError(
            "the accountant history after the round does not extend the charged history (an event vanished); "
            "refusing to charge a difference"
        )
    grown = a[len(head)][2] - steps
    return ([(sigma, q, grown)] if grown > 0 else []) + list(a[len(b):])


@dataclass
class PrivacyLedger:
    """The ledger's content: the site and its entries (one per charged round), oldest first."""

    site_id: int
    entries: list[dict[str, Any]] = field(default_factory=list)
    resets: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ queries
    def history(self) -> list[Event]:
        """Every event ever charged, in order: the accountant history ε is computed from."""
        return [tuple(e) for entry in self.entries for e in normalise_history(entry["events"])]  # type: ignore[misc]

    def epsilon(self, delta: float, mechanism: str = "rdp") -> float:
        return epsilon_of_history(self.history(), delta, mechanism)

    def last_round(self, run: str) -> int:
        """The last round charged for federation ``run`` (its state key); 0 when none."""
        rounds = [int(entry["round"]) for entry in self.entries if entry["run"] == run]
        return max(rounds) if rounds else 0

    def class_counts(self, run: str) -> list[float] | None:
        """The class counts released (once, by the Gaussian mechanism) in federation ``run``, if any."""
        for entry in reversed(self.entries):
            if entry["run"] == run and entry.get("class_counts") is not None:
                return [float(v) for v in entry["class_counts"]]
        return None

    def check_round(self, run: str, server_round: int) -> None:
        """Refuse a round that does not increase over the last charged round of ``run``.

        Raises
        ------
        RoundNotIncreasing
            ``server_round`` ≤ the last charged round (a replayed round, or ``server-round = 1``
            sent again), or below 1; the message names the round.
        """
        last = self.last_round(run)
        if int(server_round) < 1 or int(server_round) <= last:
            raise RoundNotIncreasing(
                f"privacy ledger of site-{self.site_id}: refusing round {int(server_round)} of federation {run!r}: "
                f"this site already charged its privacy spend up to round {last}; a round number must increase "
                "(a replayed or reset round would spend privacy the reported epsilon hides)"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def body(self) -> dict[str, Any]:
        return {"format": LEDGER_FORMAT, "site_id": int(self.site_id), "entries": self.entries, "resets": self.resets}

    @classmethod
    def from_body(cls, body: Mapping[str, Any], site_id: int, where: str) -> PrivacyLedger:
        """Validate a parsed body (format, site, entry shapes, rounds increasing per run)."""
        if body.get("format") != LEDGER_FORMAT:
            raise PrivacyLedgerError(f"{where}: format {body.get('format')!r}, expected {LEDGER_FORMAT!r}")
        if int(body.get("site_id", -1)) != int(site_id):
            raise PrivacyLedgerError(f"{where}: belongs to site-{body.get('site_id')}, not site-{site_id}")
        entries = body.get("entries")
        if not isinstance(entries, list):
            raise PrivacyLedgerError(f"{where}: 'entries' is not a list")
        last: dict[str, int] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"run", "round", "events"} <= set(entry):
                raise PrivacyLedgerError(f"{where}: entry {i} lacks run/round/events")
            try:
                normalise_history(entry["events"])
            except (TypeError, ValueError) as exc:
                raise PrivacyLedgerError(f"{where}: entry {i}: {exc}") from exc
            run, rnd = str(entry["run"]), int(entry["round"])
            if rnd <= last.get(run, 0):
                raise PrivacyLedgerError(f"{where}: entry {i}: round {rnd} of {run!r} does not increase")
            last[run] = rnd
        resets = body.get("resets", [])
        return cls(site_id=int(site_id), entries=list(entries), resets=list(resets) if isinstance(resets, list) else [])


class PrivacyLedgerStore:
    """The ledger file of one site under a state root, with its lock.

    Parameters
    ----------
    root : path
        The node's private state root (node config ``state-dir``, or the simulation's
        ``<run dir>/client_state``); the same root for every federation the site joins.
    site_id : int
        The site whose spend this is.
    """

    def __init__(self, root: str | Path, site_id: int) -> None:
        self.site_id = int(site_id)
        self.directory = Path(root).expanduser().resolve() / LEDGER_DIR
        self.path = self.directory / f"site-{self.site_id}.json"
        self.lock_path = self.directory / f"site-{self.site_id}.json.lock"
        self.marker_path = self.directory / f"site-{self.site_id}.charged"
        """Left by the first charge and never removed: a ledger deleted alone is then seen as missing, not new."""

    # ------------------------------------------------------------------ file access
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock: two federations of the same hospital never lose each other's charge."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def has_traces(self) -> bool:
        """Evidence that this site charged a ledger here before: the first charge's marker or a set-aside ledger."""
        if self.marker_path.exists():
            return True
        return self.directory.is_dir() and any(self.directory.glob(f"site-{self.site_id}.json.unreadable-*"))

    def read(self) -> PrivacyLedger:
        """The ledger on disk, verified; :class:`PrivacyLedgerError` naming the file when it cannot be trusted."""
        where = f"privacy ledger {self.path}"
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise PrivacyLedgerError(f"{where} is missing") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PrivacyLedgerError(f"{where} is unreadable ({type(exc).__name__}: {exc})") from exc
        if not isinstance(raw, dict) or "sha256" not in raw:
            raise PrivacyLedgerError(f"{where} is unreadable (no checksum)")
        body = {k: v for k, v in raw.items() if k != "sha256"}
        try:
            digest = _digest(body)
        except (TypeError, ValueError) as exc:
            raise PrivacyLedgerError(f"{where} is unreadable ({exc})") from exc
        if digest != raw["sha256"]:
            raise PrivacyLedgerError(f"{where} fails its checksum (edited or truncated)")
        try:
            return PrivacyLedger.from_body(body, self.site_id, where)
        except (TypeError, ValueError, KeyError) as exc:
            raise PrivacyLedgerError(f"{where} is unreadable ({type(exc).__name__}: {exc})") from exc

    def _write(self, ledger: PrivacyLedger) -> None:
        """Atomic replace: temp file in the same folder, fsync, rename, fsync the folder."""
        body = ledger.body()
        text = json.dumps({**body, "sha256": _digest(body)}, indent=1, sort_keys=True, allow_nan=False) + "\n"
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ------------------------------------------------------------------ API
    def open(self, *, trained_before: bool, fresh_start: bool = False) -> PrivacyLedger:
        """The site's ledger; a new one only for a site that never trained here or that asks for it.

        Parameters
        ----------
        trained_before : bool
            The caller found client state of this site under the root (any federation).
            Combined with :meth:`has_traces`, a missing ledger is then a refusal.
        fresh_start : bool
            Node config :data:`FRESH_START_KEY`: start a new ledger when the file is missing or
            unreadable (the unreadable file is renamed ``*.unreadable-<UTC time>``, kept).

        Raises
        ------
        PrivacyLedgerError
            Missing ledger on a site that trained before, or an unreadable ledger, without
            ``fresh_start``; the message names the file and the node-config key.
        """
        hint = (f"this site refuses to train rather than restart its epsilon at 0; restore the file, or, to start a "
                f"new ledger on purpose, set node config {FRESH_START_KEY}=true")
        earlier = trained_before or self.has_traces()
        with self._locked():
            if self.path.exists():
                try:
                    return self.read()
                except PrivacyLedgerError as exc:
                    if not fresh_start:
                        raise PrivacyLedgerError(f"site-{self.site_id}: {exc}; {hint}") from exc
                    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                    aside = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
                    os.replace(self.path, aside)
                    logger.warning("site-%d: %s; %s=true: kept it as %s and starting a new ledger",
                                   self.site_id, exc, FRESH_START_KEY, aside.name)
                    reason = f"unreadable ledger kept as {aside.name}"
            else:
                if earlier and not fresh_start:
                    raise PrivacyLedgerError(
                        f"site-{self.site_id}: privacy ledger {self.path} is missing but this site has trained before "
                        f"(client state or ledger traces under {self.directory.parent}); {hint}"
                    )
                if earlier:
                    logger.warning("site-%d: privacy ledger missing; %s=true: starting a new ledger",
                                   self.site_id, FRESH_START_KEY)
                reason = "missing ledger on a site that trained before" if earlier else "first ledger of this site"
            ledger = PrivacyLedger(self.site_id)
            ledger.resets.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason,
                                  "fresh_start": bool(fresh_start)})
            self._write(ledger)
            return ledger

    def charge(
        self,
        run: str,
        server_round: int,
        events: Iterable[Sequence[float]],
        *,
        class_counts: Sequence[float] | None = None,
        delta: float | None = None,
        mechanism: str = "rdp",
    ) -> PrivacyLedger:
        """Append the releases of ``run``'s round ``server_round`` and write the ledger to disk; return it.

        The file is re-read under the lock (another federation of this hospital may have
        charged meanwhile) and the entry appended to *that*; the returned ledger is what is
        on disk. A round that does not increase is refused (:class:`RoundNotIncreasing`).
        """
        events = [list(e) for e in normalise_history(events)]
        counts = None if class_counts is None else [float(v) for v in class_counts]
        if counts is not None and not all(math.isfinite(v) for v in counts):
            raise PrivacyLedgerError(f"site-{self.site_id}: released class counts are not finite")
        with self._locked():
            ledger = self.read()
            ledger.check_round(run, server_round)
            entry: dict[str, Any] = {"run": str(run), "round": int(server_round), "events": events,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if counts is not None and ledger.class_counts(run) != counts:
                entry["class_counts"] = counts
            ledger.entries.append(entry)
            if not self.marker_path.exists():
                self.marker_path.touch()
            if delta is not None:
                entry["delta"] = float(delta)
                entry["mechanism"] = str(mechanism)
                eps = float(ledger.epsilon(float(delta), mechanism))
                entry["epsilon_after"] = eps if math.isfinite(eps) else None
            self._write(ledger)
            return ledger
