"""Round bookkeeping around Flower's ``Strategy.start``: round offset, missing replies, failure streak.

:class:`RoundGuard` wraps a strategy instance's round hooks (as :class:`server.history.RoundRecorder`
does, without changing what the strategy computes):

* **round offset** (resume): ``Strategy.start`` always counts rounds from 1. A federation
  resumed after round k starts Flower with ``num_rounds = R - k`` and the guard adds k to
  the round passed to ``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` /
  ``aggregate_evaluate``, so everything below it (the ``server-round`` sent to clients,
  FedMAS's DRW switch at ⌊f·R⌋, the recorder, the history) sees the *true* round;
* **missing replies**: the nodes a train instruction was sent to but that did not reply
  before ``federation.round_timeout_s`` (slow, hung or disconnected) are recorded as
  failures with check ``timeout``; Flower itself just returns fewer replies;
* **deterministic order**: replies are sorted by their ``site-id`` before aggregation, so
  the float summation order (and therefore the global model, bit for bit) does not depend
  on which simulated client finished first;
* **failure streak**: a round in which the strategy kept the previous model (too few valid
  replies) increments ``failed_streak``; a round that aggregates resets it;
* **privacy budget** (``privacy.mode: local``): a site whose next round would exceed its ε
  target sends a *budget-decline reply* (:func:`is_budget_decline`: metric
  ``dp-budget-exhausted`` = 1, its ``dp-epsilon`` and the reason). Declines are taken out of
  the round before the strategy sees them and recorded (not failures, not rejections); a
  round in which every reply was a decline does not count as failed. Once fewer sites with
  budget remain than ``federation.min_valid_replies`` (normally: none), ``budget_stop`` holds
  the reason and the server ends the run cleanly (:class:`FederationFinished`);
* **relative update-norm bound** (issue 14): unless ``federation.max_update_norm`` sets an
  absolute bound, the strategy's bound is set each round to κ·‖θ^r‖₂ (κ =
  ``federation.update_norm_factor``, floating arrays of the global model sent that round), so a
  site that scales its weights (×1e4) or sends −θ is rejected (check ``update-norm``) by default;
* **num-examples cap** (check ``num-examples``): a reply claiming more than
  ``federation.max_num_examples``, more than ``num_examples_growth`` × the first value the server
  accepted from that site, or more than ``num_examples_peer_ratio`` × the median of the *other*
  replies of the round is rejected before the strategy weighs it (FedAvg's weight is this number);
* **finite aggregate**: an aggregate with a NaN/Inf value is discarded before it is evaluated or
  checkpointed; Flower keeps the previous global model, the round counts as failed and the reason
  is kept in :attr:`RoundGuard.aggregate_rejections` (``history.csv`` ``aggregate_rejected``);
* **dead nodes counted once**: when a node dies, Flower's SuperLink answers its instruction with
  an error reply *from the SuperLink* (``src_node_id`` 1, "Node Unavailable") instead of the node.
  Such a reply is matched to the node it stands for through ``reply_to_message_id`` and recorded as
  that node's missing reply (under its site name), not as an error of a bogus ``node-1``;
* **bounded waits**: :class:`BoundedWaitGrid` wraps the grid so that Flower's "Waiting for nodes
  to connect" loop (``sample_nodes``) ends after ``federation.node_wait_s`` with
  :class:`NodesUnavailable`; the server then stops cleanly (``aborted.json``, resumable).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fopro_kd.federation.wire import (
    DECLINE_RECORD_KEY,
    DP_BUDGET_MARKER,
    DP_DECLINE_KEY,
    NUM_EXAMPLES_KEY,
    REPLY_SITE_ID_KEY,
    site_name,
)

from server.history import RoundRecorder
from fopro_kd.federation.errors import redact_error_reason

__all__ = [
    "DECLINE_RECORD_KEY",
    "DP_BUDGET_MARKER",
    "DP_DECLINE_KEY",
    "FederationAborted",
    "FederationFinished",
    "BoundedWaitGrid",
    "NodesUnavailable",
    "RoundGuard",
    "aggregate_problem",
    "global_norm",
    "decline_reason",
    "is_budget_decline",
    "reply_order",
    "undecodable_reason",
]

NUM_EXAMPLES = NUM_EXAMPLES_KEY


class FederationAborted(RuntimeError):
    """Too many consecutive rounds without enough valid replies; the server stopped after saving its state."""

    def __init__(self, message: str, *, server_round: int, failed_rounds: list[int], run_dir: str) -> None:
        super().__init__(message)
        self.server_round = server_round
        self.failed_rounds = failed_rounds
        self.run_dir = run_dir


class FederationFinished(Exception):
    """The federation ends early, cleanly (e.g. no hospital has privacy budget left): not a failure."""

    def __init__(self, message: str, *, server_round: int) -> None:
        super().__init__(message)
        self.server_round = server_round


SUPERLINK_NODE_ID = 1
"""``src_node_id`` of the error replies Flower's SuperLink writes for a node that stopped its heartbeat."""


class NodesUnavailable(RuntimeError):
    """Fewer than the minimum number of nodes stayed connected for longer than ``federation.node_wait_s``."""

    def __init__(self, message: str, *, connected: int, required: int, waited_s: float) -> None:
        super().__init__(message)
        self.connected = connected
        self.required = required
        self.waited_s = waited_s


class BoundedWaitGrid(Grid):
    """A grid whose node list ends Flower's wait for nodes after ``wait_s`` seconds.

    Flower's ``sample_nodes`` (``flwr/serverapp/strategy/strategy_utils.py``) loops
    ``while len(grid.get_node_ids()) < min_available_nodes: sleep(1)`` with no bound: a dead
    hospital makes the server wait forever. This wrapper times how long the node count has stayed
    below ``min_nodes`` and raises :class:`NodesUnavailable` from ``get_node_ids`` once that exceeds
    ``wait_s``; every other call goes to the wrapped grid unchanged.
    """

    def __init__(self, inner: Grid, min_nodes: int, wait_s: float, clock: Any = time.monotonic) -> None:
        self.inner = inner
        self.min_nodes = int(min_nodes)
        self.wait_s = float(wait_s)
        self._clock = clock
        self._short_since: float | None = None

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.inner.get_node_ids())
        if len(nodes) >= self.min_nodes:
            self._short_since = None
            return nodes
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
            log(WARNING, "%d node(s) connected, %d required (federation.min_available_clients); waiting at most "
                "%g s (federation.node_wait_s)", len(nodes), self.min_nodes, self.wait_s)
        elif now - self._short_since > self.wait_s:
            waited = now - self._short_since
            raise NodesUnavailable(
                f"only {len(nodes)} node(s) connected for {waited:.0f} s, fewer than federation.min_available_clients="
                f"{self.min_nodes} (federation.node_wait_s={self.wait_s:g} s)",
                connected=len(nodes), required=self.min_nodes, waited_s=waited,
            )
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


def _float_arrays(arrays: ArrayRecord) -> Iterable[tuple[str, np.ndarray]]:
    for key in arrays.keys():
        value = arrays[key].numpy()
        if np.issubdtype(value.dtype, np.inexact):
            yield key, value


def global_norm(arrays: ArrayRecord) -> float:
    """‖θ‖₂ over the floating arrays of a model (integer buffers left out, as in the update norm)."""
    total = 0.0
    for _, value in _float_arrays(arrays):
        v = value.astype(np.float64, copy=False).reshape(-1)
        total += float(v @ v)
    return math.sqrt(total)


def aggregate_problem(arrays: ArrayRecord) -> str | None:
    """Why an aggregated model must not become the global model (a non-finite value), else None."""
    for key, value in _float_arrays(arrays):
        if not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            return f"aggregate: array {key!r} of the aggregated model has {bad} non-finite value(s) (NaN or Inf)"
    return None


def _metric_record(msg: Message) -> Any:
    records = msg.content.metric_records
    return records.get("metrics") or (next(iter(records.values())) if len(records) == 1 else None)


def is_budget_decline(msg: Message) -> bool:
    """A reply by which a site declines the round because its privacy budget is spent."""
    if msg.has_error():
        return False
    records = msg.content.metric_records
    record = records.get("metrics") or (next(iter(records.values())) if len(records) == 1 else None)
    return record is not None and record.get(DP_DECLINE_KEY) == 1 and len(msg.content.array_records) == 0


def decline_reason(msg: Message) -> str:
    record = msg.content.config_records.get(DECLINE_RECORD_KEY)
    reason = None if record is None else record.get("reason")
    return str(reason) if reason else DP_BUDGET_MARKER


def reply_order(msg: Message) -> tuple[int, int, int]:
    """Sort key: valid replies by ``site-id`` (then node id), error replies last."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return (1, 0, node)
    records = msg.content.metric_records
    record = records.get("metrics") or (next(iter(records.values())) if len(records) == 1 else None)
    site = None if record is None else record.get(REPLY_SITE_ID_KEY)
    if isinstance(site, int) and not isinstance(site, bool):
        return (0, site, node)
    return (0, 1 << 62, node)


def undecodable_reason(msg: Message) -> str | None:
    """Why a train reply's arrays cannot even be deserialised (None when they can, or for error replies).

    Flower decodes an ``Array`` with ``np.load(..., allow_pickle=False)``; a reply whose bytes
    are not a plain NumPy array (garbage, an object array) raises there. Checked before the
    strategy sees the reply, so one malformed reply is rejected instead of stopping the server.
    """
    if msg.has_error():
        return None
    for name, record in msg.content.array_records.items():
        for key in record.keys():
            try:
                record[key].numpy()
            except Exception as exc:  # noqa: BLE001 - any decoding failure rejects the reply
                return f"records: array {key!r} of record {name!r} cannot be decoded ({type(exc).__name__}: {exc})"
    return None


class RoundGuard:
    """See the module docstring.

    Parameters
    ----------
    recorder : RoundRecorder
        Receives the missing replies of each round.
    round_offset : int
        Rounds already completed before this ``Strategy.start`` (0 for a fresh run).
    timeout_s : float
        The round timeout, quoted in the reason of a missing reply.
    failed_streak : int
        Consecutive failed rounds carried over (0 for a fresh run).
    min_valid_replies : int
        ``federation.min_valid_replies``: fewer sites with privacy budget left than this ends the run.
    update_norm_factor : float, optional
        κ of the relative update-norm bound κ·‖θ^r‖ (None: no relative bound).
    max_update_norm : float, optional
        Absolute bound (``federation.max_update_norm``); when set, the relative bound is not used.
    max_num_examples, num_examples_growth, num_examples_peer_ratio
        The ``num-examples`` cap (module docstring); None / inf switch a part off.
    """

    def __init__(self, recorder: RoundRecorder, round_offset: int = 0, timeout_s: float | None = None,
                 failed_streak: int = 0, min_valid_replies: int = 1, *,
                 update_norm_factor: float | None = None, max_update_norm: float | None = None,
                 max_num_examples: int | None = None, num_examples_growth: float = math.inf,
                 num_examples_peer_ratio: float = math.inf) -> None:
        if round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
        self.recorder = recorder
        self.round_offset = int(round_offset)
        self.timeout_s = timeout_s
        self.failed_streak = int(failed_streak)
        self.failed_rounds: list[int] = []
        self._sent_train: dict[int, set[int]] = {}
        self._sent_evaluate: dict[int, set[int]] = {}
        self.min_valid_replies = int(min_valid_replies)
        self.nodes: set[int] = set()
        """Every node the grid offered in a train round so far."""
        self.out_of_budget: set[int] = set()
        """Nodes that declined a round for lack of privacy budget (a spent budget never comes back)."""
        self.budget_stop: str | None = None
        """Why the run must end after the current round (too few sites with budget), else None."""
        self.update_norm_factor = update_norm_factor
        self.max_update_norm = max_update_norm
        self.max_num_examples = max_num_examples
        self.num_examples_growth = float(num_examples_growth)
        self.num_examples_peer_ratio = float(num_examples_peer_ratio)
        self.first_num_examples: dict[str, int] = {}
        """First ``num-examples`` the server accepted from each site (by site name): the base of the growth cap."""
        self.norm_bounds: dict[int, float] = {}
        """Update-norm bound used in each round (absolute or κ·‖θ^r‖)."""
        self.aggregate_rejections: dict[int, str] = {}
        """Rounds whose aggregate was discarded (non-finite), with the reason."""
        self._sent_ids: dict[int, dict[str, int]] = {}
        self._sent_messages: dict[int, list[Message]] = {}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to keep the num-examples cap and the record of discarded aggregates."""
        return {"first_num_examples": dict(self.first_num_examples),
                "aggregate_rejections": {int(k): str(v) for k, v in self.aggregate_rejections.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.first_num_examples = {str(k): int(v) for k, v in state.get("first_num_examples", {}).items()}
        self.aggregate_rejections = {int(k): str(v) for k, v in state.get("aggregate_rejections", {}).items()}

    # ------------------------------------------------------------------ per-reply checks
    def set_norm_bound(self, strategy: Any, server_round: int, arrays: Any) -> None:
        """Set the strategy's update-norm bound for this round: absolute, else κ·‖θ^r‖ (else none)."""
        bound = self.max_update_norm
        if bound is None and self.update_norm_factor is not None and isinstance(arrays, ArrayRecord):
            theta = global_norm(arrays)
            if theta > 0 and math.isfinite(theta):
                bound = self.update_norm_factor * theta
                log(INFO, "Round %s: update-norm bound %.6g = federation.update_norm_factor %g x ||theta|| %.6g",
                    server_round, bound, self.update_norm_factor, theta)
        if bound is not None and hasattr(strategy, "max_update_norm"):
            strategy.max_update_norm = float(bound)
            self.norm_bounds[server_round] = float(bound)

    def _site_key(self, msg: Message) -> str:
        record = _metric_record(msg)
        site = None if record is None else record.get(REPLY_SITE_ID_KEY)
        if isinstance(site, int) and not isinstance(site, bool):
            # a reply rejected here never reaches the recorder: name its node now (as the recorder would)
            self.recorder.node_sites.setdefault(int(msg.metadata.src_node_id), site_name(site))
            return site_name(site)
        return self.recorder.site_of(int(msg.metadata.src_node_id))

    def num_examples_reasons(self, replies: list[Message]) -> dict[int, str]:
        """``{index: reason}`` of the replies whose ``num-examples`` exceeds the cap (module docstring)."""
        counts: dict[int, int] = {}
        for i, msg in enumerate(replies):
            if msg.has_error():
                continue
            record = _metric_record(msg)
            value = None if record is None else record.get(NUM_EXAMPLES)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                counts[i] = value  # a missing / malformed value is the strategy's "metrics" check
        reasons: dict[int, str] = {}
        for i, n in counts.items():
            site = self._site_key(replies[i])
            first = self.first_num_examples.get(site)
            others = [m for j, m in counts.items() if j != i]
            if self.max_num_examples is not None and n > self.max_num_examples:
                reasons[i] = (f"num-examples: {site} reports {n}, above federation.max_num_examples="
                              f"{self.max_num_examples}")
            elif first is not None and n > self.num_examples_growth * max(first, 1):
                reasons[i] = (f"num-examples: {site} reports {n}, more than federation.num_examples_growth="
                              f"{self.num_examples_growth:g} x its first accepted value {first}")
            elif others and n > self.num_examples_peer_ratio * max(statistics.median(others), 1):
                reasons[i] = (f"num-examples: {site} reports {n}, more than federation.num_examples_peer_ratio="
                              f"{self.num_examples_peer_ratio:g} x the median {statistics.median(others):g} of the "
                              f"other replies this round")
        return reasons

    def _unavailable(self, server_round: int, replies: list[Message]) -> tuple[list[Message], dict[int, str]]:
        """Split off the SuperLink's error replies that stand for a sent node (``{node: reason}``).

        Every error reason is also passed through :func:`server.validation.redact_error_reason`.
        """
        sent = self._sent_ids.get(server_round, {})
        for m in self._sent_messages.get(server_round, []):  # message ids are set when the grid pushes them
            if m.metadata.message_id:
                sent.setdefault(m.metadata.message_id, int(m.metadata.dst_node_id))
        targets = set(sent.values())
        kept, unavailable = [], {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():  # defence in depth: no traceback or site path in the server's log and history
                msg.error.__dict__["_reason"] = redact_error_reason(str(msg.error.reason))
            stands_for = sent.get(msg.metadata.reply_to_message_id) if msg.has_error() else None
            if stands_for is not None and node != stands_for and node not in targets:
                unavailable[stands_for] = f"node unavailable ({msg.error.reason})"
                continue
            kept.append(msg)
        return kept, unavailable

    def _remember_sent(self, key: int, messages: list[Message]) -> None:
        self._sent_messages[key] = list(messages)
        self._sent_ids[key] = {m.metadata.message_id: int(m.metadata.dst_node_id)
                               for m in messages if m.metadata.message_id}
        for old in [k for k in self._sent_messages if abs(k) < abs(key) - 1]:  # keep the current rounds only
            self._sent_messages.pop(old, None)
            self._sent_ids.pop(old, None)

    def _accept_num_examples(self, accepted: list[tuple[Message, Any]], entry: Any) -> None:
        """Remember the first ``num-examples`` of each site whose reply went into an aggregate."""
        aggregated = set(entry.weights)
        for msg, _ in accepted:
            if int(msg.metadata.src_node_id) not in aggregated:
                continue
            record = _metric_record(msg)
            value = None if record is None else record.get(NUM_EXAMPLES)
            if isinstance(value, int) and not isinstance(value, bool):
                self.first_num_examples.setdefault(self._site_key(msg), int(value))

    def true_round(self, server_round: int) -> int:
        return int(server_round) + self.round_offset

    def _missing_reason(self, phase: str) -> str:
        limit = "" if self.timeout_s is None else f" within federation.round_timeout_s={self.timeout_s:g} s"
        return f"no {phase} reply{limit} (slow, hung or disconnected node)"

    def instrument(self, strategy: Any) -> Any:
        """Wrap the strategy's round hooks on the instance (outermost layer); return the same strategy."""
        configure_train = strategy.configure_train
        aggregate_train = strategy.aggregate_train
        configure_evaluate = strategy.configure_evaluate
        aggregate_evaluate = strategy.aggregate_evaluate

        def configure_train_hook(server_round: int, *args: Any, **kwargs: Any) -> Iterable[Message]:
            r = self.true_round(server_round)
            grid = kwargs.get("grid", args[2] if len(args) > 2 else None)
            if grid is not None:
                try:
                    self.nodes |= {int(n) for n in grid.get_node_ids()}
                except Exception:  # noqa: BLE001 - only used to tell when every site is out of budget
                    pass
            self.set_norm_bound(strategy, r, kwargs.get("arrays", args[0] if args else None))
            messages = list(configure_train(r, *args, **kwargs))
            self._remember_sent(r, messages)
            self._sent_train[r] = {int(m.metadata.dst_node_id) for m in messages}
            self.nodes |= self._sent_train[r]
            return messages

        def aggregate_train_hook(server_round: int, replies: Iterable[Message]) -> Any:
            r = self.true_round(server_round)
            replies, unavailable = self._unavailable(r, sorted(replies, key=reply_order))
            missing = self._sent_train.pop(r, set()) - {int(m.metadata.src_node_id) for m in replies}
            timed_out = missing - set(unavailable)
            if timed_out:
                self.recorder.on_missing(r, timed_out, self._missing_reason("train"))
            for node in sorted(set(unavailable) & missing):
                self.recorder.on_missing(r, [node], unavailable[node])
            declines = [msg for msg in replies if is_budget_decline(msg)]
            if declines:
                replies = [msg for msg in replies if not is_budget_decline(msg)]
                self.recorder.on_budget_declines(r, [(msg, decline_reason(msg)) for msg in declines])
                self.out_of_budget |= {int(msg.metadata.src_node_id) for msg in declines}
            decodable, undecodable = [], []
            for msg in replies:
                reason = undecodable_reason(msg)
                (decodable if reason is None else undecodable).append((msg, reason))
            capped = self.num_examples_reasons([msg for msg, _ in decodable])
            undecodable += [(decodable[i][0], reason) for i, reason in sorted(capped.items())]
            decodable = [item for i, item in enumerate(decodable) if i not in capped]
            result = aggregate_train(r, [msg for msg, _ in decodable])
            entry = self.recorder.get(r)
            for msg, reason in undecodable:
                node = int(msg.metadata.src_node_id)
                check = reason.split(":", 1)[0]
                entry.rejections.append({"round": r, "node_id": node, "check": check, "reason": reason})
                log(WARNING, "Round %s: rejected reply from node %s (%s): %s", r, node, check, reason)
            if result is not None and result[0] is not None:
                problem = aggregate_problem(result[0])
                if problem is not None:
                    self.aggregate_rejections[r] = problem
                    entry.aggregated = False
                    entry.weights = {}
                    log(WARNING, "Round %s: %s; discarded, the previous global model is kept", r, problem)
                    result = (None, result[1])
                else:
                    self._accept_num_examples(decodable, entry)
            if result is None or result[0] is None:
                if declines and not replies and not missing:
                    log(WARNING, "Round %s: every site declined (%s); global model unchanged", r, DP_BUDGET_MARKER)
                else:
                    self.failed_streak += 1
                    self.failed_rounds.append(r)
                with_budget = self.nodes - self.out_of_budget
                if declines and len(with_budget) < self.min_valid_replies:
                    self.budget_stop = (
                        f"{DP_BUDGET_MARKER}: after round {r}, {len(self.out_of_budget)} of {len(self.nodes)} site(s) "
                        f"have spent their privacy budget (privacy.target_epsilon) and {len(with_budget)} remain, fewer "
                        f"than federation.min_valid_replies={self.min_valid_replies}; the federation ends here"
                    )
            else:
                self.failed_streak = 0
            return result

        def configure_evaluate_hook(server_round: int, *args: Any, **kwargs: Any) -> Iterable[Message]:
            r = self.true_round(server_round)
            messages = list(configure_evaluate(r, *args, **kwargs))
            self._remember_sent(-r, messages)  # negative key: the evaluate phase of round r
            self._sent_evaluate[r] = {int(m.metadata.dst_node_id) for m in messages}
            return messages

        def aggregate_evaluate_hook(server_round: int, replies: Iterable[Message]) -> Any:
            r = self.true_round(server_round)
            replies, unavailable = self._unavailable(-r, sorted(replies, key=reply_order))
            missing = self._sent_evaluate.pop(r, set()) - {int(m.metadata.src_node_id) for m in replies}
            entry = self.recorder.get(r)
            for node in missing:
                entry.eval_errors[node] = (f"timeout: {unavailable[node]}" if node in unavailable
                                           else "timeout: " + self._missing_reason("evaluate"))
            return aggregate_evaluate(r, replies)

        strategy.configure_train = configure_train_hook
        strategy.aggregate_train = aggregate_train_hook
        strategy.configure_evaluate = configure_evaluate_hook
        strategy.aggregate_evaluate = aggregate_evaluate_hook
        return strategy
