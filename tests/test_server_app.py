"""ServerApp pieces and a whole federation on an in-process Grid (no Ray): selection, history, faults."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from client.client_app import make_client_app
from fopro_kd.federation.sites import cached_splits
from fopro_kd.checkpoint import load_checkpoint
from fopro_kd.config import Config, ConfigError, MetricsConfig
from fopro_kd.run_dir import RunDir
from fopro_kd.federation.evaluation import build_global_student, site_metrics_from_counts
from server.history import RoundRecorder
from server.server_app import ServerEvaluator, check_federation_config, run_federation

from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _run_identity():
    with fake_task_identity(run_id=9), preserved_torch_threads():
        yield


def crashing(app: Callable[[Message, Context], Message], site: int, rounds: set[int]) -> Callable:
    def wrapped(msg: Message, context: Context) -> Message:
        server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        if context.node_config["partition-id"] == site and msg.metadata.message_type == "train" and server_round in rounds:
            raise RuntimeError("simulated crash")
        return app(msg, context)

    return wrapped


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- start-up checks


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"prompt": {"scope": "federated"}}, "prompt.scope"),
        ({"federation": {"strategy": "fedmas"}, "train": {"method": "bsm"}}, "fedmas"),
        ({"federation": {"strategy": "class_balanced", "share_class_counts": False}}, "share_class_counts"),
    ],
)
def test_start_up_rejects_settings_that_cannot_run(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_federation_config(tiny_config(**sections))


def test_site_metrics_from_counts_hand_computed() -> None:
    m = site_metrics_from_counts([3, 0, 1, 0], [4, 2, 1, 0], ["a", "b", "c", "d"], [150, 50, 5, 1], MetricsConfig())
    assert m["per_class_recall"] == {"a": 0.75, "b": 0.0, "c": 1.0, "d": None}
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert m["many_shot"] == 0.75 and m["medium_shot"] == 0.0 and m["few_shot"] == 1.0
    assert m["accuracy"] == pytest.approx(4 / 7) and m["num_samples"] == 7
    empty = site_metrics_from_counts([0, 0], [0, 0], ["a", "b"], [1, 1], MetricsConfig())
    assert empty["balanced_accuracy"] is None


def test_recorder_maps_nodes_to_sites_and_logs_errors() -> None:
    recorder = RoundRecorder()
    arrays = ArrayRecord([np.zeros(10, dtype=np.float32)])
    sent = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type="train") for n in (11, 12)]
    ok = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5, "site-id": 3,
                                                                         "train-seconds": 1.5})}), reply_to=sent[0])
    bad = Message(Error(code=0, reason="boom"), reply_to=sent[1])
    recorder.on_configure_train(1)
    recorder.on_train_replies(1, [ok, bad])
    recorder.on_aggregated(1, {11: 1.0}, [])
    log = recorder.rounds[1]
    assert recorder.by_site(log.weights) == {"site-3": 1.0}
    assert recorder.by_site(log.bytes_up) == {"site-3": arrays.count_bytes()}
    assert recorder.by_site(log.train_seconds) == {"site-3": 1.5}
    assert recorder.by_site(log.train_errors) == {"node-12": "boom"}


def test_evaluator_selects_on_validation_and_writes_best(tmp_path: Path) -> None:
    cfg = tiny_config()
    splits = cached_splits(cfg)
    run = RunDir(tmp_path)
    evaluator = ServerEvaluator(cfg, splits, run, RoundRecorder())
    arrays = [ArrayRecord({k: v for k, v in build_global_student(cfg, 4, seed=s).state_dict().items()}) for s in (0, 1, 2)]
    for server_round, a in enumerate(arrays):
        record = evaluator(server_round, a)
        assert set(record.keys()) == {"val-balanced-accuracy", "test-balanced-accuracy"}
    rows = read_history(tmp_path)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert {f"recall/class_{c}" for c in range(4)} <= set(rows[0])
    vals = [float(r["val_balanced_accuracy"]) for r in rows]
    best_round = 1 if vals[1] >= vals[2] else 2  # round 0 (the initial model) is never selected
    assert evaluator.best.round == best_round
    payload = load_checkpoint(tmp_path / "best.pt", expected_format="fopro-kd-student/1")
    assert payload["round"] == best_round
    assert evaluator(3, ArrayRecord()) is None, "an empty global model (nothing aggregated) is skipped"


def _federate(cfg: Config, tmp_path: Path, client: Callable | None = None) -> tuple[dict, Path]:
    out = tmp_path / "run"
    app = client or make_client_app(cfg, state_root=tmp_path / "state")
    metrics = run_federation(LocalGrid(app, cfg.federation.num_clients), cfg, out)
    assert json.loads((out / "metrics.json").read_text())["best_round"] == metrics["best_round"]
    return metrics, out


def test_federation_writes_report_and_survives_a_crashing_client(tmp_path: Path) -> None:
    cfg = tiny_config(federation={"strategy": "fedmas", "fedmas_rule": "mas"})
    app = crashing(make_client_app(cfg, state_root=tmp_path / "state"), site=2, rounds={1})
    metrics, out = _federate(cfg, tmp_path, app)
    assert metrics["strategy"] == "fedmas" and metrics["rounds"] == 2 and metrics["best_round"] in (1, 2)
    assert "simulated crash" in metrics["failed_replies"]["1"]["site-2"]
    assert set(metrics["per_site"]) == {"site-0", "site-1", "site-2"}
    assert {"balanced_accuracy", "few_shot", "per_class_recall"} <= set(metrics["per_site"]["site-0"])
    assert {"balanced_accuracy", "per_class_recall", "confusion_matrix"} <= set(metrics)
    assert len(metrics["round_seconds"]) == 2 and all(0 <= s <= 1 for s in metrics["outside_training_share"])
    rows = read_history(out)
    assert rows[1]["weight/site-2"] == "" and float(rows[2]["weight/site-2"]) > 0
    assert abs(sum(float(rows[2][f"weight/site-{k}"]) for k in range(3)) - 1) < 1e-9
    assert int(rows[2]["bytes/site-0"]) > 0
    for name in ("per_class_recall_rounds.png", "site_balanced_accuracy.png", "aggregation_weights.png"):
        assert (out / "plots" / name).is_file()


def test_class_balanced_federation_reports_shared_counts(tmp_path: Path) -> None:
    cfg = tiny_config(federation={"strategy": "class_balanced", "num_rounds": 1, "fraction_evaluate": 0.0},
                      train={"method": "bsm"})
    metrics, out = _federate(cfg, tmp_path)
    assert metrics["best_round"] == 1
    shared = json.loads((out / "reported_class_counts.json").read_text())
    assert set(shared) == {"site-0", "site-1", "site-2"}
    assert metrics["per_site"] == {}, "fraction_evaluate 0 switches federated evaluation off"


def test_float16_transfer_federation_halves_the_bytes_and_keeps_float32_master(tmp_path: Path) -> None:
    full, _ = _federate(tiny_config(federation={"num_rounds": 1, "fraction_evaluate": 0.0}), tmp_path / "fp32")
    half, out = _federate(tiny_config(federation={"num_rounds": 1, "fraction_evaluate": 0.0,
                                                  "transfer_dtype": "float16"}), tmp_path / "fp16")
    assert half["best_round"] == 1 and not half["failed_replies"]
    bytes_fp32 = int(read_history(tmp_path / "fp32" / "run")[1]["bytes/site-0"])
    bytes_fp16 = int(read_history(out)[1]["bytes/site-0"])
    assert 0.45 < bytes_fp16 / bytes_fp32 < 0.55
    payload = load_checkpoint(out / "best.pt", expected_format="fopro-kd-student/1")
    floats = [v for v in payload["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats), "the server keeps float32 master weights"


def test_report_puts_single_site_and_federated_runs_side_by_side(tmp_path: Path, capsys) -> None:
    from fopro_kd.report_table import print_report

    single, fed = tmp_path / "single", tmp_path / "fed"
    for path, extra in ((single, {"method": "ekd", "best_epoch": 4}),
                        (fed, {"method": "fopro-kd", "strategy": "fedmas", "fedmas_rule": "mas", "best_round": 7})):
        path.mkdir()
        (path / "metrics.json").write_text(json.dumps({
            "balanced_accuracy": 0.5, "many_shot": 0.9, "medium_shot": None, "few_shot": 0.125,
            "per_class_recall": {"nv": 1.0, "df": None}, **extra}))
    print_report([single, fed])
    lines = capsys.readouterr().out.splitlines()
    assert "few" in lines[1] and "nv" in lines[1] and "df" in lines[1]
    assert lines[3].split()[:4] == ["single", "single-site", "ekd", "4"]
    assert lines[4].split()[:5] == ["fed", "fedmas", "(mas)", "fopro-kd", "7"]
    assert lines[4].split()[5:] == ["50.0", "90.0", "-", "12.5", "100.0", "-"]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        print_report([tmp_path / "missing"])
