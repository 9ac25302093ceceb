"""The privacy ledger fails closed (issue 11 §1, docs/privacy.md §2.4).

Unit tests of :mod:`fopro_kd.privacy.ledger` (no Flower, milliseconds), then the ClientApp on
hand-built Messages under local DP: a server that replays a round, resets to round 1, sends a
new state key, or finds a corrupted/missing ledger or client state can neither lower a
hospital's ε nor get anything trained that the ledger does not hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import make_client_app
from client.state import ClientStateStore
from fopro_kd.config import Config, config_from_dict
from fopro_kd.privacy.accounting import epsilon_of_history
from fopro_kd.privacy.ledger import (
    FRESH_START_KEY,
    PrivacyLedger,
    PrivacyLedgerError,
    PrivacyLedgerStore,
    RoundNotIncreasing,
    events_since,
    fresh_start_requested,
)
from fopro_kd.federation.evaluation import build_global_student

from federation_helpers import NUM_SITES, fake_task_identity, preserved_torch_threads  # noqa: E402
from federation_helpers import tiny_values as shared_tiny_values  # noqa: E402

DELTA = 1e-5


# --------------------------------------------------------------------------- the ledger alone


def test_events_since_handles_opacus_merging_and_refuses_a_shrunk_history() -> None:
    before = [(1.0, 0.1, 5), (2.0, 1.0, 1)]
    assert events_since(before, before) == []
    assert events_since(before, [(1.0, 0.1, 5), (2.0, 1.0, 3)]) == [(2.0, 1.0, 2)]  # merged into the last event
    assert events_since(before, [(1.0, 0.1, 5), (2.0, 1.0, 1), (1.0, 0.1, 4)]) == [(1.0, 0.1, 4)]
    assert events_since([], [(1.0, 0.1, 2)]) == [(1.0, 0.1, 2)]
    with pytest.raises(PrivacyLedgerError, match="does not extend"):
        events_since(before, [(1.0, 0.1, 5)])
    with pytest.raises(PrivacyLedgerError, match="does not extend"):
        events_since(before, [(1.0, 0.1, 3), (2.0, 1.0, 9)])


def test_charges_append_and_compose_across_runs(tmp_path: Path) -> None:
    store = PrivacyLedgerStore(tmp_path, 3)
    ledger = store.open(trained_before=False)
    assert ledger.history() == [] and ledger.last_round("run-a") == 0 and store.path.is_file()
    store.charge("run-a", 1, [(1.0, 0.1, 4), (2.0, 1.0, 1)], class_counts=[3.2, 1.1], delta=DELTA)
    store.charge("run-a", 2, [(1.0, 0.1, 4)], class_counts=[3.2, 1.1], delta=DELTA)
    ledger = store.charge("run-b", 1, [(1.0, 0.1, 4)], delta=DELTA)  # a new state key composes, it does not reset
    assert ledger.history() == [(1.0, 0.1, 4), (2.0, 1.0, 1), (1.0, 0.1, 4), (1.0, 0.1, 4)]
    assert ledger.last_round("run-a") == 2 and ledger.last_round("run-b") == 1
    assert ledger.class_counts("run-a") == [3.2, 1.1] and ledger.class_counts("run-b") is None
    eps = [entry["epsilon_after"] for entry in ledger.entries]
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(epsilon_of_history(ledger.history(), DELTA))
    again = PrivacyLedgerStore(tmp_path, 3).read()
    assert again.entries == ledger.entries
    assert "class_counts" not in again.entries[1], "the same release is stored once"


@pytest.mark.parametrize("server_round", [2, 1, 0])
def test_a_round_that_does_not_increase_is_refused_and_nothing_is_uncharged(tmp_path: Path, server_round: int) -> None:
    store = PrivacyLedgerStore(tmp_path, 0)
    store.open(trained_before=False)
    store.charge("run", 1, [(1.0, 0.1, 4)])
    store.charge("run", 2, [(1.0, 0.1, 4)])
    before = store.path.read_bytes()
    with pytest.raises(RoundNotIncreasing, match=rf"refusing round {server_round} of federation 'run'.*up to round 2"):
        store.charge("run", server_round, [(1.0, 0.1, 4)])
    assert store.path.read_bytes() == before
    with pytest.raises(RoundNotIncreasing):
        store.read().check_round("run", server_round)
    store.read().check_round("run", 3)


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage", "other-site"])
def test_an_unreadable_ledger_is_a_refusal_until_a_fresh_start_is_asked_for(tmp_path: Path, damage: str) -> None:
    store = PrivacyLedgerStore(tmp_path, 1)
    store.open(trained_before=False)
    store.charge("run", 1, [(1.0, 0.1, 40)])
    text = store.path.read_text()
    if damage == "truncate":
        store.path.write_text(text[: len(text) // 2])
    elif damage == "edit":  # lower the steps without fixing the checksum
        store.path.write_text(text.replace("40", "4"))
    elif damage == "garbage":
        store.path.write_bytes(b"\x00\xff" * 10)
    else:
        body = json.loads(text)
        body["site_id"] = 2
        store.path.write_text(json.dumps(body))
    with pytest.raises(PrivacyLedgerError, match=rf"site-1.*{store.path.name}.*{FRESH_START_KEY}=true"):
        store.open(trained_before=True)
    with pytest.raises(PrivacyLedgerError):
        store.charge("run", 2, [(1.0, 0.1, 1)])
    ledger = store.open(trained_before=True, fresh_start=True)
    assert ledger.history() == [] and ledger.resets[-1]["fresh_start"] is True
    kept = list(store.directory.glob("site-1.json.unreadable-*"))
    assert len(kept) == 1, "the unreadable ledger is kept aside, never overwritten"


def test_a_missing_ledger_on_a_site_that_trained_before_is_a_refusal(tmp_path: Path) -> None:
    store = PrivacyLedgerStore(tmp_path, 0)
    with pytest.raises(PrivacyLedgerError, match=r"missing but this site has trained before"):
        store.open(trained_before=True)
    assert not store.path.exists()
    store.open(trained_before=False)
    store.charge("run", 1, [(1.0, 0.1, 4)])
    store.path.unlink()
    with pytest.raises(PrivacyLedgerError, match="missing but this site has trained before"):
        store.open(trained_before=False)  # the first charge's marker is evidence enough
    assert store.open(trained_before=False, fresh_start=True).history() == []


def test_fresh_start_never_discards_a_readable_ledger(tmp_path: Path) -> None:
    store = PrivacyLedgerStore(tmp_path, 0)
    store.open(trained_before=False)
    store.charge("run", 1, [(1.0, 0.1, 4)])
    assert store.open(trained_before=True, fresh_start=True).history() == [(1.0, 0.1, 4)]


def test_fresh_start_value_parsing() -> None:
    assert fresh_start_requested({}) is False
    assert fresh_start_requested({FRESH_START_KEY: True}) and fresh_start_requested({FRESH_START_KEY: "true"})
    assert fresh_start_requested({FRESH_START_KEY: 1}) and not fresh_start_requested({FRESH_START_KEY: "false"})
    with pytest.raises(PrivacyLedgerError, match=FRESH_START_KEY):
        fresh_start_requested({FRESH_START_KEY: "ture"})


def test_ledger_body_validation_refuses_non_increasing_entries() -> None:
    entries = [{"run": "r", "round": 2, "events": []}, {"run": "r", "round": 2, "events": []}]
    body = PrivacyLedger(0, entries=entries).body()
    with pytest.raises(PrivacyLedgerError, match="does not increase"):
        PrivacyLedger.from_body(body, 0, "test")


# --------------------------------------------------------------------------- the ClientApp under local DP


@pytest.fixture(autouse=True)
def _run_identity():
    with fake_task_identity(run_id=21), preserved_torch_threads():
        yield


def dp_config(**privacy: Any) -> Config:
    """The shared tiny federation with local DP at ε 8 (planned for 3 rounds unless told)."""
    values = shared_tiny_values(federation={"num_rounds": 3},
                                privacy={"mode": "local", "target_epsilon": 8.0, **privacy})
    return config_from_dict(values)


def global_arrays(cfg: Config) -> ArrayRecord:
    student = build_global_student(cfg, cfg.data.num_classes, seed=cfg.seed)
    return ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()})


def site_context(partition: int = 0, **node_config: Any) -> Context:
    return Context(run_id=21, node_id=100 + partition, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition, "num-partitions": NUM_SITES, **node_config})


def train(app, arrays: ArrayRecord, server_round: int, ctx: Context, key: str = "run-fed1") -> Message:
    config = ConfigRecord({"server-round": server_round, "state-key": key})
    return app(Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=ctx.node_id,
                       message_type="train"), ctx)


def refusal(app, arrays: ArrayRecord, server_round: int, ctx: Context, key: str = "run-fed1") -> str:
    """The error a refused instruction raises (Flower turns it into the error reply); no model leaves."""
    with pytest.raises(Exception) as info:
        train(app, arrays, server_round, ctx, key)
    return str(info.value)


def ledger_epsilon(root: Path, site: int = 0) -> float:
    return PrivacyLedgerStore(root, site).read().epsilon(DELTA)


def trained_rounds(root: Path, key: str = "run-fed1", site: int = 0) -> int:
    return ClientStateStore(root, key, site).load().rounds_trained


@pytest.fixture(scope="module")
def cfg() -> Config:
    return dp_config()


@pytest.fixture(scope="module")
def arrays(cfg: Config) -> ArrayRecord:
    return global_arrays(cfg)


def two_rounds(cfg: Config, arrays: ArrayRecord, root: Path) -> tuple[Any, list[float]]:
    app = make_client_app(cfg, state_root=root)
    eps = []
    for rnd in (1, 2):
        reply = train(app, arrays, rnd, site_context())
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        eps.append(float(reply.content["metrics"]["dp-epsilon"]))
        # charged before the reply left: the ledger on disk already holds this round's spend
        assert ledger_epsilon(root) == pytest.approx(eps[-1])
    assert 0 < eps[0] < eps[1] <= 8.0
    return app, eps


@pytest.mark.parametrize("server_round", [2, 1], ids=["replayed-round", "round-1-reset"])
def test_replayed_or_reset_round_is_refused_and_trains_nothing(cfg, arrays, tmp_path: Path, server_round: int) -> None:
    app, eps = two_rounds(cfg, arrays, tmp_path)
    assert f"refusing round {server_round}" in refusal(app, arrays, server_round, site_context())
    assert ledger_epsilon(tmp_path) == pytest.approx(eps[1]), "epsilon never decreases"
    assert trained_rounds(tmp_path) == 2, "the refused round trained nothing"
    third = train(app, arrays, 3, site_context())
    assert not third.has_error() and third.content["metrics"]["dp-epsilon"] > eps[1]


def test_a_new_state_key_composes_on_everything_spent(arrays, tmp_path: Path) -> None:
    """A server that picks a new state key gets a fresh model state, never a fresh ε."""
    app, eps = two_rounds(dp_config(planned_rounds=5), arrays, tmp_path)
    reply = train(app, arrays, 1, site_context(), key="run-other")
    assert not reply.has_error() and "arrays" in reply.content.array_records
    assert reply.content["metrics"]["dp-epsilon"] > eps[1]
    assert ledger_epsilon(tmp_path) == pytest.approx(reply.content["metrics"]["dp-epsilon"])


def test_corrupted_ledger_is_a_refusal_and_a_fresh_start_must_be_asked_for(cfg, arrays, tmp_path: Path) -> None:
    app, eps = two_rounds(cfg, arrays, tmp_path)
    path = PrivacyLedgerStore(tmp_path, 0).path
    path.write_text(path.read_text()[:-40])
    text = refusal(app, arrays, 3, site_context())
    # the reply says what and how to fix it; the local path stays on the site (error replies are redacted)
    assert "privacy ledger" in text and "unreadable" in text and FRESH_START_KEY in text
    assert str(path.parent) not in text
    assert trained_rounds(tmp_path) == 2, "the refused round trained nothing"
    fresh = train(app, arrays, 3, site_context(**{FRESH_START_KEY: "true"}))  # the hospital's own, explicit choice
    assert not fresh.has_error() and "arrays" in fresh.content.array_records
    assert ledger_epsilon(tmp_path) == pytest.approx(fresh.content["metrics"]["dp-epsilon"])
    assert list(path.parent.glob("site-0.json.unreadable-*")), "the corrupted ledger is kept"
    path.unlink()  # a deleted ledger with client state left is refused the same way
    assert "missing but this site has trained before" in refusal(app, arrays, 4, site_context())
    assert trained_rounds(tmp_path) == 3


def test_corrupted_client_state_does_not_reset_epsilon(cfg, arrays, tmp_path: Path) -> None:
    """The model state may fall back to fresh (it holds no spend); ε comes from the ledger."""
    app, eps = two_rounds(cfg, arrays, tmp_path)
    store = ClientStateStore(tmp_path, "run-fed1", 0)
    for path in (store.path, store.prev_path):
        path.write_bytes(path.read_bytes()[:100])
    reply = train(app, arrays, 3, site_context())
    assert not reply.has_error()
    assert reply.content["metrics"]["dp-epsilon"] > eps[1]
    assert ledger_epsilon(tmp_path) == pytest.approx(reply.content["metrics"]["dp-epsilon"])


def test_exhausted_site_declines_whatever_round_the_server_sends(arrays, tmp_path: Path) -> None:
    short = dp_config(planned_rounds=1)
    app = make_client_app(short, state_root=tmp_path)
    first = train(app, arrays, 1, site_context())
    assert not first.has_error()
    spent = ledger_epsilon(tmp_path)
    for rnd in (2, 1, 7):
        reply = train(app, arrays, rnd, site_context())
        assert not reply.has_error() and reply.content["metrics"]["dp-budget-exhausted"] == 1, rnd
        assert "dp budget exhausted" in reply.content.config_records["decline"]["reason"]
        assert "arrays" not in reply.content.array_records
    assert ledger_epsilon(tmp_path) == pytest.approx(spent) and trained_rounds(tmp_path) == 1


def test_reply_is_not_sent_when_the_charge_cannot_be_written(cfg, arrays, tmp_path: Path, monkeypatch) -> None:
    app = make_client_app(cfg, state_root=tmp_path)
    train(app, arrays, 1, site_context())

    def disk_full(self, ledger) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(PrivacyLedgerStore, "_write", disk_full)
    assert "No space left on device" in refusal(app, arrays, 2, site_context())
    monkeypatch.undo()
    assert ledger_epsilon(tmp_path) == pytest.approx(epsilon_of_history(
        PrivacyLedgerStore(tmp_path, 0).read().history(), DELTA))
    assert trained_rounds(tmp_path) == 1, "no model state is saved for a round whose charge failed"


@pytest.mark.parametrize("sections", [
    {"federation": {"strategy": "fedmas", "fedmas_rule": "mas"}},  # FedMAS prior + state, released by the site
    {"train": {"method": "ce"}, "federation": {"strategy": "class_balanced"}},  # counts released after training
], ids=["fedmas-statistics", "ce-shared-counts"])
def test_every_release_of_the_round_is_in_the_ledger_before_the_reply(tmp_path: Path, sections) -> None:
    values = shared_tiny_values(privacy={"mode": "local", "target_epsilon": None, "noise_multiplier": 1.0,
                                         "statistics_noise_multiplier": 5.0},
                                **{k: dict(v) for k, v in sections.items()})
    cfg = config_from_dict(values)
    reply = train(make_client_app(cfg, state_root=tmp_path), global_arrays(cfg), 1, site_context())
    assert not reply.has_error() and "arrays" in reply.content.array_records
    ledger = PrivacyLedgerStore(tmp_path, 0).read()
    statistics = sum(steps for sigma, q, steps in ledger.history() if q == 1.0 and sigma == 5.0)
    assert statistics == (3 if cfg.federation.strategy == "fedmas" else 1), ledger.history()
    assert ledger.class_counts("run-fed1") is not None
    assert ledger.epsilon(DELTA) == pytest.approx(reply.content["metrics"]["dp-epsilon"])
