"""Per-round bookkeeping of a federation: who replied, with which weight, bytes and timings.

Flower's ``Strategy.start`` returns only aggregated metrics. The report needs more: the
aggregation weight α_k of each *site* (not node id), the bytes each site uploaded, each
site's federated-evaluation counts and the share of a round spent outside client
training. :class:`RoundRecorder` wraps three hooks of a strategy instance
(``configure_train``, ``aggregate_train``, ``aggregate_evaluate``) to observe the
replies, without changing what the strategy computes. With ``federation.evaluate_in_train``
a site's federated-evaluation counts of round k arrive with its train reply of round k + 1
(``scored-round`` k) and are kept under round k, as if they had come from an evaluate phase.

Node ids are mapped to sites through the ``"site-id"`` metric every reply carries; an
error reply from a node seen before keeps its site name, an unknown one is ``node-<id>``.

Privacy (``privacy.mode: local``): the ``dp-epsilon`` each site reports (ε spent so far over
the whole federation) is kept per round, and sites that declined a round for lack of budget
(:meth:`RoundRecorder.on_budget_declines`) are recorded with their reason; both go to
``history.csv`` (``epsilon/<site>``, ``clients_declined``) and ``metrics.json``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import Message, MetricRecord
from flwr.common import log

from fopro_kd.federation.wire import (
    CLASS_COUNTS_KEY,
    CORRECT_COUNTS_KEY,
    REPLY_SITE_ID_KEY,
    ROBUST_FACTOR_KEY,
    SCORED_ROUND_KEY,
    TOTAL_COUNTS_KEY,
    site_name,
)

__all__ = ["RoundLog", "RoundRecorder"]

_NODE_SITE = re.compile(r"node (\d+) \(site-(\d+)\)")


@dataclass
class RoundLog:
    """What happened in one round (1-based ``server_round``), keyed by node id.

    Use :meth:`RoundRecorder.by_site` to name the nodes: a node that fails before it ever
    replied successfully is only known by its id until a later reply reveals its site.
    """

    server_round: int
    started: float = 0.0
    weights: dict[int, float] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    train_seconds: dict[int, float] = field(default_factory=dict)
    class_counts: dict[int, list[int]] = field(default_factory=dict)
    train_errors: dict[int, str] = field(default_factory=dict)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    site_eval: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    eval_errors: dict[int, str] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)
    """Nodes sent a train instruction that never replied within the round timeout (slow or disconnected)."""
    robust_factors: dict[int, float] = field(default_factory=dict)
    """FedMAS robust factor ρ_k each node reported this round (strategy state kept in checkpoints)."""
    aggregated: bool | None = None
    """Whether the strategy produced a new global model this round (None: not aggregated yet)."""
    dp_epsilon: dict[int, float] = field(default_factory=dict)
    """ε spent so far that each node reported this round (``dp-epsilon``, privacy.mode local)."""
    budget_declines: dict[int, str] = field(default_factory=dict)
    """Nodes that declined this round because their privacy budget is spent, with the reason."""

    def to_payload(self) -> dict[str, Any]:
        """Plain containers only (for a ``weights_only`` checkpoint); ``started`` is not kept."""
        return {
            "server_round": int(self.server_round),
            "weights": {int(k): float(v) for k, v in self.weights.items()},
            "bytes_up": {int(k): int(v) for k, v in self.bytes_up.items()},
            "train_seconds": {int(k): float(v) for k, v in self.train_seconds.items()},
            "class_counts": {int(k): [int(c) for c in v] for k, v in self.class_counts.items()},
            "train_errors": {int(k): str(v) for k, v in self.train_errors.items()},
            "rejections": [dict(r) for r in self.rejections],
            "site_eval": {int(k): ([int(c) for c in v[0]], [int(t) for t in v[1]]) for k, v in self.site_eval.items()},
            "eval_errors": {int(k): str(v) for k, v in self.eval_errors.items()},
            "missing": {int(k): str(v) for k, v in self.missing.items()},
            "robust_factors": {int(k): float(v) for k, v in self.robust_factors.items()},
            "aggregated": self.aggregated,
            "dp_epsilon": {int(k): float(v) for k, v in self.dp_epsilon.items()},
            "budget_declines": {int(k): str(v) for k, v in self.budget_declines.items()},
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RoundLog:
        fields = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        fields["site_eval"] = {int(k): (list(v[0]), list(v[1])) for k, v in fields.get("site_eval", {}).items()}
        return cls(**fields)


def _count_problem(correct: Any, total: Any) -> str | None:
    """Why per-class correct / total counts of a federated evaluation are unusable (None if usable)."""
    if not isinstance(correct, list) or not isinstance(total, list):
        return f"{CORRECT_COUNTS_KEY!r} and {TOTAL_COUNTS_KEY!r} must both be lists"
    if len(correct) != len(total) or not correct:
        return (f"{CORRECT_COUNTS_KEY!r} ({len(correct)}) and {TOTAL_COUNTS_KEY!r} ({len(total)}) need one entry "
                "per class")
    values = correct + total
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return "counts must be integers >= 0"
    if any(c > t for c, t in zip(correct, total)):
        return "a class has more correct predictions than samples"
    return None


def _metrics(msg: Message) -> MetricRecord | None:
    records = msg.content.metric_records
    record = records.get("metrics")
    if record is None and len(records) == 1:
        record = next(iter(records.values()))
    return record


class RoundRecorder:
    """Observe a strategy's replies per round (see module docstring)."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundLog] = {}
        self.node_sites: dict[int, str] = {}

    # ------------------------------------------------------------------ access
    def get(self, server_round: int) -> RoundLog:
        if server_round not in self.rounds:
            self.rounds[server_round] = RoundLog(server_round, started=time.perf_counter())
        return self.rounds[server_round]

    def site_of(self, node_id: int) -> str:
        return self.node_sites.get(int(node_id), f"node-{int(node_id)}")

    def by_site(self, values: dict[int, Any]) -> dict[str, Any]:
        """Re-key a ``{node_id: value}`` mapping by site name, sorted by name."""
        return dict(sorted((self.site_of(node), value) for node, value in values.items()))

    def _learn_site(self, msg: Message) -> int:
        node = int(msg.metadata.src_node_id)
        if not msg.has_error():
            record = _metrics(msg)
            value = None if record is None else record.get(REPLY_SITE_ID_KEY)
            if isinstance(value, int) and not isinstance(value, bool):
                self.node_sites[node] = site_name(value)
        elif node not in self.node_sites:
            # The ClientApp names itself in its error ("node <id> (site-<k>): ..."); accept the label only
            # for the node that sent it, so a failing node is reported by site even before its first success.
            match = _NODE_SITE.search(str(msg.error.reason))
            if match and int(match.group(1)) == node:
                self.node_sites[node] = site_name(int(match.group(2)))
        return node

    # ------------------------------------------------------------------ hooks
    def on_configure_train(self, server_round: int) -> None:
        self.rounds[server_round] = RoundLog(server_round, started=time.perf_counter())

    def on_train_replies(self, server_round: int, replies: list[Message]) -> None:
        entry = self.get(server_round)
        for msg in replies:
            site = self._learn_site(msg)
            if msg.has_error():
                entry.train_errors[site] = str(msg.error.reason)
                log(WARNING, "Round %s: %s failed: %s", server_round, self.site_of(site), msg.error.reason)
                continue
            arrays = msg.content.array_records
            entry.bytes_up[site] = int(sum(rec.count_bytes() for rec in arrays.values()))
            record = _metrics(msg)
            if record is not None:
                seconds = record.get("train-seconds")
                if isinstance(seconds, (int, float)):
                    entry.train_seconds[site] = float(seconds)
                counts = record.get(CLASS_COUNTS_KEY)
                if isinstance(counts, list):
                    entry.class_counts[site] = [int(c) for c in counts]
                rho = record.get(ROBUST_FACTOR_KEY)
                if isinstance(rho, (int, float)) and not isinstance(rho, bool):
                    entry.robust_factors[site] = float(rho)
                self._record_epsilon(entry, site, record)
                self._record_scored(server_round, site, record)

    def _record_scored(self, server_round: int, site: int, record: MetricRecord) -> None:
        """``federation.evaluate_in_train``: a train reply's scores of the model it received, kept under that round."""
        scored = record.get(SCORED_ROUND_KEY)
        if scored is None:
            return
        if isinstance(scored, bool) or not isinstance(scored, int) or scored != server_round - 1:
            log(WARNING, "Round %s: ignored the scores of %s: %r is %r, not the round of the model it was sent (%d)",
                server_round, self.site_of(site), SCORED_ROUND_KEY, scored, server_round - 1)
            return
        self._record_counts(self.get(scored), site, record, scored)

    def _record_counts(self, entry: RoundLog, site: int, record: MetricRecord | None, server_round: int) -> None:
        correct = None if record is None else record.get(CORRECT_COUNTS_KEY)
        total = None if record is None else record.get(TOTAL_COUNTS_KEY)
        if correct is None and total is None:
            return
        problem = _count_problem(correct, total)
        if problem is not None:
            entry.eval_errors[site] = f"invalid evaluation counts: {problem}"
            log(WARNING, "Round %s: ignored evaluation counts of %s: %s", server_round, self.site_of(site), problem)
            return
        entry.site_eval[site] = ([int(v) for v in correct], [int(v) for v in total])

    @staticmethod
    def _record_epsilon(entry: RoundLog, site: int, record: MetricRecord) -> None:
        epsilon = record.get("dp-epsilon")
        if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and epsilon >= 0:
            entry.dp_epsilon[site] = float(epsilon)

    def on_budget_declines(self, server_round: int, declines: list[tuple[Message, str]]) -> None:
        """Sites that declined the round for lack of privacy budget (``(reply, reason)``; no model)."""
        entry = self.get(server_round)
        for msg, reason in declines:
            site = self._learn_site(msg)
            entry.budget_declines[site] = reason
            record = _metrics(msg)
            if record is not None:
                self._record_epsilon(entry, site, record)
            log(WARNING, "Round %s: %s declined the round: %s", server_round, self.site_of(site), reason)

    def epsilon_so_far(self, server_round: int) -> dict[str, float]:
        """Latest ``dp-epsilon`` of every site reported in rounds <= ``server_round``, by site name."""
        latest: dict[int, float] = {}
        for r in sorted(self.rounds):
            if r <= server_round:
                latest.update(self.rounds[r].dp_epsilon)
        return self.by_site(latest)

    def on_missing(self, server_round: int, node_ids: Iterable[int], reason: str) -> None:
        """Nodes that were sent a train instruction but did not reply before the round timeout."""
        entry = self.get(server_round)
        for node in sorted(int(n) for n in node_ids):
            entry.missing[node] = reason
            log(WARNING, "Round %s: %s sent no reply: %s", server_round, self.site_of(node), reason)

    def failures(self, entry: RoundLog) -> dict[int, str]:
        """Every node that failed in the round's training: error replies and missing replies, by node id."""
        return {**entry.train_errors, **{node: f"timeout: {reason}" for node, reason in entry.missing.items()}}

    # ------------------------------------------------------------------ checkpoints
    def to_payload(self) -> dict[str, Any]:
        return {
            "rounds": {int(r): log.to_payload() for r, log in sorted(self.rounds.items())},
            "node_sites": {int(k): str(v) for k, v in self.node_sites.items()},
        }

    def load_payload(self, payload: dict[str, Any]) -> None:
        """Restore the rounds of a checkpoint (node ids of an earlier process keep their site names)."""
        self.rounds = {int(r): RoundLog.from_payload(log) for r, log in payload.get("rounds", {}).items()}
        self.node_sites.update({int(k): str(v) for k, v in payload.get("node_sites", {}).items()})

    def on_aggregated(self, server_round: int, weights: dict[int, float], rejections: list[dict[str, Any]]) -> None:
        entry = self.get(server_round)
        entry.weights = {int(node): float(w) for node, w in weights.items()}
        entry.rejections = list(rejections)

    def on_evaluate_replies(self, server_round: int, replies: list[Message]) -> None:
        entry = self.get(server_round)
        for msg in replies:
            site = self._learn_site(msg)
            if msg.has_error():
                entry.eval_errors[site] = str(msg.error.reason)
                continue
            self._record_counts(entry, site, _metrics(msg), server_round)

    # ------------------------------------------------------------------ wiring
    def instrument(self, strategy: Any) -> Any:
        """Wrap ``strategy``'s train/evaluate hooks on the instance; return the same strategy."""
        configure_train = strategy.configure_train
        aggregate_train = strategy.aggregate_train
        aggregate_evaluate = strategy.aggregate_evaluate

        def configure_train_hook(server_round: int, *args: Any, **kwargs: Any) -> Iterable[Message]:
            self.on_configure_train(server_round)
            return configure_train(server_round, *args, **kwargs)

        def aggregate_train_hook(server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            self.on_train_replies(server_round, replies)
            result = aggregate_train(server_round, replies)
            self.on_aggregated(server_round, dict(getattr(strategy, "last_weights", {}) or {}),
                               list(getattr(strategy, "last_rejections", []) or []))
            self.get(server_round).aggregated = result is not None and result[0] is not None
            return result

        def aggregate_evaluate_hook(server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            self.on_evaluate_replies(server_round, replies)
            return aggregate_evaluate(server_round, replies)

        strategy.configure_train = configure_train_hook
        strategy.aggregate_train = aggregate_train_hook
        strategy.aggregate_evaluate = aggregate_evaluate_hook
        return strategy
