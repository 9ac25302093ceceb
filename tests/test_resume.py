"""Server checkpoints and resume on an in-process Grid (no Ray, seconds): kill after round k, resume, compare.

The Ray version of kill-and-resume is in ``tests/test_faults.py``. Here a test Grid runs the
real ClientApp in this process and "kills" the server by raising from ``send_and_receive``
either before round n's instructions go out or after the clients have trained round n (their
state of round n is then already on disk, the server's checkpoint of round n is not).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message

from client.client_app import make_client_app
from fopro_kd.checkpoint import load_checkpoint
from fopro_kd.config import Config, config_from_dict
from server.checkpoints import ResumeError, ServerCheckpointStore, config_hash
from server.server_app import run_federation
from fopro_kd.run_dir import RunDir

from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads  # noqa: E402
from federation_helpers import tiny_values as shared_tiny_values  # noqa: E402

TIMING_KEYS = {
    "wall_seconds", "round_seconds", "mean_round_seconds", "outside_training_share", "mean_outside_training_share",
    "resumed_from_round",
}
TIMING_COLUMNS = {"round_seconds", "server_eval_seconds", "client_train_seconds_max", "client_train_seconds_sum",
                  "outside_training_share"}


def tiny_values(**federation: Any) -> dict[str, Any]:
    """The shared tiny federation, 3 rounds of FedMAS with DRW switching on at round 3."""
    return shared_tiny_values(federation={"num_rounds": 3, "strategy": "fedmas", "fedmas_rule": "mas_DRW",
                                          "drw_fraction": 0.67, **federation})


def tiny_config(**federation: Any) -> Config:
    return config_from_dict(tiny_values(**federation))


@pytest.fixture(autouse=True, scope="module")
def _run_identity():
    with fake_task_identity(run_id=11), preserved_torch_threads():
        yield


class SimulatedKill(Exception):
    """Stands for SIGKILL of the server process at a chosen point of a round."""


class KillableGrid(LocalGrid):
    """The local grid that can 'kill' the server in train round ``kill_round``.

    ``kill_when``: ``"before"`` (round ``kill_round``'s instructions never reach the clients) or
    ``"after"`` (the clients trained and saved their state, the server dies before aggregating).
    ``run_id`` changes between a run and its resume, as with a real restart.
    """

    def __init__(self, client_app: Callable[[Message, Context], Message], num_nodes: int, run_id: int = 9,
                 kill_round: int | None = None, kill_when: str = "after") -> None:
        super().__init__(client_app, num_nodes, run_id=run_id)
        self.kill_round, self.kill_when = kill_round, kill_when
        self.train_calls = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type.startswith("train")
        if is_train:
            self.train_calls += 1
        kill = is_train and self.train_calls == self.kill_round
        if kill and self.kill_when == "before":
            raise SimulatedKill(f"killed before round {self.kill_round}")
        replies = super().send_and_receive(messages, timeout=timeout)
        if kill:
            raise SimulatedKill(f"killed in round {self.kill_round} after the clients replied")
        return replies


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def comparable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def comparable_history(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_history(run_dir)]


def final_arrays(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    store = ServerCheckpointStore(RunDir(run_dir))
    rnd, path = store.checkpoints()[0]
    return rnd, load_checkpoint(path)["arrays"]


def assert_same_arrays(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs (max |diff| {(a[key].double() - b[key].double()).abs().max()})"


def federate(cfg: Config, out: Path, state: Path, *, resume: bool = False, run_id: int = 9,
             kill_round: int | None = None, kill_when: str = "after") -> dict[str, Any] | None:
    grid = KillableGrid(make_client_app(cfg, state_root=state), cfg.federation.num_clients, run_id=run_id,
                     kill_round=kill_round, kill_when=kill_when)
    try:
        return run_federation(grid, cfg, out, resume=resume)
    except SimulatedKill:
        return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path, dict[str, Any]]:
    """The uninterrupted 3-round run every resumed run must reproduce."""
    cfg = tiny_config()
    base = tmp_path_factory.mktemp("reference")
    metrics = federate(cfg, base / "run", base / "state")
    assert metrics is not None
    return cfg, base / "run", metrics


def test_checkpoint_after_every_round_keeps_the_last_two(reference) -> None:
    cfg, run_dir, _ = reference
    store = ServerCheckpointStore(RunDir(run_dir))
    assert [r for r, _ in store.checkpoints()] == [3, 2]
    payload = load_checkpoint(store.path_for(3), expected_format="fopro-kd-server-checkpoint/1")
    assert payload["round"] == 3 and payload["num_rounds"] == 3 and payload["config_hash"] == config_hash(cfg)
    assert [int(r["round"]) for r in payload["history"]] == [0, 1, 2, 3]
    strategy = payload["strategy"]
    assert strategy["name"] == "fedmas" and strategy["rule"] == "mas_DRW"
    assert strategy["drw_switch_round"] == 3 and strategy["phase"] == "drw"
    assert strategy["last_weight_mode"] == "mas_DRW", "round 3 must use the DRW weights"
    assert set(strategy["robust_factors"]) == {"site-0", "site-1", "site-2"}
    assert set(payload["rng"]) == {"python", "numpy", "torch"}
    two = load_checkpoint(store.path_for(2))
    assert two["strategy"]["phase"] == "fedavg"
    assert (run_dir / "checkpoints" / "server-round-0003.pt.sha256").is_file()


@pytest.mark.parametrize(("kill_round", "kill_when"), [(2, "after"), (3, "before")])
def test_killed_then_resumed_run_is_bit_identical(reference, tmp_path: Path, kill_round: int, kill_when: str) -> None:
    cfg, ref_dir, ref_metrics = reference
    out, state = tmp_path / "run", tmp_path / "state"
    assert federate(cfg, out, state, kill_round=kill_round, kill_when=kill_when) is None
    assert not (out / "metrics.json").exists()
    assert ServerCheckpointStore(RunDir(out)).checkpoints()[0][0] == kill_round - 1
    metrics = federate(cfg, out, state, resume=True, run_id=10)  # a restart gets a new Flower run id
    assert metrics is not None and metrics["resumed_from_round"] == kill_round - 1
    assert comparable_metrics(metrics) == comparable_metrics(ref_metrics)
    assert comparable_history(out) == comparable_history(ref_dir)
    rnd, arrays = final_arrays(out)
    ref_rnd, ref_arrays = final_arrays(ref_dir)
    assert rnd == ref_rnd == 3
    assert_same_arrays(arrays, ref_arrays)
    assert_same_arrays(load_checkpoint(out / "best.pt")["state_dict"], load_checkpoint(ref_dir / "best.pt")["state_dict"])


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg, ref_dir, ref_metrics = reference
    out, state = tmp_path / "run", tmp_path / "state"
    federate(cfg, out, state, kill_round=3, kill_when="before")  # checkpoints 1 and 2, clients at round 2
    newest = out / "checkpoints" / "server-round-0002.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level("WARNING"):
        metrics = federate(cfg, out, state, resume=True, run_id=12)
    assert metrics is not None and metrics["resumed_from_round"] == 1
    assert any("server-round-0002.pt is corrupted or truncated" in r.getMessage() for r in caplog.records)
    assert comparable_metrics(metrics) == comparable_metrics(ref_metrics)
    assert_same_arrays(final_arrays(out)[1], final_arrays(ref_dir)[1])


def test_fresh_run_refuses_a_directory_with_checkpoints(reference, tmp_path: Path) -> None:
    cfg, ref_dir, _ = reference
    before = (ref_dir / "history.csv").read_bytes()
    with pytest.raises(ResumeError, match=r"already holds a federation's checkpoints.*--resume"):
        federate(cfg, ref_dir, tmp_path / "state")
    assert (ref_dir / "history.csv").read_bytes() == before, "nothing of the old run may be overwritten"


def test_resume_of_a_finished_run_only_rewrites_the_report(reference, tmp_path: Path) -> None:
    import shutil

    cfg, ref_dir, ref_metrics = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_dir, out)
    metrics = federate(cfg, out, tmp_path / "state", resume=True)
    assert metrics is not None and metrics["resumed_from_round"] == 3
    assert comparable_metrics(metrics) == comparable_metrics(ref_metrics)
    assert json.loads((out / "metrics.json").read_text())["best_round"] == ref_metrics["best_round"]
