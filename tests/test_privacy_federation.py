"""Differential privacy wired into the federation (docs/privacy.md §4): client replies, budget, central DP.

Everything runs in this process (no Ray): the ClientApp on hand-built Messages, whole federations
on the in-process ``LocalGrid`` of tests/test_server_app.py, and the central-DP aggregation on
hand-made replies. Tiny: timm ``test_resnet``, 32 px, ~30 images per site, 2 local steps.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

import fopro_kd.privacy.local_dp as local_dp
from client.client_app import make_client_app
from client.state import ClientStateStore
from fopro_kd.config import Config, config_from_dict
from fopro_kd.privacy import central_epsilon
from fopro_kd.privacy.statistics import REP_LOSS_BOUND, class_means_from_release
from fopro_kd.privacy.surgery import has_batchnorm
from fopro_kd.training.components import build_models
from fopro_kd.federation.evaluation import build_global_student
from server.server_app import run_federation
from server.strategies.base import ValidatedWeightedAvg
from server.strategies.central_dp import CentralDP
from server.strategies.fedavg import FedAvgStrategy
from fopro_kd.federation.fedmas import fedmas_robust_factor
from server.strategies.fedmas import FedMASStrategy

from federation_helpers import NUM_SITES, LocalGrid, aggregate_one_round, fake_task_identity, preserved_torch_threads  # noqa: E402
from federation_helpers import tiny_values as shared_tiny_values  # noqa: E402
DP_KEYS = {"dp-epsilon", "dp-delta", "dp-target-epsilon", "dp-noise-multiplier", "dp-sample-rate", "dp-steps"}


def tiny_values(**sections: dict[str, Any]) -> dict[str, Any]:
    """The shared tiny federation with local DP (epsilon 8) switched on."""
    privacy = {"mode": "local", "target_epsilon": 8.0, **sections.pop("privacy", {})}
    return shared_tiny_values(privacy=privacy, **sections)


def tiny_config(**sections: dict[str, Any]) -> Config:
    return config_from_dict(tiny_values(**sections))


@pytest.fixture(autouse=True)
def _run_identity():
    with fake_task_identity(run_id=13), preserved_torch_threads():
        yield


def global_arrays(cfg: Config) -> ArrayRecord:
    student = build_global_student(cfg, cfg.data.num_classes, seed=cfg.seed)
    return ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()})


def sim_context(partition: int) -> Context:
    return Context(run_id=13, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": NUM_SITES},
                   state=RecordDict(), run_config={})


def train_message(arrays: ArrayRecord, server_round: int, node_id: int) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=node_id, message_type="train")


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def local_grid(apps: dict[int, Any]) -> LocalGrid:
    return LocalGrid(apps, run_id=13)


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("mode", ["local", "central"])
def test_server_and_clients_build_the_same_groupnorm_student(mode: str) -> None:
    cfg = tiny_config(privacy={"mode": mode})
    server = build_global_student(cfg, 4, seed=0)
    client, _ = build_models(cfg, 4, None if cfg.train.method == "ce" else _teacher(cfg))
    assert not has_batchnorm(server) and not has_batchnorm(client)
    assert {k: v.shape for k, v in server.state_dict().items()} == {k: v.shape for k, v in client.state_dict().items()}
    assert all(v.is_floating_point() for v in server.state_dict().values()), "the DP student has no integer buffers"


def _teacher(cfg: Config):
    from fopro_kd.training.components import shared_teacher

    torch.manual_seed(cfg.seed)
    return shared_teacher(cfg)


# --------------------------------------------------------------------------- client replies (local DP)


def test_local_dp_reply_sends_noised_fedmas_factor_and_no_raw_numbers(tmp_path: Path, monkeypatch) -> None:
    """Robust factor = the one of the *released* (noised) statistics, never the raw one; no losses leave."""
    releases: list[tuple[np.ndarray, np.ndarray]] = []
    original = local_dp.privatize_statistics

    def recording(values, clip, sigma, generator):
        noisy = original(values, clip, sigma, generator)
        releases.append((np.asarray(values, dtype=np.float64).copy(), noisy.copy()))
        return noisy

    monkeypatch.setattr(local_dp, "privatize_statistics", recording)
    # small statistics noise (and a budget large enough for it) so the noised factor is finite and != raw
    cfg = tiny_config(federation={"strategy": "fedmas", "fedmas_rule": "mas"},
                      privacy={"target_epsilon": None, "noise_multiplier": 1.0, "statistics_noise_multiplier": 0.3})
    app = make_client_app(cfg, state_root=tmp_path)
    arrays = global_arrays(cfg)
    ctx = sim_context(0)
    reply = app(train_message(arrays, 1, ctx.node_id), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "num-steps", "train-seconds", "site-id", "robust-factor"} | DP_KEYS
    assert metrics["dp-epsilon"] > 0 and metrics["dp-steps"] == 2

    stats = [(raw, noisy) for raw, noisy in releases if raw.size == 2 * cfg.data.num_classes]
    counts = [(raw, noisy) for raw, noisy in releases if raw.size == cfg.data.num_classes]
    assert len(stats) == 2 and len(counts) == 1, "FedMAS prior + state, class counts once"

    def factor(prior_release: np.ndarray, state_release: np.ndarray) -> float:
        prior, _ = class_means_from_release(prior_release, 4, REP_LOSS_BOUND)
        state, _ = class_means_from_release(state_release, 4, REP_LOSS_BOUND)
        return fedmas_robust_factor(prior, state, "mas")

    noised = factor(stats[0][1], stats[1][1])
    raw = factor(stats[0][0], stats[1][0])
    assert metrics["robust-factor"] == pytest.approx(noised, rel=1e-9)
    assert metrics["robust-factor"] != pytest.approx(raw, rel=1e-6)
    assert metrics["num-examples"] == max(1, int(round(counts[0][1].sum()))), "weight = total of the released counts"

    # the DP state (accountant history) persists: round 2 composes on round 1
    state = ClientStateStore(tmp_path, "run-13", 0).load()
    assert len(state.trainer["privacy"]["history"]) >= 2 and state.trainer["privacy"]["class_counts"] is not None
    reply2 = app(train_message(reply.content["arrays"], 2, ctx.node_id), ctx)
    assert reply2.content["metrics"]["dp-epsilon"] > metrics["dp-epsilon"]
    assert reply2.content["metrics"]["dp-steps"] == 4

    evaluate = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                       dst_node_id=ctx.node_id, message_type="evaluate")
    with pytest.raises(Exception, match="federated evaluation is disabled"):
        app(evaluate, ctx)


def test_withheld_statistics_send_sentinel_factor_and_uniform_weight(tmp_path: Path) -> None:
    cfg = tiny_config(federation={"strategy": "fedmas"}, privacy={"statistics": "withheld"})
    app = make_client_app(cfg, state_root=tmp_path)
    ctx = sim_context(1)
    metrics = app(train_message(global_arrays(cfg), 1, ctx.node_id), ctx).content["metrics"]
    assert metrics["robust-factor"] == 0.0 and metrics["num-examples"] == 1
    assert "class-counts" not in metrics and "train-loss" not in metrics
    strategy = FedMASStrategy(rule="mas", num_rounds=2)
    weights = strategy.client_weights(1, [MetricRecord({"num-examples": 1, "robust-factor": 0.0})] * 2)
    assert strategy.last_weight_mode == "fedavg-fallback" and list(weights) == [1.0, 1.0]


# --------------------------------------------------------------------------- federation (local DP)


def test_local_dp_federation_reports_epsilon_and_ends_when_budgets_are_spent(tmp_path: Path) -> None:
    """Sites 0/1 plan 2 rounds, site 2 one: round 2 goes on without site 2, round 3 nobody has budget -> clean end."""
    values = tiny_values(federation={"num_rounds": 4}, privacy={"planned_rounds": 2})
    cfg = config_from_dict(values)
    short = config_from_dict(tiny_values(federation={"num_rounds": 4}, privacy={"planned_rounds": 1}))
    state = tmp_path / "state"
    apps = {0: make_client_app(cfg, state_root=state), 1: make_client_app(cfg, state_root=state),
            2: make_client_app(short, state_root=state)}
    out = tmp_path / "run"
    metrics = run_federation(local_grid(apps), cfg, out)

    assert metrics["stopped_early"]["round"] == 3 and "dp budget exhausted" in metrics["stopped_early"]["reason"]
    assert json.loads((out / "metrics.json").read_text())["stopped_early"]["round"] == 3
    assert not (out / "aborted.json").exists()
    assert metrics["failed_replies"] == {} and metrics["rejected_replies"] == []
    assert metrics["per_site"] == {}, "federated evaluation is off in DP mode"
    rows = read_history(out)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    eps = {site: [float(rows[r][f"epsilon/{site}"]) for r in (1, 2, 3)] for site in ("site-0", "site-1", "site-2")}
    for site in ("site-0", "site-1"):
        assert 0 < eps[site][0] < eps[site][1] == eps[site][2] <= 8.0
    assert eps["site-2"][0] == eps["site-2"][1] == eps["site-2"][2] <= 8.0
    assert [int(rows[r]["clients_declined"]) for r in (1, 2, 3)] == [0, 1, 3]
    assert rows[2]["weight/site-2"] == "" and float(rows[2]["weight/site-0"]) > 0
    assert not any(key.startswith("site_bacc/") for key in rows[1])
    privacy = metrics["privacy"]
    assert metrics["dp_epsilon_max"] == pytest.approx(max(eps[s][-1] for s in eps))
    assert privacy["epsilon_per_site"]["site-0"] == pytest.approx(eps["site-0"][-1])
    assert set(privacy["budget_declines"]) == {"2", "3"} and "site-2" in privacy["budget_declines"]["2"]
    assert metrics["rounds_without_aggregation"] == [3]


# --------------------------------------------------------------------------- central DP


def test_central_dp_clips_each_update_and_leaves_integer_buffers_alone() -> None:
    strategy = ValidatedWeightedAvg()
    strategy.central_dp = CentralDP(clip_norm=1.0, noise_multiplier=1e-12, delta=1e-5, noise_seed=0, population=3)
    rng = np.random.default_rng(0)
    ref = {"w": rng.normal(size=(20,)).astype(np.float32), "b": np.zeros(3, np.float32),
           "steps": np.array(5, dtype=np.int64)}
    huge = {"w": ref["w"] + 1e4, "b": ref["b"] + 1e4, "steps": np.array(9, dtype=np.int64)}
    small = {"w": ref["w"].copy(), "b": ref["b"] + np.float32(0.1), "steps": np.array(10**6, dtype=np.int64)}
    same = {k: v.copy() for k, v in ref.items()}
    out = aggregate_one_round(strategy, ref, [huge, small, same], [50, 30, 20])
    delta = {k: out[k].astype(np.float64) - ref[k].astype(np.float64) for k in ("w", "b")}
    norms = list(strategy.central_dp.last_norms.values())
    assert norms[0] > 1e4 and norms[1] == pytest.approx(0.1 * math.sqrt(3), rel=1e-5) and norms[2] == 0.0
    # uniform public weights and the fixed W = q x N = 3 (num-examples 50/30/20 are not used): the huge update
    # enters with norm exactly C = 1, the small one unclipped; the integer buffer neither entered the norm nor was scaled
    direction = np.concatenate([np.full(20, 1e4), np.full(3, 1e4)])
    expected = (direction / np.linalg.norm(direction) + np.concatenate([np.zeros(20), np.full(3, 0.1)])) / 3
    got = np.concatenate([delta["w"], delta["b"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.linalg.norm(got) <= 1.0 + 1e-6
    assert out["steps"].dtype == np.int64 and int(out["steps"]) == 10**6, "integer buffers: base rule, no noise"
    assert strategy.central_dp.last_clipped == 1
    assert strategy.last_weights == {20: pytest.approx(1 / 3), 21: pytest.approx(1 / 3), 22: pytest.approx(1 / 3)}


def test_central_dp_noise_std_is_set_by_the_fixed_denominator_not_by_the_replies() -> None:
    sigma, clip, population = 2.0, 0.5, 4
    ref = {"w": np.zeros(200_000, np.float32)}
    for replies, counts in (([ref] * 3, [10, 30, 60]), ([ref], [1])):
        strategy = FedAvgStrategy()
        strategy.central_dp = CentralDP(clip_norm=clip, noise_multiplier=sigma, delta=1e-5, noise_seed=1,
                                        population=population)
        out = aggregate_one_round(strategy, ref, [{"w": r["w"].copy()} for r in replies], counts)
        expected_std = sigma * clip / population  # sigma x C / W, W = q N; not sigma x max(alpha) x C
        assert strategy.central_dp.sensitivity == pytest.approx(clip / population)
        assert strategy.central_dp.last_noise_std == pytest.approx(expected_std)
        assert float(np.std(out["w"])) == pytest.approx(expected_std, rel=0.02)
        assert strategy.central_dp.epsilon() == pytest.approx(central_epsilon(sigma, 1.0, 1, 1e-5))


def _noise_free_round(replies: list[dict[str, np.ndarray]], ref: dict[str, np.ndarray],
                      population: int) -> tuple[np.ndarray, float]:
    """One central-DP round of FedAvg with (practically) no noise; the update and the bound the noise is calibrated to."""
    strategy = FedAvgStrategy()
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1e-12, delta=1e-5, noise_seed=0, population=population)
    strategy.central_dp = dp
    out = aggregate_one_round(strategy, ref, replies, [10] * len(replies))
    # the old code had no ``sensitivity``: its noise was calibrated to max alpha x C
    bound = getattr(dp, "sensitivity", dp.last_noise_std / dp.noise_multiplier)
    return out["w"].astype(np.float64) - ref["w"], bound


def test_central_dp_aggregate_moves_at_most_its_sensitivity_on_neighbouring_rounds() -> None:
    """Neighbouring rounds through the strategy: a client removed, or replaced by an adversarial update."""
    ref = {"w": np.zeros(8, np.float32)}
    up = {"w": np.full(8, 5.0, np.float32)}  # clipped to norm 1 along +1
    adversary = {"w": np.full(8, -1e3, np.float32)}  # clipped to norm 1 along -1
    mild = {"w": np.full(8, 0.01, np.float32)}
    rounds = {"D": [up, up, mild, adversary], "removed": [up, up, mild], "replaced": [up, adversary, mild, adversary],
              "added": [up, up, mild, adversary, adversary]}
    agg = {name: _noise_free_round(replies, ref, population=4) for name, replies in rounds.items()}
    d, bound = agg["D"]
    tol = 1e-5 * bound  # the released arrays are float32
    assert np.linalg.norm(d - agg["removed"][0]) <= bound + tol
    assert np.linalg.norm(d - agg["added"][0]) <= bound + tol
    assert np.linalg.norm(d - agg["replaced"][0]) <= 2 * bound + tol  # replace-one = 2 x the add/remove sensitivity
    assert bound == pytest.approx(1.0 / 4)


class _Grid:
    """Just enough of a Grid for ``configure_train``: a fixed list of node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def test_central_dp_samples_clients_by_poisson_and_releases_rounds_without_clients() -> None:
    ref = {"w": np.zeros(50, np.float32)}
    arrays = ArrayRecord({"w": Array(ref["w"])})
    strategy = FedAvgStrategy(min_available_nodes=2, min_train_nodes=2)
    strategy.central_dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, noise_seed=3,
                                    population=20, sample_rate=0.3)
    grid = _Grid(list(range(100, 120)))
    sizes = [len(list(strategy.configure_train(r, arrays, ConfigRecord(), grid))) for r in range(1, 201)]
    assert len(set(sizes)) > 3, "Poisson sampling: the number of sampled clients varies (Flower samples exactly q N)"
    assert np.mean(sizes) == pytest.approx(0.3 * 20, rel=0.1)

    strategy = FedAvgStrategy(min_available_nodes=2, min_train_nodes=2)
    strategy.central_dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, noise_seed=3,
                                    population=3, sample_rate=0.05)
    grid = _Grid([100, 101, 102])
    for r in range(1, 50):
        if not list(strategy.configure_train(r, arrays, ConfigRecord(), grid)):
            break
    else:
        pytest.fail("no round without sampled clients at q = 0.05 over 3 nodes")
    released, _ = strategy.aggregate_train(r, [])
    assert released is not None, "a round with no client still releases the noised model"
    assert float(np.std(released["w"].numpy())) > 0.5 * strategy.central_dp.noise_std
    assert strategy.central_dp.rounds == 1 and strategy.central_dp.epsilon() > 0


def test_central_dp_logs_no_client_update_norm(caplog) -> None:
    strategy = FedAvgStrategy(max_update_norm=500.0)
    strategy.central_dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, noise_seed=0, population=2)
    ref = {"w": np.zeros(4, np.float32)}
    norm_one = 123.456789  # pre-clipping norm of one reply; another is rejected for a norm of 2469.1358
    replies = [{"w": np.full(4, norm_one / 2, np.float32)}, {"w": np.full(4, norm_one * 10, np.float32)}]
    with caplog.at_level(logging.DEBUG):
        aggregate_one_round(strategy, ref, replies, [1, 1])
    text = caplog.text + " ".join(r["reason"] for r in strategy.last_rejections)
    assert strategy.last_rejections and strategy.last_rejections[0]["check"] == "update-norm"
    assert "123.4" not in text and "2469" not in text, text


def test_central_dp_federation_records_central_epsilon(tmp_path: Path) -> None:
    """Poisson sampling (q = 0.3) through the whole server: rounds without a client still release and are accounted."""
    q = 0.3
    cfg = tiny_config(train={"method": "bsm"}, federation={"fraction_train": q, "num_rounds": 3},
                      privacy={"mode": "central", "target_epsilon": None, "central_noise_multiplier": 1.5,
                               "central_clip_norm": 0.5, "noise_seed": 1})
    out = tmp_path / "run"
    metrics = run_federation(local_grid({k: make_client_app(cfg, state_root=tmp_path / "s") for k in range(3)}), cfg, out)
    rows = read_history(out)
    eps = [float(r["central-epsilon"]) for r in rows]
    assert eps[0] == 0.0 and 0 < eps[1] < eps[2] < eps[3]
    assert eps[3] == pytest.approx(central_epsilon(1.5, q, 3, 1e-5))
    assert metrics["central_epsilon"] == pytest.approx(eps[3]) and metrics["privacy"]["central_rounds"] == 3
    taken_part = [int(r["clients_aggregated"]) for r in rows[1:]]
    assert 0 in taken_part and max(taken_part) > 0, f"seed 1 samples nobody in one round: {taken_part}"
    assert metrics["rounds_without_aggregation"] == [], "a round without clients still releases a noised model"
    n = cfg.federation.num_clients
    central = metrics["privacy"]["central"]
    assert central["sensitivity"] == pytest.approx(0.5 / (q * n))  # C / W with W = q N
    assert central["noise_std"] == pytest.approx(1.5 * 0.5 / (q * n)) == pytest.approx(float(rows[3]["central-noise-std"]))
    assert central["client_sampling"] == "poisson" and central["sample_rate"] == q
    assert central["epsilon"] == pytest.approx(eps[3]) and central["delta"] == 1e-5
    assert central["adjacency"] == "add-remove" and central["epsilon_replace_one"] == pytest.approx(2 * eps[3])
    assert central["epsilon_if_sample_known"] == pytest.approx(central_epsilon(1.5, 1.0, 3, 1e-5))
    assert central["epsilon_if_sample_known"] > eps[3]
    weights = [float(v) for r in rows[1:] for k, v in r.items() if k.startswith("weight/") and v != ""]
    assert weights and all(w == pytest.approx(1 / (q * n)) for w in weights), "uniform w_k / W"
    assert metrics["per_site"] == {} and not any(k.startswith("site_bacc/") for k in rows[1])
