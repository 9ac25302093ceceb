"""A new strategy is one server class plus one client hook, registered; no app code changes (issue 15, item 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from client.client_app import make_client_app
from client.strategy_hooks import CLIENT_HOOKS, ClientHook, FedMASHook, FedProxHook, client_hook
from fopro_kd.config import config_from_dict
from server.server_app import run_federation
from server.strategies import STRATEGIES, FedAvgStrategy
from simulations.tiny_federation import tiny_federation_values

from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads  # noqa: E402

TOY_KEY = "toy-seen"


class ToyStrategy(FedAvgStrategy):
    """FedAvg that records what its hook sent (the server half of the toy strategy)."""

    name = "toy"
    seen: list[float] = []

    def client_weights(self, server_round, metrics):
        ToyStrategy.seen.extend(float(m[TOY_KEY]) for m in metrics)
        return super().client_weights(server_round, metrics)


class ToyHook(ClientHook):
    """The site half: one extra reply metric, the number of training images it saw."""

    def reply_metrics(self, inputs, result):
        return {TOY_KEY: float(result.num_examples)}


def test_every_server_strategy_has_a_client_hook_and_back() -> None:
    assert set(CLIENT_HOOKS) == set(STRATEGIES)
    assert isinstance(client_hook("fedprox"), FedProxHook) and isinstance(client_hook("fedmas"), FedMASHook)
    assert client_hook("fedprox").loss_terms == ("loss_prox",)
    with pytest.raises(ValueError, match=r"'nope' has no client hook"):
        client_hook("nope")


def test_a_toy_strategy_runs_a_round_without_touching_app_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(STRATEGIES, "toy", ToyStrategy)
    monkeypatch.setitem(CLIENT_HOOKS, "toy", ToyHook)
    ToyStrategy.seen = []
    base = config_from_dict(tiny_federation_values(federation={"num_rounds": 1}, train={"method": "bsm"}))
    # the config's Literal lists the shipped strategies; a plug-in strategy is set on the validated config
    cfg = dataclasses.replace(base, federation=dataclasses.replace(base.federation, strategy="toy"))
    with fake_task_identity(run_id=31), preserved_torch_threads():
        grid = LocalGrid(make_client_app(cfg, state_root=tmp_path / "state"), cfg.federation.num_clients, run_id=31)
        metrics = run_federation(grid, cfg, tmp_path / "run")
    assert metrics["strategy"] == "toy" and metrics["best_round"] == 1
    assert len(ToyStrategy.seen) == cfg.federation.num_clients and all(v > 0 for v in ToyStrategy.seen)
