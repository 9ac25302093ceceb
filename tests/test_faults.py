"""Fault injection on Flower's simulation engine (Ray, tiny): what the federation does with each fault.

Faults are injected with the **test-only** ``fault_injector`` hook of
:func:`client.client_app.make_client_app` (no config key switches faults on). Ray runs are
shared across asserts to keep the suite short:

* ``faulty_run`` - one 2-round simulation with 6 hospitals: sites 0 and 1 honest, site 2
  replies NaN weights, site 3 a wrong-shaped array, site 4 crashes, site 5 is slower than the
  round timeout in round 2;
* ``test_all_clients_failing_stops_with_non_zero_exit`` - every site crashes: the server stops
  after ``max_failed_rounds`` rounds with exit status 3 and its state saved, Ray shut down;
* ``test_kill_and_resume_in_ray_is_bit_identical`` - the server is killed mid-round 2 (after the
  clients trained), resumed in a fresh simulation from the run directory alone, and compared
  bit for bit with the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from fopro_kd.federation.sites import clear_caches
from fopro_kd.checkpoint import load_checkpoint
from fopro_kd.config import Config, config_from_dict
from fopro_kd.run_dir import RunDir
from server.checkpoints import ServerCheckpointStore
from server.strategies.base import ValidatedWeightedAvg
from simulations.tiny_federation import tiny_federation_values

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUND_TIMEOUT_S = 90.0  # generous: round 1 includes Ray actor start-up (about 20 s on a loaded 2-core box)
"""Round 1 includes Ray actor start-up and imports (10-21 s measured on 2 busy cores): keep a margin."""
SLOW_DELAY_S = ROUND_TIMEOUT_S + 10.0


def _register_by_value() -> None:
    """Ray workers cannot import this test module: ship the injector classes by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_values(num_clients: int, **federation: Any) -> dict[str, Any]:
    return tiny_federation_values(
        data={"max_per_class": 60, "imbalance_factor": 3},
        federation={"num_clients": num_clients, "num_rounds": 2, "local_steps": 2, "min_available_clients": num_clients,
                    "partition": {"kind": "iid", "min_per_site": 4}, **federation},
    )


# --------------------------------------------------------------------------- the test-only injector


@dataclass
class FaultInjector:
    """``faults``: site (partition id) -> ``"nan"`` | ``"shape"`` | ``"crash"`` | ``"slow"`` | ``"scale"``
    (weights x 1e4) | ``"huge-n"`` (``num-examples`` = 10**9) | ``"flip"`` (sign-flipped update θ - Δ_k).

    ``rounds``: site -> rounds in which its fault is active (default: every round). Honest
    train replies are saved to ``record_dir`` (``r<round>-s<site>.npz``) so the test can
    recompute the aggregate of the honest clients.
    """

    faults: dict[int, str]
    rounds: dict[int, set[int]] = field(default_factory=dict)
    record_dir: str | None = None
    delay_s: float = SLOW_DELAY_S

    def __call__(self, kind: str, msg: Message, context: Context, handler: Callable[[], Message]) -> Message:
        site = int(context.node_config["partition-id"])
        config = msg.content.config_records.get("config")
        server_round = int(config.get("server-round", 0)) if config is not None else 0
        fault = self.faults.get(site)
        if fault is not None and site in self.rounds and server_round not in self.rounds[site]:
            fault = None
        if kind != "train" or fault is None:
            reply = handler()
            if kind == "train" and self.record_dir is not None:
                arrays = reply.content["arrays"]
                np.savez(Path(self.record_dir) / f"r{server_round}-s{site}.npz",
                         __num_examples__=np.int64(reply.content["metrics"]["num-examples"]),
                         **{key: arrays[key].numpy() for key in arrays.keys()})
            return reply
        if fault == "crash":
            raise RuntimeError(f"injected crash at site-{site} in round {server_round}")
        if fault == "slow":
            time.sleep(self.delay_s)
            return handler()
        reply = handler()
        arrays = reply.content["arrays"]
        values = {key: np.array(arrays[key].numpy(), copy=True) for key in arrays.keys()}
        first_float = next(k for k, v in values.items() if np.issubdtype(v.dtype, np.floating) and v.size > 1)
        metrics = reply.content["metrics"]
        if fault == "huge-n":
            metrics = MetricRecord({**dict(metrics), "num-examples": 10**9})
        elif fault == "scale":
            values = {k: v * np.asarray(1e4, v.dtype) if np.issubdtype(v.dtype, np.floating) else v
                      for k, v in values.items()}
        elif fault == "flip":
            sent = msg.content["arrays"]
            values = {k: (2 * sent[k].numpy() - v).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
                      for k, v in values.items()}
        elif fault == "nan":
            values[first_float].reshape(-1)[0] = np.nan
        elif fault == "shape":
            values[first_float] = np.concatenate([values[first_float], values[first_float][:1]], axis=0)
        elif fault not in ("huge-n", "scale", "flip"):  # pragma: no cover - test typo
            raise ValueError(f"unknown fault {fault!r}")
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in values.items()}),
                              "metrics": metrics})
        return Message(content=content, reply_to=msg)


# --------------------------------------------------------------------------- helpers


def _child_processes(names: tuple[str, ...] = ("raylet", "gcs_server", "ray::")) -> list[str]:
    """Live or zombie children of this process whose name looks like Ray (read from /proc)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == me and (state == "Z" or any(n in cmd for n in names)):
            found.append(f"{entry.name} {state} {cmd[:80]}")
    return found


def assert_no_ray_left() -> None:
    import ray

    assert not ray.is_initialized(), "Ray must be shut down after the simulation"
    deadline = time.time() + 15
    while _child_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert _child_processes() == []


def history_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def newest_checkpoint(run_dir: Path) -> dict[str, Any]:
    rnd, path = ServerCheckpointStore(RunDir(run_dir)).checkpoints()[0]
    return load_checkpoint(path)


# --------------------------------------------------------------------------- one faulty federation


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from client.client_app import make_client_app
    from simulations.simulate import simulate

    _register_by_value()
    clear_caches()
    base = tmp_path_factory.mktemp("faults")
    record = base / "replies"
    record.mkdir()
    cfg = config_from_dict(tiny_values(6, round_timeout_s=ROUND_TIMEOUT_S, fraction_evaluate=0.0,
                                       min_available_clients=6))
    injector = FaultInjector({2: "nan", 3: "shape", 4: "crash", 5: "slow"}, rounds={5: {2}}, record_dir=str(record))
    out = base / "run"
    started = time.perf_counter()
    metrics = simulate(cfg, out, client_app=make_client_app(cfg, out / "client_state", fault_injector=injector))
    return {"cfg": cfg, "out": out, "metrics": metrics, "record": record, "seconds": time.perf_counter() - started}


def _rejections(metrics: dict[str, Any], server_round: int) -> dict[str, str]:
    return {r["site"]: r["check"] for r in metrics["rejected_replies"] if r["round"] == server_round}


def test_nan_and_wrong_shape_replies_are_rejected_with_their_check(faulty_run) -> None:
    metrics = faulty_run["metrics"]
    for server_round in (1, 2):
        rejected = _rejections(metrics, server_round)
        assert rejected["site-2"] == "finite", rejected
        assert rejected["site-3"] == "shape", rejected
    reasons = {r["site"]: r["reason"] for r in metrics["rejected_replies"] if r["round"] == 1}
    assert "non-finite" in reasons["site-2"] and "has shape" in reasons["site-3"]


def test_crash_is_counted_as_a_failure_and_the_round_proceeds(faulty_run) -> None:
    metrics, out = faulty_run["metrics"], faulty_run["out"]
    for server_round in ("1", "2"):
        assert "injected crash at site-4" in metrics["failed_replies"][server_round]["site-4"]
    assert _rejections(metrics, 1)["site-4"] == "error"
    rows = history_rows(out)
    assert [int(r["clients_aggregated"]) for r in rows[1:]] == [3, 2]
    assert [int(r["clients_failed"]) for r in rows[1:]] == [1, 2]  # round 2: the crash and the slow site
    assert metrics["rounds_without_aggregation"] == []


def test_slow_client_reply_is_missing_after_the_round_timeout(faulty_run) -> None:
    metrics, out = faulty_run["metrics"], faulty_run["out"]
    missing = [(m["round"], m["site"], m["check"]) for m in metrics["missing_replies"]]
    assert missing == [(2, "site-5", "timeout")]
    assert "timeout" in metrics["failed_replies"]["2"]["site-5"]
    rows = history_rows(out)
    assert float(rows[1]["weight/site-5"]) > 0 and rows[2]["weight/site-5"] == "", "site-5 counts only in round 1"


def test_global_model_is_finite_and_equals_the_honest_aggregate(faulty_run) -> None:
    out, record = faulty_run["out"], faulty_run["record"]
    payload = newest_checkpoint(out)
    assert payload["round"] == 2
    global_arrays = payload["arrays"]
    assert all(torch.isfinite(v).all() for v in global_arrays.values() if v.is_floating_point())
    honest = []
    for site in (0, 1):  # round 2: site 5 timed out, sites 2-4 failed
        with np.load(record / f"r2-s{site}.npz", allow_pickle=False) as npz:
            honest.append((int(npz["__num_examples__"]), {k: npz[k] for k in npz.files if k != "__num_examples__"}))
    counts = np.asarray([n for n, _ in honest], dtype=np.float64)
    expected = ValidatedWeightedAvg._average([values for _, values in honest], counts / counts.sum())
    assert list(expected.keys()) == list(global_arrays)
    for key in expected.keys():
        assert np.array_equal(expected[key].numpy(), global_arrays[key].numpy()), key
    weights = history_rows(out)[2]
    assert float(weights["weight/site-0"]) == pytest.approx(counts[0] / counts.sum())


def test_faulty_run_still_reports(faulty_run) -> None:
    metrics, out = faulty_run["metrics"], faulty_run["out"]
    assert metrics["best_round"] in (1, 2) and metrics["balanced_accuracy"] is not None
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()
    assert_no_ray_left()


# --------------------------------------------------------------------------- every hospital failing


def test_all_clients_failing_stops_with_non_zero_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.client_app import make_client_app
    from simulations.simulate import EXIT_ABORTED, run_simulation_from_config

    _register_by_value()
    cfg = config_from_dict(tiny_values(2, num_rounds=5, max_failed_rounds=2, fraction_evaluate=0.0))
    out = tmp_path / "run"
    app = make_client_app(cfg, out / "client_state", fault_injector=FaultInjector({0: "crash", 1: "crash"}))
    status = run_simulation_from_config(cfg, str(out), client_app=app)
    assert status == EXIT_ABORTED != 0
    err = capsys.readouterr().err
    assert "2 consecutive round(s) without enough valid replies" in err and "max_failed_rounds=2" in err
    assert "--resume" in err
    aborted = json.loads((out / "aborted.json").read_text())
    assert aborted["round"] == 2 and aborted["failed_rounds"] == [1, 2]
    payload = newest_checkpoint(out)
    assert payload["round"] == 2 and payload["failed_streak"] == 2
    assert not (out / "metrics.json").exists(), "an aborted run must not look finished"
    rows = history_rows(out)
    assert [r["round"] for r in rows] == ["0", "1", "2"] and rows[1]["clients_aggregated"] == "0"
    assert_no_ray_left()


# --------------------------------------------------------------------------- kill and resume


class SimulatedKill(Exception):
    """Stands for SIGKILL of the server process."""


def killing_server_app(cfg: Config, out: Path, kill_round: int):
    """The fopro-kd ServerApp on a Grid that dies in train round ``kill_round`` after the clients replied."""
    from flwr.serverapp import Grid, ServerApp

    from server.server_app import run_federation

    class KillingGrid(Grid):
        def __init__(self, inner: Grid) -> None:
            self.inner, self.train_calls = inner, 0

        def set_run(self, run: Any) -> None:
            self.inner.set_run(run)

        @property
        def run(self) -> Any:
            return self.inner.run

        def create_message(self, *args: Any, **kwargs: Any) -> Message:
            return self.inner.create_message(*args, **kwargs)

        def get_node_ids(self) -> Iterable[int]:
            return self.inner.get_node_ids()

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            return self.inner.push_messages(messages)

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            return self.inner.pull_messages(message_ids)

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            messages = list(messages)
            is_train = bool(messages) and messages[0].metadata.message_type.startswith("train")
            replies = self.inner.send_and_receive(messages, timeout=timeout)
            if is_train:
                self.train_calls += 1
                if self.train_calls == kill_round:
                    raise SimulatedKill(f"server killed in round {kill_round} after the clients replied")
            return replies

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(KillingGrid(grid), cfg, out)

    return app


def test_kill_and_resume_in_ray_is_bit_identical(tmp_path: Path) -> None:
    """Killed in round 2 after the clients trained; resumed from RUN_DIR alone; equal to the uninterrupted run.

    The uninterrupted reference runs on the in-process Grid of ``test_resume`` (single-threaded
    clients, the same code): it is bit-identical to a Ray run (checked when this test was
    written) and saves a third Ray start-up.
    """
    from flwr.supercore.task_identity import TaskIdentity

    from simulations.simulate import run_simulation_from_config, simulate
    from test_resume import assert_same_arrays, comparable_history, comparable_metrics, federate, final_arrays

    _register_by_value()
    values = tiny_values(3, num_rounds=2, strategy="fedmas", fedmas_rule="mas_DRW", drw_fraction=0.5,
                         fraction_evaluate=1.0, min_available_clients=3)
    cfg = config_from_dict(values)
    out = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        simulate(cfg, out, server_app=killing_server_app(cfg, out.resolve(), kill_round=2))
    assert_no_ray_left()
    assert not (out / "metrics.json").exists()
    states = sorted(p.parent.name for p in (out / "client_state").glob("run-*/site-*/client_state.pt"))
    assert states == ["site-0", "site-1", "site-2"]
    assert load_checkpoint(next((out / "client_state").glob("run-*/site-0/client_state.pt")))["last_round"] == 2, (
        "the clients had already trained round 2 when the server died"
    )
    assert newest_checkpoint(out)["round"] == 1

    assert run_simulation_from_config(Config(), None, resume_dir=out) == 0  # no --config: RUN_DIR/config.yaml
    assert_no_ray_left()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_round"] == 1
    assert newest_checkpoint(out)["strategy"]["last_weight_mode"] == "mas_DRW", "round 2 must see the true round"

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 11, 1, 0
    try:
        reference = tmp_path / "reference"
        ref_metrics = federate(cfg, reference, tmp_path / "reference-state")
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    drop = {"failed_replies", "rejected_replies", "missing_replies"}  # (empty here; node ids differ between runs)
    assert {k: v for k, v in comparable_metrics(metrics).items() if k not in drop} == {
        k: v for k, v in comparable_metrics(ref_metrics).items() if k not in drop}
    assert comparable_history(out) == comparable_history(reference)
    assert_same_arrays(final_arrays(out)[1], final_arrays(reference)[1])
    assert_same_arrays(load_checkpoint(out / "best.pt")["state_dict"],
                       load_checkpoint(reference / "best.pt")["state_dict"])


# --------------------------------------------------------------------------- Byzantine sites, in process (issue 14)
#
# These run on the in-process grid of tests/federation_helpers.py (no Ray): the faults are in what a
# site *sends*, not in how the runtime delivers it, so the engine does not matter and the suite stays fast.

ROBUST_FAULTS = {1: "scale", 2: "huge-n", 3: "flip", 4: "nan"}
"""Site -> fault of the Byzantine run; sites 0 and 5 are honest."""
ROBUST_CHECKS = {"site-1": "update-norm", "site-2": "num-examples", "site-3": "direction", "site-4": "finite"}


@pytest.fixture(scope="module")
def byzantine_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from client.client_app import make_client_app
    from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads
    from server.server_app import run_federation

    clear_caches()
    base = tmp_path_factory.mktemp("byzantine")
    cfg = config_from_dict(tiny_values(6, strategy="median", fraction_evaluate=0.0, min_available_clients=6))
    out = base / "run"
    app = make_client_app(cfg, base / "state", fault_injector=FaultInjector(dict(ROBUST_FAULTS)))
    with fake_task_identity(run_id=21), preserved_torch_threads():
        metrics = run_federation(LocalGrid(app, 6), cfg, out)
    return {"cfg": cfg, "out": out, "metrics": metrics}


def test_byzantine_sites_are_rejected_with_their_check_in_every_round(byzantine_run) -> None:
    """x1e4 weights (norm bound, on by default), 10**9 examples, a sign-flipped update and NaN: each site named."""
    metrics = byzantine_run["metrics"]
    for server_round in (1, 2):
        assert _rejections(metrics, server_round) == ROBUST_CHECKS, metrics["rejected_replies"]
    reasons = {r["site"]: r["reason"] for r in metrics["rejected_replies"] if r["round"] == 1}
    assert "federation.num_examples_peer_ratio" in reasons["site-2"]
    assert "cosine similarity -" in reasons["site-3"]


def test_byzantine_run_finishes_on_the_honest_sites_only(byzantine_run) -> None:
    out, metrics = byzantine_run["out"], byzantine_run["metrics"]
    assert (out / "metrics.json").is_file() and metrics["best_round"] in (1, 2)
    assert metrics["rounds_without_aggregation"] == [] and metrics["rejected_aggregates"] == {}
    rows = history_rows(out)
    for row in rows[1:]:
        assert int(row["clients_aggregated"]) == 2 and int(row["clients_rejected"]) == 4, row
        assert float(row["weight/site-0"]) == pytest.approx(0.5) == float(row["weight/site-5"])
        assert all(row.get(f"weight/site-{k}", "") == "" for k in ROBUST_FAULTS)
        assert float(row["update_norm_bound"]) > 0 and row["aggregate_rejected"] == ""
    payload = newest_checkpoint(out)
    assert payload["round"] == 2
    assert all(torch.isfinite(v).all() for v in payload["arrays"].values() if v.is_floating_point())


def test_aggregate_with_nan_is_discarded_and_the_previous_model_kept(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A strategy bug (or overflow) that yields NaN in round 2: the round-1 model stays, the run finishes."""
    from client.client_app import make_client_app
    from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads
    from server.server_app import run_federation
    from server.strategies.fedavg import FedAvgStrategy

    original = ValidatedWeightedAvg._average
    calls = {"n": 0}

    def poisoned(arrays_np: Any, alpha: Any) -> ArrayRecord:
        calls["n"] += 1
        record = original(arrays_np, alpha)
        if calls["n"] == 2:
            key = next(k for k in record.keys() if np.issubdtype(record[k].numpy().dtype, np.floating))
            value = record[key].numpy().copy()
            value.reshape(-1)[0] = np.inf
            record[key] = Array(value)
        return record

    monkeypatch.setattr(FedAvgStrategy, "_average", staticmethod(poisoned))
    cfg = config_from_dict(tiny_values(2, num_rounds=2, fraction_evaluate=0.0, min_available_clients=2))
    out = tmp_path / "run"
    with fake_task_identity(run_id=22), preserved_torch_threads():
        metrics = run_federation(LocalGrid(make_client_app(cfg, tmp_path / "state"), 2), cfg, out)
    assert "non-finite" in metrics["rejected_aggregates"]["2"] and metrics["rounds_without_aggregation"] == [2]
    rows = history_rows(out)
    assert "non-finite" in rows[2]["aggregate_rejected"] and rows[2]["clients_aggregated"] == "0"
    assert rows[1]["aggregate_rejected"] == ""
    store = ServerCheckpointStore(RunDir(out))
    round1, round2 = (load_checkpoint(store.path_for(r))["arrays"] for r in (1, 2))
    for key, value in round1.items():
        assert torch.equal(value, round2[key]), key
    assert all(torch.isfinite(v).all() for v in round2.values() if v.is_floating_point())
    assert (out / "metrics.json").is_file() and metrics["best_round"] == 1


# --------------------------------------------------------------------------- a hospital that dies (issue 14)


class DyingGrid:
    """Builds a LocalGrid whose site ``site`` dies while training round ``round_``.

    Its instruction is answered as Flower's SuperLink answers it (an error reply *from the SuperLink*,
    node id 1, "Node Unavailable", ``reply_to_message_id`` naming the instruction) and from then on the
    node is no longer listed by ``get_node_ids``.
    """

    @staticmethod
    def make(app: Any, num_nodes: int, site: int, round_: int) -> Any:
        from federation_helpers import LocalGrid

        class _Grid(LocalGrid):
            dead = False

            def get_node_ids(self) -> Iterable[int]:
                return [n for n in super().get_node_ids() if not (self.dead and n == 1000 + site)]

            def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
                messages = list(messages)
                for msg in messages:  # what Grid.push_messages does
                    msg.metadata.__dict__["_message_id"] = msg.object_id
                config = messages[0].content.config_records.get("config") if messages else None
                if (messages and messages[0].metadata.message_type.startswith("train") and config is not None
                        and int(config.get("server-round", 0)) == round_):
                    self.dead = True
                alive = [m for m in messages if not (self.dead and m.metadata.dst_node_id == 1000 + site)]
                replies = list(super().send_and_receive(alive, timeout=timeout))
                for msg in messages:
                    if msg not in alive:
                        error = Message(Error(code=5, reason="Error: Node Unavailable - no heartbeat"), reply_to=msg)
                        error.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID
                        replies.append(error)
                return replies

        return _Grid(app, num_nodes)


def test_dead_node_ends_the_run_cleanly_after_the_wait_bound_and_resumes(tmp_path: Path) -> None:
    from client.client_app import make_client_app
    from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads
    from server.rounds import FederationAborted
    from server.server_app import run_federation

    cfg = config_from_dict(tiny_values(2, num_rounds=3, fraction_evaluate=0.0, min_available_clients=2,
                                       node_wait_s=1.0))
    out = tmp_path / "run"
    app = make_client_app(cfg, tmp_path / "state")
    started = time.perf_counter()
    with fake_task_identity(run_id=23), preserved_torch_threads():
        with pytest.raises(FederationAborted, match="node_wait_s"):
            run_federation(DyingGrid.make(app, 2, site=1, round_=2), cfg, out)
    assert time.perf_counter() - started < 120
    aborted = json.loads((out / "aborted.json").read_text())
    assert aborted["round"] == 2 and aborted["check"] == "nodes-unavailable" and aborted["connected"] == 1
    assert not (out / "metrics.json").exists()
    assert newest_checkpoint(out)["round"] == 2
    rows = history_rows(out)
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert rows[2]["clients_aggregated"] == "1" and rows[2]["clients_failed"] == "1" == rows[2]["clients_rejected"]
    failed = aborted["partial_metrics"]["failed_replies"]["2"]
    assert set(failed) == {"site-1"} and "Node Unavailable" in failed["site-1"], failed
    assert [(m["round"], m["site"]) for m in aborted["partial_metrics"]["missing_replies"]] == [(2, "site-1")]

    with fake_task_identity(run_id=24), preserved_torch_threads():  # the hospital is back: continue
        metrics = run_federation(LocalGrid(app, 2), cfg, out, resume=True)
    assert metrics["resumed_from_round"] == 2 and [r["round"] for r in history_rows(out)] == ["0", "1", "2", "3"]
