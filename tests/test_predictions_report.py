"""Test-prediction files of federated runs (k-fold split) and the paired table of ``fopro-kd report``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.client_app import make_client_app
from fopro_kd.federation.sites import cached_splits
from fopro_kd.stats import balanced_accuracy, load_predictions, save_predictions
from server.server_app import run_federation

from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads, tiny_config  # noqa: E402


def test_federated_kfold_run_writes_the_selected_models_test_predictions(tmp_path: Path) -> None:
    cfg = tiny_config(federation={"num_rounds": 1, "fraction_evaluate": 0.0}, train={"method": "bsm"},
                      split={"mode": "kfold", "folds": 3, "fold": 2})
    with fake_task_identity(run_id=11), preserved_torch_threads():
        metrics = run_federation(LocalGrid(make_client_app(cfg, state_root=tmp_path / "state"),
                                           cfg.federation.num_clients), cfg, tmp_path / "run")
    pred = load_predictions(tmp_path / "run")
    test = cached_splits(cfg).test
    assert pred.ids.tolist() == list(test.ids) and pred.labels.tolist() == test.labels.tolist()
    assert pred.probs.shape == (len(test), 4) and np.allclose(pred.probs.sum(axis=1), 1, atol=1e-4)
    # the saved predictions are those of the reported (selected) model
    assert balanced_accuracy(pred.labels, pred.predicted) == pytest.approx(metrics["balanced_accuracy"])


def _fake_run(path: Path, predicted: list[int], labels: list[int], ids: list[str]) -> Path:
    path.mkdir()
    names = ["nv", "df", "vasc"]
    (path / "metrics.json").write_text(json.dumps({
        "balanced_accuracy": 0.5, "many_shot": None, "medium_shot": None, "few_shot": None,
        "per_class_recall": {n: 0.5 for n in names}, "method": "bsm", "best_epoch": 1,
        "train_counts": {"nv": 500, "df": 20, "vasc": 30},
    }))
    save_predictions(path / "predictions_test.npz", ids, np.array(labels), np.eye(3)[predicted], names)
    return path


def test_report_shows_paired_interval_for_runs_on_the_same_test_set(tmp_path: Path, capsys) -> None:
    from fopro_kd.report_table import print_report

    labels = [0] * 20 + [1] * 20 + [2] * 20
    ids = [f"img{i}" for i in range(60)]
    weak = [0] * 20 + [0] * 20 + [0] * 20  # only the head class
    strong = labels
    a = _fake_run(tmp_path / "a", weak, labels, ids)
    b = _fake_run(tmp_path / "b", strong[::-1], labels[::-1], ids[::-1])  # same images, other order: still paired
    c = _fake_run(tmp_path / "c", weak, labels, [f"other{i}" for i in range(60)])
    print_report([a, b, c])
    out = capsys.readouterr().out
    assert "paired difference to the first run" in out
    paired = [line for line in out.split("paired difference")[1].splitlines() if line.startswith("b ")]
    assert len(paired) == 1, out
    # bACC 1/3 -> 1: +66.7 points; rare recall (df, vasc, nv: the 3 rarest of 3) too
    assert "+66.7" in paired[0] and "within noise" not in paired[0]
    assert "c: not paired with a" in out and "rare classes: df, vasc, nv" in out
