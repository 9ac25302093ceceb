"""End to end on Flower's simulation engine (Ray): 3 hospitals, 2 rounds, report files; a crashing client; resume refusal."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulations.cli import main as cli_main
from fopro_kd.config import Config, config_from_dict
from server.checkpoints import ResumeError
from server.selection import TIMING_COLUMNS
from simulations.simulate import run_simulation_from_config, simulate
from simulations.tiny_federation import tiny_federation_values

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TINY = tiny_federation_values(
    federation={"partition": {"kind": "dirichlet", "alpha": 1.0, "site_styles": ["scanner_a", "scanner_b", "scanner_c"]}}
)


def tiny(**federation: Any) -> Config:
    values = json.loads(json.dumps(TINY))
    values["federation"].update(federation)
    return config_from_dict(values)


def crashing_client_app(cfg: Config, state_root: Path, site: int):
    """The fopro-kd ClientApp, except that ``site`` raises in round 1 (defined here, pickled by value into Ray)."""
    from flwr.clientapp import ClientApp

    from client.client_app import handle_evaluate, handle_train

    app = ClientApp()

    @app.train()
    def train(msg, context):
        if context.node_config["partition-id"] == site and int(msg.content["config"]["server-round"]) == 1:
            raise RuntimeError(f"simulated crash at site-{site}")
        return handle_train(msg, context, cfg, state_root)

    @app.evaluate()
    def evaluate(msg, context):
        return handle_evaluate(msg, context, cfg)

    return app


def test_cli_simulate_writes_the_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "sim.yaml"
    values = json.loads(json.dumps(TINY))
    values["federation"]["state_persist_every"] = 2  # round 1 kept in memory (state_memory auto = node), 2 persisted
    config_file.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    live = tmp_path / "live"
    monkeypatch.setenv("FOPRO_KD_LIVE_STATE", str(live))  # where the Ray actors keep the sites' state
    assert cli_main(["simulate", "--config", str(config_file), "--out", str(out)]) == 0
    assert live.is_dir() and not any(live.iterdir()), "the simulation removes the states it kept on the node"
    printed = capsys.readouterr().out
    assert "training images per class and site" in printed and "global test balanced accuracy" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"] == 2 and metrics["best_round"] in (1, 2) and metrics["strategy"] == "fedavg"
    assert {"balanced_accuracy", "few_shot", "per_class_recall", "confusion_matrix"} <= set(metrics)
    assert set(metrics["per_site"]) == {"site-0", "site-1", "site-2"}
    assert len(metrics["round_seconds"]) == 2 and metrics["failed_replies"] == {}
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    for column in ("recall/class_0", "weight/site-2", "bytes/site-1", "site_bacc/site-0", "round_seconds"):
        assert rows[2][column] != "", column
    hist = json.loads((out / "site_histograms.json").read_text())
    assert hist["styles"] == {"site-0": "scanner_a", "site-1": "scanner_b", "site-2": "scanner_c"}
    assert (out / "config.yaml").is_file() and (out / "best.pt").is_file()
    # persisted rounds only (state_persist_every 2): the initial model and the last round
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["server-round-0000.pt", "server-round-0002.pt"]
    for name in ("class_histograms.png", "per_class_recall_rounds.png", "site_balanced_accuracy.png",
                 "aggregation_weights.png"):
        assert (out / "plots" / name).is_file(), name


def test_crashing_client_leaves_the_federation_running(tmp_path: Path) -> None:
    cfg = tiny(strategy="fedmas", min_available_clients=2)
    out = tmp_path / "run"
    app = crashing_client_app(cfg, out / "client_state", site=1)
    metrics = simulate(cfg, out, client_app=app)
    assert "simulated crash at site-1" in metrics["failed_replies"]["1"]["site-1"]
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[1]["weight/site-1"] == "" and float(rows[2]["weight/site-1"]) > 0, "site-1 rejoins in round 2"
    assert metrics["best_round"] in (1, 2)


def test_resume_without_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    """Resume itself is covered by tests/test_resume.py and tests/test_faults.py; here: nothing to resume."""
    with pytest.raises(ResumeError, match=r"no server checkpoint"):
        run_simulation_from_config(tiny(), None, resume_dir=tmp_path)
    with pytest.raises(ResumeError, match="no such run directory"):
        run_simulation_from_config(tiny(), None, resume_dir=tmp_path / "missing")


def test_same_seed_reproduces_the_federation_exactly(tmp_path: Path) -> None:
    """Two simulations of one config on one machine: the same metrics every round and the same global weights.

    Why: a comparison of methods pairs runs by seed; if a seed did not fix the federation (the order
    in which Ray's actors take the sites, a site's generator carried across rounds), the paired
    differences would include run-to-run noise that no interval accounts for.
    """
    import torch

    from fopro_kd.checkpoint import load_checkpoint

    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        simulate(tiny(num_rounds=3), out)
    histories = []
    for out in runs:
        with open(out / "history.csv") as handle:
            histories.append([{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
                              for row in csv.DictReader(handle)])
    assert len(histories[0]) == 4 and histories[0] == histories[1]
    assert any(row["test_balanced_accuracy"] != histories[0][0]["test_balanced_accuracy"] for row in histories[0][1:]), \
        "the federation must learn something for the comparison to mean anything"
    first, second = (load_checkpoint(out / "checkpoints" / "server-round-0003.pt") for out in runs)
    assert first["arrays"].keys() == second["arrays"].keys()
    for key, value in first["arrays"].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(second["arrays"][key])), key
