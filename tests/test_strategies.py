"""Server strategies on hand-made replies, with hand-computed expected weights and arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fopro_kd.config import FederationConfig
from server.strategies import (
    STRATEGIES,
    ClassBalancedStrategy,
    FedAvgStrategy,
    FedMASStrategy,
    FedProxStrategy,
    ValidatedWeightedAvg,
    build_strategy,
    list_strategies,
)
from fopro_kd.federation.fedmas import fedmas_robust_factor
from server.strategies.class_balanced import effective_number_weights
from server.strategies.fedmas import drw_effective_weights

SERVER_NODE = 1


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run/task/node identity outside a Flower run (libraries.md §1.2)."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SERVER_NODE
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def global_arrays() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.zeros((2, 2), np.float32)),
            "bn.running_mean": Array(np.zeros(2, np.float32)),
            "bn.num_batches_tracked": Array(np.array(0, np.int64)),
        }
    )


def client_arrays(value: float, steps: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 2), value, np.float32),
        "bn.running_mean": np.array([value, 2 * value], np.float32),
        "bn.num_batches_tracked": np.array(steps, np.int64),
    }


def reply(node_id: int, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=instruction)


def error_reply(node_id: int) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    return Message(error=Error(code=0, reason="client crashed"), reply_to=instruction)


class FakeGrid:
    def __init__(self, nodes=(11, 12, 13)):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def prepared(strategy: ValidatedWeightedAvg) -> ValidatedWeightedAvg:
    strategy.set_reference(global_arrays())
    return strategy


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_strategy():
    assert list_strategies() == ["class_balanced", "fedavg", "fedmas", "fedprox", "median", "trimmed_mean"]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_build_strategy_from_config_aggregates(name):
    cfg = FederationConfig(strategy=name, num_rounds=4, min_available_clients=2)
    strategy = prepared(build_strategy(cfg))
    assert isinstance(strategy, STRATEGIES[name])
    assert strategy.min_available_nodes == 2
    metrics = {"num-examples": 10, "robust-factor": 0.5, "class-counts": [5, 5]}
    arrays, _ = strategy.aggregate_train(1, [reply(11, client_arrays(1.0, 3), metrics), reply(12, client_arrays(3.0, 5), metrics)])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)


def test_build_strategy_unknown_name_lists_options():
    cfg = FederationConfig()
    cfg.strategy = "MAS"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="fedavg"):
        build_strategy(cfg)


def test_build_strategy_passes_config_fields_and_overrides():
    cfg = FederationConfig(strategy="fedmas", fedmas_rule="mas_DRW", num_rounds=10, drw_beta=0.99)
    strategy = build_strategy(cfg, min_valid_replies=2)
    assert (strategy.rule, strategy.num_rounds, strategy.drw_beta, strategy.min_valid_replies) == ("mas_DRW", 10, 0.99, 2)
    assert build_strategy(FederationConfig(strategy="fedprox", fedprox_mu=0.2)).proximal_mu == 0.2
    assert build_strategy(FederationConfig(strategy="class_balanced", cb_beta=0.5)).cb_beta == 0.5
    assert ClassBalancedStrategy.needs_class_counts and not FedAvgStrategy.needs_class_counts


# --------------------------------------------------------------------------- FedAvg


def test_fedavg_weights_are_sample_fractions_with_exact_average():
    strategy = prepared(FedAvgStrategy())
    replies = [
        reply(11, client_arrays(1.0, 3), {"num-examples": 10, "train-loss": 1.0}),
        reply(12, client_arrays(2.0, 7), {"num-examples": 30, "train-loss": 2.0}),
        reply(13, client_arrays(4.0, 5), {"num-examples": 60, "train-loss": 4.0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy.last_weights == pytest.approx({11: 0.1, 12: 0.3, 13: 0.6})
    # 0.1*1 + 0.3*2 + 0.6*4 = 3.1
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 3.1), rtol=1e-6)
    np.testing.assert_allclose(arrays["bn.running_mean"].numpy(), [3.1, 6.2], rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(3.1)
    assert metrics["num-examples"] == 100
    assert strategy.last_rejections == []


def test_average_streams_one_decoded_reply_at_a_time():
    """The server folds each reply into the accumulator and releases it: peak = one reply, not N."""
    alive = {"now": 0, "peak": 0}

    class Tracked(dict):
        def __del__(self):
            alive["now"] -= 1

    def replies(n):
        for k in range(n):
            alive["now"] += 1
            alive["peak"] = max(alive["peak"], alive["now"])
            yield Tracked(w=np.full((2, 2), float(k), dtype=np.float32), steps=np.asarray(k, dtype=np.int64))

    alpha = np.full(6, 1 / 6)
    merged = FedAvgStrategy._average(replies(6), alpha)
    np.testing.assert_allclose(merged["w"].numpy(), np.full((2, 2), 2.5), rtol=1e-6)
    assert merged["w"].numpy().dtype == np.float32
    assert merged["steps"].numpy().shape == () and int(merged["steps"].numpy()) == 5
    assert alive["peak"] == 1 and alive["now"] == 0
    with pytest.raises(ValueError, match="6 weights for 2 replies"):
        FedAvgStrategy._average(replies(2), alpha)


def test_integer_buffer_keeps_dtype_and_takes_max_float32_stays_float32():
    strategy = prepared(FedAvgStrategy())
    replies = [reply(11, client_arrays(1.0, 3), {"num-examples": 1}), reply(12, client_arrays(2.0, 7), {"num-examples": 1})]
    arrays, _ = strategy.aggregate_train(1, replies)
    steps = arrays["bn.num_batches_tracked"].numpy()
    assert steps.dtype == np.int64 and steps.shape == () and int(steps) == 7
    assert arrays["w"].numpy().dtype == np.float32
    assert arrays["bn.running_mean"].numpy().dtype == np.float32
    assert list(arrays.keys()) == ["w", "bn.running_mean", "bn.num_batches_tracked"]


def test_train_metrics_skip_lists_and_keys_not_common_to_all():
    strategy = prepared(FedAvgStrategy())
    replies = [
        reply(11, client_arrays(1.0, 1), {"num-examples": 1, "loss": 1.0, "only-here": 3.0, "per-class": [1.0, 2.0]}),
        reply(12, client_arrays(1.0, 1), {"num-examples": 3, "loss": 5.0, "per-class": [1.0, 2.0]}),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert dict(metrics) == {"loss": pytest.approx(4.0), "num-examples": 4}


def test_all_zero_weights_fall_back_to_uniform():
    strategy = prepared(FedAvgStrategy())
    replies = [reply(11, client_arrays(1.0, 1), {"num-examples": 0}), reply(12, client_arrays(3.0, 1), {"num-examples": 0})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_weights == {11: 0.5, 12: 0.5}
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)


# --------------------------------------------------------------------------- validation in aggregation


def test_invalid_replies_are_rejected_and_the_rest_aggregated(caplog):
    strategy = prepared(FedAvgStrategy())
    good = {"num-examples": 10}
    nan_arrays = client_arrays(1.0, 1)
    nan_arrays["w"][0, 0] = np.nan
    bad_shape = client_arrays(1.0, 1)
    bad_shape["w"] = np.zeros((3, 2), np.float32)
    half = client_arrays(1.0, 1)
    half["w"] = half["w"].astype(np.float16)
    extra = client_arrays(1.0, 1)
    extra["extra"] = np.zeros(1, np.float32)
    replies = [
        reply(11, client_arrays(1.0, 2), good),
        reply(12, client_arrays(3.0, 4), {"num-examples": 30}),
        reply(21, nan_arrays, good),
        reply(22, bad_shape, good),
        reply(23, half, good),
        reply(24, extra, good),
        reply(25, client_arrays(1.0, 1), {"num-examples": 10, "train-loss": float("nan")}),
        reply(26, client_arrays(1.0, 1), {"num-examples": -1}),
        error_reply(27),
    ]
    arrays, _ = strategy.aggregate_train(2, replies)
    checks = {r["node_id"]: r["check"] for r in strategy.last_rejections}
    assert checks == {21: "finite", 22: "shape", 23: "dtype", 24: "names", 25: "metrics", 26: "metrics", 27: "error"}
    assert all(r["round"] == 2 for r in strategy.last_rejections)
    assert strategy.last_weights == pytest.approx({11: 0.25, 12: 0.75})
    np.testing.assert_allclose(arrays["w"].numpy(), 2.5)
    assert int(arrays["bn.num_batches_tracked"].numpy()) == 4
    assert "node 22" in caplog.text and "shape" in caplog.text


def test_all_replies_invalid_keeps_previous_model():
    strategy = prepared(FedAvgStrategy())
    nan_arrays = client_arrays(1.0, 1)
    nan_arrays["w"][:] = np.inf
    assert strategy.aggregate_train(1, [reply(11, nan_arrays, {"num-examples": 3}), error_reply(12)]) == (None, None)
    assert strategy.last_weights == {}
    assert len(strategy.last_rejections) == 2


def test_error_replies_are_skipped():
    strategy = prepared(FedAvgStrategy())
    arrays, _ = strategy.aggregate_train(1, [error_reply(12), reply(11, client_arrays(2.0, 1), {"num-examples": 5})])
    assert strategy.last_weights == {11: 1.0}
    assert strategy.last_rejections[0]["node_id"] == 12 and strategy.last_rejections[0]["check"] == "error"
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)


def test_min_valid_replies_not_reached_returns_none():
    strategy = prepared(FedAvgStrategy(min_valid_replies=2))
    assert strategy.aggregate_train(1, [reply(11, client_arrays(2.0, 1), {"num-examples": 5})]) == (None, None)


def test_max_update_norm_rejects_large_updates():
    strategy = prepared(FedAvgStrategy(max_update_norm=5.0))
    # update norm: w 4 entries of v, running_mean [v, 2v] -> sqrt(4v^2 + 5v^2) = 3|v|
    replies = [reply(11, client_arrays(1.0, 1), {"num-examples": 1}), reply(12, client_arrays(2.0, 1), {"num-examples": 1})]
    strategy.aggregate_train(1, replies)
    assert strategy.last_weights == {11: 1.0}
    assert strategy.last_rejections[0]["check"] == "update-norm"


def test_configure_train_records_reference_for_validation():
    strategy = FedAvgStrategy(min_train_nodes=2, min_available_nodes=2)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))
    assert len(messages) == 3
    bad = client_arrays(1.0, 1)
    bad["w"] = np.zeros((1, 4), np.float32)
    strategy.aggregate_train(1, [reply(11, bad, {"num-examples": 1}), reply(12, client_arrays(1.0, 1), {"num-examples": 1})])
    assert [r["check"] for r in strategy.last_rejections] == ["shape"]


def test_aggregate_evaluate_tolerates_errors_and_different_keys():
    strategy = FedAvgStrategy()
    instr = Message(RecordDict(), dst_node_id=11, message_type="evaluate")
    a = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "accuracy": 0.5, "x": 1.0})}), reply_to=instr)
    instr2 = Message(RecordDict(), dst_node_id=12, message_type="evaluate")
    b = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "accuracy": 1.0})}), reply_to=instr2)
    c = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "accuracy": 1.5})}), reply_to=instr2)
    metrics = strategy.aggregate_evaluate(1, [a, b, c, error_reply(13)])
    assert dict(metrics) == {"accuracy": pytest.approx(0.875), "num-examples": 4}
    assert strategy.aggregate_evaluate(1, [error_reply(13)]) is None


# --------------------------------------------------------------------------- FedProx


def test_fedprox_adds_proximal_mu_and_aggregates_like_fedavg():
    strategy = FedProxStrategy(proximal_mu=0.45, min_available_nodes=2)
    messages = list(strategy.configure_train(3, global_arrays(), ConfigRecord({"lr": 0.1}), FakeGrid()))
    for msg in messages:
        assert msg.content["config"]["proximal-mu"] == 0.45
        assert msg.content["config"]["lr"] == 0.1
        assert msg.content["config"]["server-round"] == 3
    replies = [reply(11, client_arrays(1.0, 1), {"num-examples": 1}), reply(12, client_arrays(4.0, 1), {"num-examples": 2})]
    arrays, _ = strategy.aggregate_train(3, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 3.0)


def test_fedprox_rejects_negative_mu():
    with pytest.raises(ValueError, match="proximal_mu"):
        FedProxStrategy(proximal_mu=-1.0)


# --------------------------------------------------------------------------- FedMAS


def mas_replies(rhos, sizes):
    return [
        reply(11 + i, client_arrays(float(i + 1), 1), {"num-examples": m, "robust-factor": rho})
        for i, (rho, m) in enumerate(zip(rhos, sizes))
    ]


@pytest.mark.parametrize("rule", ["mas", "mas_inv"])
def test_fedmas_mas_weights_are_rho_fractions(rule):
    strategy = prepared(FedMASStrategy(rule=rule, num_rounds=10))
    arrays, _ = strategy.aggregate_train(1, mas_replies([0.2, 0.6], [100, 1]))
    assert strategy.last_weights == pytest.approx({11: 0.25, 12: 0.75})
    # 0.25*1 + 0.75*2
    np.testing.assert_allclose(arrays["w"].numpy(), 1.75)
    assert strategy.last_weight_mode == rule


def test_fedmas_configure_train_sends_rule():
    strategy = FedMASStrategy(rule="mas_inv", num_rounds=3, min_available_nodes=2)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), FakeGrid()))
    assert {m.content["config"]["fedmas-rule"] for m in messages} == {"mas_inv"}


def test_fedmas_drw_switches_exactly_at_floor_of_08R():
    rhos, sizes = [0.5, 0.25], [10, 30]
    strategy = prepared(FedMASStrategy(rule="mas_DRW", num_rounds=10, drw_fraction=0.8, drw_beta=0.9999))
    assert strategy.drw_switch == 8
    # server_round 8 -> r = 7 < 8: FedAvg weights
    strategy.aggregate_train(8, mas_replies(rhos, sizes))
    assert strategy.last_weights == pytest.approx({11: 0.25, 12: 0.75})
    assert strategy.last_weight_mode == "fedavg"
    # server_round 9 -> r = 8: DRW weights. 1/rho = [2, 4] -> v = [1/3, 2/3]
    strategy.aggregate_train(9, mas_replies(rhos, sizes))
    beta = 0.9999
    e = np.array([(1 - beta) / (1 - beta ** (1 / 3)), (1 - beta) / (1 - beta ** (2 / 3))])
    e = e * 2 / e.sum()
    expected = np.array([10, 30]) * e / np.sum(np.array([10, 30]) * e)
    assert strategy.last_weight_mode == "mas_DRW"
    assert [strategy.last_weights[11], strategy.last_weights[12]] == pytest.approx(expected.tolist(), rel=1e-9)
    # e ≈ 1/v for beta -> 1: e ≈ [3, 1.5] -> [4/3, 2/3]; alpha ≈ [40/3, 20] / (100/3) = [0.4, 0.6]
    assert expected == pytest.approx([0.4, 0.6], abs=1e-4)


def test_drw_effective_weights_beta_zero_is_fedavg():
    np.testing.assert_allclose(drw_effective_weights(np.array([0.1, 0.9]), np.array([1.0, 3.0]), 0.0), [0.25, 0.75])


@pytest.mark.parametrize("bad_rho", [0.0, float("nan"), -1.0, None])
def test_fedmas_invalid_rho_falls_back_to_fedavg(bad_rho):
    strategy = prepared(FedMASStrategy(rule="mas", num_rounds=5))
    replies = mas_replies([0.5, 0.5], [10, 30])
    metrics = {"num-examples": 10} if bad_rho is None else {"num-examples": 10, "robust-factor": bad_rho}
    replies[0] = reply(11, client_arrays(1.0, 1), metrics)
    arrays, _ = strategy.aggregate_train(1, replies)
    if bad_rho is not None and not math.isfinite(bad_rho):
        # a NaN metric fails validation: that reply is rejected, the other aggregated alone
        assert strategy.last_weights == {12: 1.0}
    else:
        assert strategy.last_weight_mode == "fedavg-fallback"
        assert strategy.last_weights == pytest.approx({11: 0.25, 12: 0.75})
    assert arrays is not None


def test_fedmas_rule_is_validated():
    with pytest.raises(ValueError, match="mas_inv"):
        FedMASStrategy(rule="MAS", num_rounds=3)


def test_fedmas_robust_factor_golden_values():
    prior = np.array([1.0, 2.0, 0.0, 1.0])
    state = np.array([2.0, 1.0, 5.0, 1.0])
    # S = {0, 1, 3}; p = [.25, .5, .25]; s = [2, 1, 1]/4 -> .125 + .125 + .0625
    assert fedmas_robust_factor(prior, state, "mas") == pytest.approx(0.3125)
    assert fedmas_robust_factor(prior, state, "mas_DRW") == pytest.approx(0.3125)
    # 1/s = [.5, 1, 1] / 2.5 = [.2, .4, .4] -> .05 + .2 + .1
    assert fedmas_robust_factor(prior, state, "mas_inv") == pytest.approx(0.35)


def test_fedmas_robust_factor_zero_guards():
    prior = np.array([1.0, 2.0, 0.0, 1.0])
    state = np.array([0.0, 1.0, 5.0, 1.0])
    # mas: s = [0, 1, 1]/2 -> 0 + .25 + .125
    assert fedmas_robust_factor(prior, state, "mas") == pytest.approx(0.375)
    # mas_inv: class 0 (s = 0) has no inverse -> S = {1, 3}: p = [2/3, 1/3], 1/s = [.5, .5]
    assert fedmas_robust_factor(prior, state, "mas_inv") == pytest.approx(0.5)
    # NaN prior (class without samples) is outside S
    assert fedmas_robust_factor(np.array([np.nan, 1.0]), np.array([3.0, 2.0]), "mas") == pytest.approx(1.0)
    assert fedmas_robust_factor(np.zeros(3), np.ones(3), "mas") == 0.0
    assert fedmas_robust_factor(np.ones(2), np.zeros(2), "mas_inv") == 0.0
    with pytest.raises(ValueError, match="same length"):
        fedmas_robust_factor(np.ones(2), np.ones(3), "mas")
    with pytest.raises(ValueError, match="valid rules"):
        fedmas_robust_factor(np.ones(2), np.ones(2), "avg")


# --------------------------------------------------------------------------- class-balanced


def test_class_balanced_weights_golden_values():
    strategy = prepared(ClassBalancedStrategy(cb_beta=0.5))
    replies = [
        reply(11, client_arrays(0.0, 1), {"num-examples": 3, "class-counts": [3, 0]}),
        reply(12, client_arrays(13.0, 1), {"num-examples": 3, "class-counts": [1, 2]}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    # N = [4, 2]; w ∝ [0.5/(15/16), 0.5/(3/4)] = [8/15, 2/3]; u = [8/5, 28/15] -> [6/13, 7/13]
    assert strategy.last_weights == pytest.approx({11: 6 / 13, 12: 7 / 13})
    np.testing.assert_allclose(arrays["w"].numpy(), 7.0, rtol=1e-6)
    np.testing.assert_allclose(strategy.last_class_weights, [8 / 9, 10 / 9])


def test_effective_number_weights_limits():
    np.testing.assert_allclose(effective_number_weights(np.array([5, 0, 2]), 0.0), [1.0, 0.0, 1.0])
    # beta -> 1: w ∝ 1/N
    w = effective_number_weights(np.array([100, 10]), 1 - 1e-9)
    assert w[1] / w[0] == pytest.approx(10.0, rel=1e-5)


def test_class_balanced_missing_counts_fall_back_to_num_examples(caplog):
    strategy = prepared(ClassBalancedStrategy(cb_beta=0.9))
    replies = [
        reply(11, client_arrays(1.0, 1), {"num-examples": 1, "class-counts": [1, 0]}),
        reply(12, client_arrays(1.0, 1), {"num-examples": 3, "class-counts": [1, 0, 2]}),
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.last_weights == pytest.approx({11: 0.25, 12: 0.75})
    assert "lengths differ" in caplog.text
    replies = [reply(11, client_arrays(1.0, 1), {"num-examples": 1}), reply(12, client_arrays(1.0, 1), {"num-examples": 1})]
    strategy.aggregate_train(1, replies)
    assert strategy.last_weights == pytest.approx({11: 0.5, 12: 0.5})


# --------------------------------------------------------------------------- end to end


def test_torch_batchnorm_state_dict_round_trip():
    import torch

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
        net.train()
        for _ in range(seed + 1):  # seed + 1 forward passes -> num_batches_tracked = seed + 1
            net(torch.randn(4, 1, 5, 5))
        return net

    global_net = model(0)
    strategy = FedAvgStrategy()
    strategy.set_reference(ArrayRecord(global_net.state_dict()))
    nets = [model(1), model(2)]
    replies = []
    for node, net in zip((11, 12), nets):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"num-examples": 8})})
        replies.append(Message(content=content, reply_to=instruction))
    arrays, _ = strategy.aggregate_train(1, replies)
    state = arrays.to_torch_state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64 and int(state["1.num_batches_tracked"]) == 3
    expected = (nets[0].state_dict()["1.running_var"] + nets[1].state_dict()["1.running_var"]) / 2
    torch.testing.assert_close(state["1.running_var"], expected)
    global_net.load_state_dict(state)


class LoopGrid(FakeGrid):
    """Answers train/evaluate instructions like two clients; node 12 sends NaN in round 2."""

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            rnd = int(msg.content["config"]["server-round"])
            if msg.metadata.message_type.startswith("train"):
                arrays = {k: v.numpy() + (1.0 if v.numpy().dtype.kind == "f" else 1) for k, v in msg.content["arrays"].items()}
                if node == 12 and rnd == 2:
                    arrays["w"] = arrays["w"] * np.nan
                content = RecordDict(
                    {"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                     "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0})}
                )
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 5, "accuracy": 0.5})})
            out.append(Message(content=content, reply_to=msg))
        return out


def test_strategy_runs_in_flower_start_loop():
    strategy = FedAvgStrategy(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    result = strategy.start(grid=LoopGrid(nodes=(11, 12)), initial_arrays=global_arrays(), num_rounds=3)
    # every round adds 1; round 2 aggregates node 11 alone
    np.testing.assert_allclose(result.arrays["w"].numpy(), 3.0)
    assert int(result.arrays["bn.num_batches_tracked"].numpy()) == 3
    assert result.evaluate_metrics_clientapp[3]["accuracy"] == pytest.approx(0.5)
    assert result.train_metrics_clientapp[2]["num-examples"] == 10


# --------------------------------------------------------------------------- compressed transfer


@pytest.mark.parametrize("dtype, wire, tol", [("float16", np.float16, 1e-3), ("bfloat16", np.int16, 1e-2)])
def test_compressed_transfer_sends_half_precision_and_keeps_float32_master_weights(dtype, wire, tol):
    strategy = FedAvgStrategy(transfer_dtype=dtype)
    start = ArrayRecord({"w": Array(np.full((2, 2), 0.1, np.float32)),
                         "bn.running_mean": Array(np.zeros(2, np.float32)),
                         "bn.num_batches_tracked": Array(np.array(0, np.int64))})
    messages = list(strategy.configure_train(1, start, ConfigRecord(), FakeGrid()))
    sent = messages[0].content.array_records["arrays"]
    assert sent["w"].numpy().dtype == wire and sent["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert sent.count_bytes() < start.count_bytes()
    evaluate = list(strategy.configure_evaluate(1, start, ConfigRecord(), FakeGrid()))
    assert evaluate[0].content.array_records["arrays"]["w"].numpy().dtype == wire

    def compressed(value: float, steps: int) -> dict[str, np.ndarray]:
        full = client_arrays(value, steps)
        if wire == np.float16:
            return {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in full.items()}
        import torch

        from fopro_kd.compression import encode_for_transfer

        return {k: v.numpy() for k, v in encode_for_transfer({k: torch.from_numpy(v) for k, v in full.items()}, dtype).items()}

    arrays, _ = strategy.aggregate_train(1, [reply(11, compressed(1.0, 3), {"num-examples": 1}),
                                             reply(12, compressed(3.0, 5), {"num-examples": 3})])
    assert strategy.last_rejections == []
    assert arrays["w"].numpy().dtype == np.float32  # the master weights stay float32
    np.testing.assert_allclose(arrays["w"].numpy(), 2.5, rtol=tol)
    assert int(arrays["bn.num_batches_tracked"].numpy()) == 5


def test_compressed_transfer_rejects_a_reply_in_another_dtype():
    strategy = prepared(FedAvgStrategy(transfer_dtype="float16"))
    odd = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in client_arrays(1.0, 1).items()}
    strategy.aggregate_train(1, [reply(11, odd, {"num-examples": 1}), reply(12, client_arrays(1.0, 1), {"num-examples": 1})])
    assert [r["check"] for r in strategy.last_rejections] == ["dtype"]
    with pytest.raises(ValueError, match="transfer_dtype"):
        FedAvgStrategy(transfer_dtype="int8")


# --------------------------------------------------------------------------- central DP: which weights are allowed


@pytest.mark.parametrize("name", ["fedmas", "class_balanced"])
def test_central_dp_refuses_strategies_whose_weights_come_from_private_statistics(name):
    """FedMAS ρ_k / Σ ρ_j and class-balanced weights normalise private statistics across clients: refused."""
    from fopro_kd.config import ConfigError, config_from_dict
    from server.server_app import check_federation_config
    from server.strategies.central_dp import CentralDP
    from simulations.tiny_federation import tiny_federation_values

    cfg = config_from_dict(tiny_federation_values(federation={"strategy": name}, privacy={"mode": "central"}))
    with pytest.raises(ConfigError, match=rf"'federation.strategy: {name}' cannot run with 'privacy.mode: central'"):
        check_federation_config(cfg)
    strategy = build_strategy(cfg.federation)
    with pytest.raises(ConfigError, match=name):
        strategy.central_dp = CentralDP(1.0, 1.0, 1e-5, population=3)
    assert strategy.central_dp is None


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_central_dp_accepts_fedavg_and_fedprox_with_uniform_public_weights(name):
    from fopro_kd.config import ConfigError, config_from_dict
    from server.server_app import check_federation_config
    from server.strategies.central_dp import CentralDP
    from simulations.tiny_federation import tiny_federation_values

    values = tiny_federation_values(federation={"strategy": name}, privacy={"mode": "central"})
    check_federation_config(config_from_dict(values))
    values["federation"]["fraction_train"] = 0.0  # q = 0 would never sample anyone
    with pytest.raises(ConfigError, match="fraction_train"):
        check_federation_config(config_from_dict(values))
    strategy = STRATEGIES[name]()
    strategy.central_dp = CentralDP(1.0, 1.0, 1e-5, noise_seed=0, population=2)
    strategy.set_reference(global_arrays())
    replies = [reply(10, client_arrays(0.1, 3), {"num-examples": 10}),
               reply(11, client_arrays(0.2, 5), {"num-examples": 990})]
    strategy.aggregate_train(1, replies)
    assert strategy.last_weights == {10: pytest.approx(0.5), 11: pytest.approx(0.5)}, "num-examples are not used"
