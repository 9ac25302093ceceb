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
  the reason and the server ends the run cleanly (:class:`FederationFinished`).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common import log

from server.history import RoundRecorder

__all__ = [
    "DECLINE_RECORD_KEY",
    "DP_BUDGET_MARKER",
    "DP_DECLINE_KEY",
    "FederationAborted",
    "FederationFinished",
    "RoundGuard",
    "decline_reason",
    "is_budget_decline",
    "reply_order",
    "undecodable_reason",
]

DP_DECLINE_KEY = "dp-budget-exhausted"
"""Metric of a budget-decline reply (value 1)."""
DECLINE_RECORD_KEY = "decline"
"""ConfigRecord of a budget-decline reply; its ``"reason"`` names epsilon so far and the target."""
DP_BUDGET_MARKER = "dp budget exhausted"


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
    site = None if record is None else record.get("site-id")
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
    """

    def __init__(self, recorder: RoundRecorder, round_offset: int = 0, timeout_s: float | None = None,
                 failed_streak: int = 0, min_valid_replies: int = 1) -> None:
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
            messages = list(configure_train(r, *args, **kwargs))
            self._sent_train[r] = {int(m.metadata.dst_node_id) for m in messages}
            self.nodes |= self._sent_train[r]
            return messages

        def aggregate_train_hook(server_round: int, replies: Iterable[Message]) -> Any:
            r = self.true_round(server_round)
            replies = sorted(replies, key=reply_order)
            missing = self._sent_train.pop(r, set()) - {int(m.metadata.src_node_id) for m in replies}
            if missing:
                self.recorder.on_missing(r, missing, self._missing_reason("train"))
            declines = [msg for msg in replies if is_budget_decline(msg)]
            if declines:
                replies = [msg for msg in replies if not is_budget_decline(msg)]
                self.recorder.on_budget_declines(r, [(msg, decline_reason(msg)) for msg in declines])
                self.out_of_budget |= {int(msg.metadata.src_node_id) for msg in declines}
            decodable, undecodable = [], []
            for msg in replies:
                reason = undecodable_reason(msg)
                (decodable if reason is None else undecodable).append((msg, reason))
            result = aggregate_train(r, [msg for msg, _ in decodable])
            entry = self.recorder.get(r)
            for msg, reason in undecodable:
                node = int(msg.metadata.src_node_id)
                entry.rejections.append({"round": r, "node_id": node, "check": "records", "reason": reason})
                log(WARNING, "Round %s: rejected reply from node %s (records): %s", r, node, reason)
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
            self._sent_evaluate[r] = {int(m.metadata.dst_node_id) for m in messages}
            return messages

        def aggregate_evaluate_hook(server_round: int, replies: Iterable[Message]) -> Any:
            r = self.true_round(server_round)
            replies = sorted(replies, key=reply_order)
            missing = self._sent_evaluate.pop(r, set()) - {int(m.metadata.src_node_id) for m in replies}
            entry = self.recorder.get(r)
            for node in missing:
                entry.eval_errors[node] = "timeout: " + self._missing_reason("evaluate")
            return aggregate_evaluate(r, replies)

        strategy.configure_train = configure_train_hook
        strategy.aggregate_train = aggregate_train_hook
        strategy.configure_evaluate = configure_evaluate_hook
        strategy.aggregate_evaluate = aggregate_evaluate_hook
        return strategy
