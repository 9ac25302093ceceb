"""Simulation speed without losing state (issue 16): state in memory between persists, evaluation schedule.

In-process federations on the local grid of ``federation_helpers`` (no Ray): each node keeps
its ``context.state`` between rounds as Flower's simulation engine does, a "kill" is a grid
that raises (as in ``tests/test_resume.py``) and a restart gets fresh contexts, i.e. the
memory copy is gone and only what was persisted survives.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from client.client_app import make_client_app
from client.state import MEMORY_STATE_KEY, ClientState, ClientStateLost, ClientStateStore, state_memory_mode
from fopro_kd.checkpoint import load_checkpoint
from fopro_kd.config import Config, ConfigError, config_from_dict, load_config
from fopro_kd.round_schedule import evaluates_round, persists_round
from fopro_kd.run_dir import RunDir
from server.checkpoints import ServerCheckpointStore
from server.server_app import run_federation

from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads, tiny_values  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _run_identity():
    with fake_task_identity(run_id=21), preserved_torch_threads():
        yield


def tiny(**federation: Any) -> Config:
    values = tiny_values(federation={"num_rounds": 4, "min_available_clients": 3, **federation})
    return config_from_dict(values)


class KillAfterTrainRound(LocalGrid):
    """Raises after the clients replied to train round ``kill_round`` (the server never aggregates it)."""

    def __init__(self, *args: Any, kill_round: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kill_round, self.train_calls = kill_round, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type.startswith("train")
        self.train_calls += int(is_train)
        replies = super().send_and_receive(messages, timeout=timeout)
        if is_train and self.train_calls == self.kill_round:
            raise KeyboardInterrupt(f"killed in round {self.kill_round}")
        return replies


def federate(cfg: Config, out: Path, state: Path, *, memory_state: bool, resume: bool = False, run_id: int = 21,
             kill_round: int | None = None, live_root: Path | None = None) -> tuple[dict[str, Any] | None, LocalGrid]:
    app = make_client_app(cfg, state_root=state, memory_state=memory_state, live_root=live_root)
    grid = KillAfterTrainRound(app, cfg.federation.num_clients, run_id=run_id, kill_round=kill_round)
    try:
        return run_federation(grid, cfg, out, resume=resume), grid
    except KeyboardInterrupt:
        return None, grid


def history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def final_global(run_dir: Path) -> dict[str, torch.Tensor]:
    rnd, path = ServerCheckpointStore(RunDir(run_dir)).checkpoints()[0]
    return load_checkpoint(path)["arrays"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def site_files(state: Path, site: int) -> list[Path]:
    return sorted(state.glob(f"*/site-{site}/client_state*.pt"))


@pytest.fixture(scope="module")
def disk_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """4 rounds, state written every round (the deployment behaviour)."""
    base = tmp_path_factory.mktemp("disk")
    metrics, _ = federate(tiny(), base / "run", base / "state", memory_state=False)
    assert metrics is not None
    return base / "run", metrics


def test_schedule_rule() -> None:
    cfg = tiny(state_persist_every=3, evaluate_every=2)
    assert [r for r in range(5) if persists_round(cfg, r)] == [0, 3, 4]  # every 3rd, round 0 and the last
    assert [r for r in range(5) if evaluates_round(cfg, r)] == [0, 2, 4]


@pytest.mark.parametrize("kept_in", ["context", "node"])
def test_state_in_memory_between_persists_trains_exactly_as_on_disk(disk_reference, tmp_path: Path,
                                                                    kept_in: str) -> None:
    ref_dir, ref_metrics = disk_reference
    cfg = tiny(state_persist_every=3)
    out, state = tmp_path / "run", tmp_path / "state"
    live = tmp_path / "live" if kept_in == "node" else None
    metrics, grid = federate(cfg, out, state, memory_state=True, live_root=live)
    assert metrics is not None
    # the same training: the state that stayed in memory is the one the disk run read back
    assert_same(final_global(out), final_global(ref_dir))
    assert metrics["balanced_accuracy"] == ref_metrics["balanced_accuracy"]
    # persisted only in rounds 3 and 4 (current + previous file), kept in memory in every round
    for site in range(cfg.federation.num_clients):
        files = site_files(state, site)
        assert [p.name for p in files] == ["client_state.prev.pt", "client_state.pt"]
        rounds = sorted(int(load_checkpoint(p)["last_round"]) for p in files)
        assert rounds == [3, 4]
    for context in grid.contexts.values():
        record = context.state[MEMORY_STATE_KEY]
        assert int(record["last-round"]) == 4 and int(record["persisted-round"]) == 4
        # node: the engine's record is a token (kilobytes, not the 100+ kB optimizer state), the state a file
        assert ("payload" in record) == (kept_in == "context") and ("live-nonce" in record) == (kept_in == "node")
    if live is not None:
        assert sorted(p.name for p in live.glob("*/site-*.pt")) == [f"site-{i}.pt" for i in range(3)]
    assert [r for r, _ in ServerCheckpointStore(RunDir(out)).checkpoints()] == [4, 3]


def test_memory_state_survives_rounds_without_files(tmp_path: Path) -> None:
    """Between persists nothing is on disk, yet round 2 continues round 1's state (rounds_trained grows)."""
    cfg = tiny(num_rounds=3, state_persist_every=5)  # persisted only in the last round
    out, state = tmp_path / "run", tmp_path / "state"
    metrics, grid = federate(cfg, out, state, memory_state=True, kill_round=2)  # killed after round 2 trained
    assert metrics is None
    assert not list(state.glob("*/site-*/client_state*.pt")), "rounds 1-2 must not write state files"
    for node, context in grid.contexts.items():
        record = context.state[MEMORY_STATE_KEY]
        kept = ClientStateStore(state, str(record["run-key"]), node - 1000, memory=context.state).load(before_round=3)
        assert kept.rounds_trained == 2 and kept.last_round == 2
    assert [r for r, _ in ServerCheckpointStore(RunDir(out)).checkpoints()] == [0]  # only round 0 persisted


@pytest.mark.parametrize("kept_in", ["context", "node"])
def test_kill_between_persists_resumes_from_the_last_persisted_round(disk_reference, tmp_path: Path,
                                                                     kept_in: str) -> None:
    ref_dir, ref_metrics = disk_reference
    cfg = tiny(state_persist_every=2)
    out, state = tmp_path / "run", tmp_path / "state"
    live = tmp_path / "live" if kept_in == "node" else None
    metrics, _ = federate(cfg, out, state, memory_state=True, kill_round=3, live_root=live)  # round 3 trained, not saved
    assert metrics is None
    assert ServerCheckpointStore(RunDir(out)).checkpoints()[0][0] == 2
    # fresh contexts; with node the killed run's files of round 3 are still there (same folder): the tokens ignore them
    metrics, _ = federate(cfg, out, state, memory_state=True, resume=True, run_id=22, live_root=live)
    assert metrics is not None and metrics["resumed_from_round"] == 2
    assert [int(r["round"]) for r in history(out)] == [0, 1, 2, 3, 4], "every round exactly once"
    assert_same(final_global(out), final_global(ref_dir))  # round 3 repeated from the persisted state of round 2
    assert metrics["balanced_accuracy"] == ref_metrics["balanced_accuracy"]


def test_kept_state_on_the_node_is_found_by_its_token_only(tmp_path: Path) -> None:
    """Another actor (a new store, the same context) reads the file; a replaced or removed file is an error."""
    from flwr.app import RecordDict

    memory = RecordDict()
    trainer = {"step": torch.arange(5.0)}
    writer = ClientStateStore(tmp_path / "state", "run-a", 2, memory=memory, live_root=tmp_path / "live")
    writer.save(ClientState(2, trainer, rounds_trained=1, last_round=1), persist=False)
    assert not list((tmp_path / "state").rglob("*.pt")), "between persists nothing is written to the state root"
    reader = ClientStateStore(tmp_path / "state", "run-a", 2, memory=memory, live_root=tmp_path / "live")
    kept = reader.load(before_round=2)
    assert kept.rounds_trained == 1 and torch.equal(kept.trainer["step"], trainer["step"])
    # another run (another context) wrote the same path: this context's token no longer matches
    ClientStateStore(tmp_path / "state", "run-a", 2, memory=RecordDict(), live_root=tmp_path / "live").save(
        ClientState(2, {"step": torch.zeros(1)}, rounds_trained=7, last_round=1), persist=False)
    with pytest.raises(ClientStateLost, match=r"site-2: its state of round 1.*replaced by another.*--resume"):
        reader.load(before_round=2)
    writer.live_path.unlink()
    with pytest.raises(ClientStateLost, match=r"site-2: its state of round 1.*missing.*state_memory: context"):
        reader.load(before_round=2)


def test_state_memory_auto_is_node_unless_on_a_ray_cluster() -> None:
    assert state_memory_mode(tiny()) == "node"
    assert state_memory_mode(tiny(ray_address="10.0.0.5:6379")) == "context"
    assert state_memory_mode(tiny(ray_address="10.0.0.5:6379", state_memory="node")) == "node"
    with pytest.raises(ConfigError, match="state_memory"):
        load_config(None, ["federation.state_memory=shm"])


def test_dp_refuses_state_persist_every_above_one() -> None:
    with pytest.raises(ConfigError, match=r"'federation.state_persist_every' is 2 with 'privacy.mode: local'.*ledger"):
        load_config(None, ["federation.state_persist_every=2", "privacy.mode=local", "privacy.target_epsilon=8"])


def test_evaluate_every_and_test_only_for_the_selected_model(tmp_path: Path) -> None:
    cfg = tiny(evaluate_every=3, test_every_round=False)
    metrics, _ = federate(cfg, tmp_path / "run", tmp_path / "state", memory_state=True)
    assert metrics is not None
    rows = history(tmp_path / "run")
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4]
    scored = [int(r["round"]) for r in rows if r["val_balanced_accuracy"] != ""]
    assert scored == [0, 3, 4]
    assert all(r["test_balanced_accuracy"] == "" for r in rows), "no per-round test with test_every_round false"
    federated = [int(r["round"]) for r in rows if any(k.startswith("site_bacc/") and v != "" for k, v in r.items())]
    assert federated == [3, 4], "federated evaluation only in scheduled rounds"
    assert all(r["clients_aggregated"] == "3" for r in rows[1:]), "unscored rounds still record the clients"
    assert metrics["best_round"] in (3, 4)
    assert metrics["balanced_accuracy"] is not None, "the selected model is tested once at the end"
    assert (tmp_path / "run" / "predictions_test.npz").is_file()


def test_last_round_predictions_are_the_last_global_model(tmp_path: Path) -> None:
    """``predictions_test_last.npz`` (comparisons at a fixed budget, ``--model last``) holds the last round's
    global model: its balanced accuracy is that round's test figure in ``history.csv``, not the selected one's."""
    from fopro_kd.stats import balanced_accuracy, load_predictions

    cfg = tiny(num_rounds=2, test_every_round=True)
    metrics, _ = federate(cfg, tmp_path / "run", tmp_path / "state", memory_state=True)
    assert metrics is not None
    last = load_predictions(tmp_path / "run", "last")
    rows = {int(r["round"]): r for r in history(tmp_path / "run")}
    assert balanced_accuracy(last.labels, last.predicted) == pytest.approx(float(rows[2]["test_balanced_accuracy"]))
    selected = load_predictions(tmp_path / "run")
    assert balanced_accuracy(selected.labels, selected.predicted) == pytest.approx(
        float(rows[metrics["best_round"]]["test_balanced_accuracy"]))


class CountingGrid(LocalGrid):
    """Counts the messages of each type the server sends (train / evaluate) per call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:
            self.sent.append((messages[0].metadata.message_type.split(".")[0], len(messages)))
        return super().send_and_receive(messages, timeout=timeout)


def federate_counting(cfg: Config, out: Path, state: Path) -> tuple[dict[str, Any], CountingGrid]:
    grid = CountingGrid(make_client_app(cfg, state_root=state, memory_state=True), cfg.federation.num_clients,
                        run_id=21)
    return run_federation(grid, cfg, out), grid


def site_scores(rows: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    return {int(r["round"]): {k: v for k, v in r.items() if k.startswith("site_bacc/") and v != ""} for r in rows}


def test_schedule_of_evaluation_in_train() -> None:
    from fopro_kd.round_schedule import federated_evaluate_phase, scored_in_train

    cfg = tiny(num_rounds=5, evaluate_every=2)  # scheduled: 0, 2, 4, 5
    assert [r for r in range(1, 6) if federated_evaluate_phase(cfg, r)] == [5], "only the last has its own phase"
    assert {r: scored_in_train(cfg, r) for r in range(1, 6)} == {1: None, 2: None, 3: 2, 4: None, 5: 4}
    before = tiny(num_rounds=5, evaluate_every=2, evaluate_in_train=False)
    assert [r for r in range(1, 6) if federated_evaluate_phase(before, r)] == [2, 4, 5]
    assert all(scored_in_train(before, r) is None for r in range(1, 6))


def test_evaluation_in_train_scores_the_same_models_without_evaluate_rounds(tmp_path: Path) -> None:
    """Scores sent with the next round's update equal those of a separate evaluate phase; training is unchanged."""
    before, grid_before = federate_counting(tiny(evaluate_in_train=False), tmp_path / "a", tmp_path / "sa")
    now, grid_now = federate_counting(tiny(), tmp_path / "b", tmp_path / "sb")
    assert_same(final_global(tmp_path / "b"), final_global(tmp_path / "a"))  # scoring does not touch training
    assert [kind for kind, _ in grid_before.sent] == ["train", "evaluate"] * 4
    assert [kind for kind, _ in grid_now.sent] == ["train"] * 4 + ["evaluate"], "one evaluate phase: the last round"
    scores_before, scores_now = site_scores(history(tmp_path / "a")), site_scores(history(tmp_path / "b"))
    assert all(len(scores_before[r]) == 3 for r in (1, 2, 3, 4))
    assert scores_now == scores_before, "every round's site scores, completed one round later"
    assert now["per_site"] == before["per_site"] and now["best_round"] == before["best_round"]


def test_recorder_files_train_reply_scores_under_the_scored_round() -> None:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from server.history import RoundRecorder

    recorder = RoundRecorder()
    sent = Message(RecordDict({"arrays": ArrayRecord()}), dst_node_id=7, message_type="train")

    def reply(scored: int, correct: list[int]) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({
            "num-examples": 4, "site-id": 2, "scored-round": scored, "correct-counts": correct,
            "total-counts": [2, 2]})}), reply_to=sent)

    with fake_task_identity(run_id=21):
        recorder.on_train_replies(3, [reply(2, [1, 2])])
        recorder.on_train_replies(5, [reply(2, [0, 0])])  # not the round its model came from: ignored
        recorder.on_train_replies(6, [reply(5, [3, 2])])  # more correct than images: refused, named
    assert recorder.rounds[2].site_eval == {7: ([1, 2], [2, 2])}, "kept under round 2, not overwritten by round 5"
    assert 4 not in recorder.rounds and not recorder.rounds[5].site_eval
    assert "more correct predictions than samples" in recorder.rounds[5].eval_errors[7]


def ledger_epsilons(state: Path, sites: int, delta: float) -> list[float]:
    from fopro_kd.privacy.ledger import PrivacyLedgerStore

    return [PrivacyLedgerStore(state, site).read().epsilon(delta) for site in range(sites)]


def test_local_dp_run_killed_after_a_charged_round_resumes_without_undercounting(tmp_path: Path) -> None:
    """Killed after the sites charged and sent round 3 but before the server kept it: the ledger keeps round 3.

    The resumed server sends round 3 again; every site refuses it (its ledger already charged
    round 3: a replay would spend privacy the reported epsilon hides), the round is recorded
    once as failed, and round 4 trains. No ledger ever decreases.
    """
    cfg = config_from_dict(tiny_values(federation={"num_rounds": 4, "min_available_clients": 3,
                                                   "max_failed_rounds": 2},
                                       privacy={"mode": "local", "target_epsilon": 50.0}))
    out, state = tmp_path / "run", tmp_path / "state"
    sites = cfg.federation.num_clients
    delta = cfg.privacy.delta
    metrics, _ = federate(cfg, out, state, memory_state=False, kill_round=3)
    assert metrics is None
    before = ledger_epsilons(state, sites, delta)
    assert all(e > 0 for e in before)
    metrics, _ = federate(cfg, out, state, memory_state=False, resume=True, run_id=22)
    assert metrics is not None and metrics["resumed_from_round"] == 2
    rows = history(out)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4], "every round exactly once"
    assert rows[3]["clients_aggregated"] == "0" and rows[3]["clients_failed"] == str(sites)
    assert all("RoundNotIncreasing" in why and "refusing round 3" in why
               for why in metrics["failed_replies"]["3"].values())
    assert rows[4]["clients_aggregated"] == str(sites)
    after = ledger_epsilons(state, sites, delta)
    assert all(a > b for a, b in zip(after, before)), (before, after)  # round 4 charged on top of the kept round 3
    from fopro_kd.privacy.ledger import PrivacyLedgerStore

    for site in range(sites):
        assert [e["round"] for e in PrivacyLedgerStore(state, site).read().entries] == [1, 2, 3, 4]


def test_a_small_dev_shm_is_not_used_for_kept_states(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Containers mount /dev/shm with 64 MB: the kept states go to the temp dir instead of failing every round."""
    import shutil
    from collections import namedtuple

    import client.state as state_module

    monkeypatch.delenv(state_module.LIVE_STATE_ENV, raising=False)
    monkeypatch.setattr(state_module.tempfile, "tempdir", str(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 64 * 2**20))
    root = state_module.new_live_root()
    try:
        assert root.parent == tmp_path and root.name.startswith("fopro-kd-live-")
    finally:
        state_module.remove_live_root(root)
    assert not root.exists()
