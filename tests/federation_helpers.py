"""Shared pieces of the in-process federation tests: a tiny config, a fake run identity, a local grid.

Kept in one place so the server, client, resume and privacy tests exercise the same tiny
federation instead of drifting copies of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fopro_kd.config import Config, config_from_dict
from simulations.tiny_federation import tiny_federation_values

NUM_SITES = tiny_federation_values()["federation"]["num_clients"]

ClientAppFn = Callable[[Message, Context], Message]


def tiny_values(**sections: dict[str, Any]) -> dict[str, Any]:
    """The tiny federation (simulations/tiny_federation.py) with a quorum of 2, so one site may drop out.

    Each keyword names a config section whose keys update the defaults.
    """
    federation = {"min_available_clients": 2, **sections.pop("federation", {})}
    return tiny_federation_values(**sections, federation=federation)


def tiny_config(**sections: dict[str, Any]) -> Config:
    return config_from_dict(tiny_values(**sections))


def aggregate_one_round(strategy: Any, reference: dict[str, np.ndarray], replies: list[dict[str, np.ndarray]],
                        weights: list[int]) -> dict[str, np.ndarray]:
    """One train round of ``strategy`` on hand-made replies (``num-examples`` = ``weights``); the new global arrays.

    Call it inside :func:`fake_task_identity`: Flower builds messages only inside a run.
    """
    def record(values: dict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in values.items()})

    ref = record(reference)
    strategy.set_reference(ref)
    sent = [Message(RecordDict({"arrays": ref}), dst_node_id=20 + i, message_type="train") for i in range(len(replies))]
    answers = [
        Message(RecordDict({"arrays": record(values), "metrics": MetricRecord({"num-examples": weight})}), reply_to=message)
        for message, values, weight in zip(sent, replies, weights)
    ]
    arrays, _ = strategy.aggregate_train(1, answers)
    assert arrays is not None, "every reply was rejected"
    return {k: arrays[k].numpy() for k in arrays.keys()}


@contextmanager
def fake_task_identity(run_id: int, node_id: int = 0) -> Iterator[None]:
    """Messages can only be built inside a run (libraries.md §1.2): fake one, then restore."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, node_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@contextmanager
def preserved_torch_threads() -> Iterator[None]:
    """Client handlers set ``client_num_threads``; give the rest of the session its own setting back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LocalGrid(Grid):
    """Runs each node's ClientApp in this process, sequentially; exceptions become error replies.

    ``apps`` is one ClientApp for every node or a mapping partition-id -> ClientApp (sites
    that differ, e.g. in privacy budget). Node ids are ``1000 + partition-id``.
    """

    def __init__(self, apps: ClientAppFn | dict[int, ClientAppFn], num_nodes: int | None = None,
                 run_id: int = 9) -> None:
        if not isinstance(apps, dict):
            if num_nodes is None:
                raise ValueError("num_nodes is required with a single ClientApp")
            apps = {k: apps for k in range(num_nodes)}
        self.apps = apps
        self.contexts = {
            1000 + k: Context(run_id=run_id, node_id=1000 + k,
                              node_config={"partition-id": k, "num-partitions": len(apps)},
                              state=RecordDict(), run_config={})
            for k in apps
        }

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self) -> Any:  # pragma: no cover - not used
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                replies.append(self.apps[context.node_config["partition-id"]](msg, context))
            except Exception as exc:  # noqa: BLE001 - what Flower's runtime does
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies
