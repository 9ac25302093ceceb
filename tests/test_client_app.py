"""ClientApp handlers on hand-built Messages: replies, plain-typed metrics, state across rounds, faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import client_app as client_module
from client.client_app import SiteSkipped, loss_metric_keys, make_client_app, shares_class_counts
from fopro_kd.federation.sites import SiteData, SiteDataError, config_from_run_config, site_spec_from_node_config
from client.state import ClientStateStore
from fopro_kd.config import Config, ConfigError, apply_overrides
from fopro_kd.data.synthetic import make_synthetic_imageset
from fopro_kd.federation.evaluation import build_global_student

from fopro_kd.compression import encode_for_transfer  # noqa: E402
from federation_helpers import NUM_SITES, fake_task_identity, preserved_torch_threads  # noqa: E402
from federation_helpers import tiny_config as shared_tiny_config  # noqa: E402


def tiny_config(**sections: dict[str, Any]) -> Config:
    """The shared tiny federation, with the discriminative prompt mode made explicit."""
    akd = {"mode": "discriminative", **sections.pop("akd", {})}
    return shared_tiny_config(akd=akd, **sections)


@pytest.fixture(autouse=True)
def _run_identity():
    with fake_task_identity(run_id=7, node_id=1), preserved_torch_threads():
        yield


def global_arrays(cfg: Config) -> ArrayRecord:
    student = build_global_student(cfg, cfg.data.num_classes, seed=cfg.seed)
    return ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()})


def context(node_id: int, node_config: dict[str, Any]) -> Context:
    return Context(run_id=7, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def sim_context(partition: int) -> Context:
    return context(100 + partition, {"partition-id": partition, "num-partitions": NUM_SITES})


def train_message(arrays: ArrayRecord, server_round: int, node_id: int, **config: Any) -> Message:
    record = ConfigRecord({"server-round": server_round, **config})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=node_id, message_type="train")


def evaluate_message(arrays: ArrayRecord, node_id: int) -> Message:
    record = ConfigRecord({"server-round": 1})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=node_id, message_type="evaluate")


def assert_plain(metrics: MetricRecord) -> None:
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        assert all(type(v) in (int, float) for v in values), f"{key} = {value!r} is not a plain int/float"


def test_train_reply_carries_student_only_with_plain_metrics(tmp_path: Path) -> None:
    cfg = tiny_config()
    app = make_client_app(cfg, state_root=tmp_path)
    arrays = global_arrays(cfg)
    ctx = sim_context(0)
    reply = app(train_message(arrays, 1, ctx.node_id), ctx)
    assert not reply.has_error()
    out = reply.content["arrays"]
    assert list(out.keys()) == list(arrays.keys()), "the reply must hold the student state_dict only"
    assert not any(k.startswith(("teacher", "prompt", "probe")) for k in out.keys())
    assert {k: out[k].numpy().dtype for k in out.keys()} == {k: arrays[k].numpy().dtype for k in arrays.keys()}
    metrics = reply.content["metrics"]
    assert_plain(metrics)
    assert metrics["num-examples"] > 0 and metrics["num-steps"] == 2 and metrics["site-id"] == 0
    assert metrics["train-seconds"] > 0
    assert "class-counts" not in metrics, "fedavg must not share class counts by default"
    assert "robust-factor" not in metrics


def test_metric_keys_identical_across_sites(tmp_path: Path) -> None:
    cfg = tiny_config()
    app = make_client_app(cfg, state_root=tmp_path)
    arrays = global_arrays(cfg)
    keys = []
    for site in range(NUM_SITES):
        ctx = sim_context(site)
        keys.append(sorted(app(train_message(arrays, 1, ctx.node_id), ctx).content["metrics"].keys()))
    assert keys[0] == keys[1] == keys[2]
    assert {"loss-cls", "loss-aux", "loss-rep", "prompt-probe-loss", "prompt-reg"} <= set(keys[0])


def test_round_two_restores_round_one_state(tmp_path: Path) -> None:
    cfg = tiny_config()
    app = make_client_app(cfg, state_root=tmp_path)
    arrays = global_arrays(cfg)
    ctx = sim_context(1)
    app(train_message(arrays, 1, ctx.node_id), ctx)
    store = ClientStateStore(tmp_path, f"run-{ctx.run_id}", 1)
    after_one = store.load()
    steps_one = int(after_one.trainer["optimizer"]["state"][0]["step"])
    prompt_one = {k: v.clone() for k, v in after_one.trainer["prompt"].items()}
    assert steps_one == 2

    app(train_message(arrays, 2, ctx.node_id), ctx)
    after_two = store.load()
    assert int(after_two.trainer["optimizer"]["state"][0]["step"]) == 4, "Adam's step count was not restored"
    assert after_two.rounds_trained == 2 and after_two.last_round == 2
    assert after_two.trainer["epochs_done"] > after_one.trainer["epochs_done"]
    assert any(not torch.equal(prompt_one[k], v) for k, v in after_two.trainer["prompt"].items()), (
        "the prompt must keep training from its round-1 value"
    )
    np.testing.assert_array_equal(after_two.class_counts, after_one.class_counts)
    record = ctx.state["fopro-kd-client"]
    assert record["rounds-trained"] == 2 and record["last-round"] == 2


def test_state_survives_a_fresh_process_like_context(tmp_path: Path) -> None:
    """Deployment: every message gets a fresh process and possibly an empty context.state."""
    cfg = tiny_config()
    app = make_client_app(cfg, state_root=tmp_path)
    arrays = global_arrays(cfg)
    app(train_message(arrays, 1, 100), sim_context(0))
    fresh = sim_context(0)  # new Context, empty state
    app(train_message(arrays, 2, 100), fresh)
    assert fresh.state["fopro-kd-client"]["rounds-trained"] == 2


def test_fedmas_reply_carries_robust_factor(tmp_path: Path) -> None:
    cfg = tiny_config(federation={"strategy": "fedmas"})
    app = make_client_app(cfg, state_root=tmp_path)
    ctx = sim_context(0)
    metrics = app(train_message(global_arrays(cfg), 1, ctx.node_id, **{"fedmas-rule": "mas_inv"}), ctx).content["metrics"]
    assert isinstance(metrics["robust-factor"], float)
    assert 0.0 < metrics["robust-factor"] <= 1.0


def test_class_counts_shared_only_when_switched_on(tmp_path: Path) -> None:
    arrays = None
    for strategy, share, expected in (("class_balanced", None, True), ("fedavg", True, True), ("fedavg", None, False)):
        cfg = tiny_config(federation={"strategy": strategy, "share_class_counts": share})
        assert shares_class_counts(cfg) is expected
        arrays = arrays or global_arrays(cfg)
        ctx = sim_context(2)
        metrics = make_client_app(cfg, state_root=tmp_path / strategy)(train_message(arrays, 1, ctx.node_id), ctx)
        metrics = metrics.content["metrics"]
        assert ("class-counts" in metrics) is expected
        if expected:
            counts = metrics["class-counts"]
            assert len(counts) == 4 and all(type(c) is int for c in counts)
            assert sum(counts) == metrics["num-examples"]


def test_fedprox_mu_reaches_the_trainer(tmp_path: Path) -> None:
    cfg = tiny_config(federation={"strategy": "fedprox"})
    assert "loss_prox" in loss_metric_keys(cfg)
    ctx = sim_context(0)
    reply = make_client_app(cfg, state_root=tmp_path)(train_message(global_arrays(cfg), 1, ctx.node_id,
                                                                     **{"proximal-mu": 0.5}), ctx)
    assert reply.content["metrics"]["loss-prox"] > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compressed_transfer_both_ways(dtype: str, tmp_path: Path) -> None:
    """A compressed global model trains and evaluates; the reply goes back compressed, integers exact."""
    cfg = tiny_config(federation={"transfer_dtype": dtype})
    full = global_arrays(cfg)
    sent = ArrayRecord(encode_for_transfer(full.to_torch_state_dict(), dtype))
    ctx = sim_context(0)
    app = make_client_app(cfg, state_root=tmp_path)
    reply = app(train_message(sent, 1, ctx.node_id), ctx)
    assert not reply.has_error(), reply.error
    out = reply.content["arrays"]
    wire = np.float16 if dtype == "float16" else np.int16
    for key in full.keys():
        reference = full[key].numpy()
        expected = wire if np.issubdtype(reference.dtype, np.floating) else reference.dtype
        assert out[key].numpy().dtype == expected, key
    assert out.count_bytes() < 0.6 * full.count_bytes()
    evaluated = app(evaluate_message(sent, ctx.node_id), ctx)
    assert not evaluated.has_error(), evaluated.error
    assert sum(evaluated.content["metrics"]["total-counts"]) > 0


def test_evaluate_reply_has_per_class_counts(tmp_path: Path) -> None:
    cfg = tiny_config()
    ctx = sim_context(1)
    reply = make_client_app(cfg, state_root=tmp_path)(evaluate_message(global_arrays(cfg), ctx.node_id), ctx)
    metrics = reply.content["metrics"]
    assert_plain(metrics)
    assert len(metrics["correct-counts"]) == len(metrics["total-counts"]) == 4
    assert sum(metrics["total-counts"]) == metrics["num-examples"] > 0
    assert all(0 <= c <= t for c, t in zip(metrics["correct-counts"], metrics["total-counts"]))
    assert metrics["site-id"] == 1


def _site_with(labels: list[int], cfg: Config) -> SiteData:
    counts = np.bincount(labels, minlength=cfg.data.num_classes).tolist()
    data = make_synthetic_imageset(counts, cfg.data.image_size, seed=3)
    return SiteData(site_id=0, train=data, local_test=data)


def test_empty_partition_is_skipped_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()
    monkeypatch.setattr(client_module, "load_site_data", lambda cfg, spec: _site_with([], cfg))
    ctx = sim_context(0)
    with pytest.raises(SiteSkipped, match=r"site-0.*no training images"):
        make_client_app(cfg, state_root=tmp_path)(train_message(global_arrays(cfg), 1, ctx.node_id), ctx)


def test_single_class_site_still_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config()
    monkeypatch.setattr(client_module, "load_site_data", lambda cfg, spec: _site_with([2] * 10, cfg))
    ctx = sim_context(0)
    reply = make_client_app(cfg, state_root=tmp_path)(train_message(global_arrays(cfg), 1, ctx.node_id), ctx)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 10
    assert np.isfinite(metrics["train-loss"])


def test_missing_data_root_names_the_node(tmp_path: Path) -> None:
    cfg = tiny_config()
    ctx = context(42, {"site-id": 5, "data-root": str(tmp_path / "nope")})
    with pytest.raises(SiteDataError, match=r"node 42 \(site-5\).*data-root|node 42 \(site-5\).*does not exist"):
        make_client_app(cfg, state_root=tmp_path)(train_message(global_arrays(cfg), 1, 42), ctx)


def test_node_config_without_site_is_refused() -> None:
    with pytest.raises(SiteDataError, match="site-id"):
        site_spec_from_node_config({}, node_id=3)
    with pytest.raises(SiteDataError, match="partition-id"):
        site_spec_from_node_config({"partition-id": 4, "num-partitions": 3}, node_id=3)


def test_handler_failure_names_the_node(tmp_path: Path) -> None:
    cfg = tiny_config()
    ctx = sim_context(0)
    bad = ArrayRecord({"nonsense": torch.zeros(2)})
    with pytest.raises(RuntimeError, match=r"node 100 \(site-0\)"):
        make_client_app(cfg, state_root=tmp_path)(train_message(bad, 1, ctx.node_id), ctx)


def test_config_from_run_config(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(apply_overrides({}, ["data.image_size=32"])))
    cfg = config_from_run_config({"config-file": str(path), "overrides": "federation.num_rounds=3 train.lr=0.001"})
    assert cfg.data.image_size == 32 and cfg.federation.num_rounds == 3 and cfg.train.lr == 0.001
    with pytest.raises(ConfigError, match="config-file"):
        config_from_run_config({"config-file": ""})
    with pytest.raises(ConfigError, match="relative"):
        config_from_run_config({"config-file": "configs/no-such-file.yaml"})
    shipped = config_from_run_config({"config-file": "configs/sim-demo.yaml"})  # resolved inside the app
    assert shipped.federation.num_clients == 4


def test_a_bad_teacher_fails_before_the_site_data_is_read(tmp_path: Path) -> None:
    """Deployment: a missing teacher file is the error, not the (also missing) data folder read after it."""
    cfg = tiny_config(teacher={"arch": "test_resnet", "source": "file", "file": str(tmp_path / "no-teacher.pth"),
                               "input_size": 32})
    ctx = context(5, {"site-id": 0, "data-root": str(tmp_path / "no-images")})
    msg = train_message(global_arrays(tiny_config()), 1, 5)
    with pytest.raises(RuntimeError, match=r"teacher") as info:
        make_client_app(cfg, state_root=tmp_path / "state")(msg, ctx)
    assert "does not exist on this machine" not in str(info.value), "the data path must not be reached first"
