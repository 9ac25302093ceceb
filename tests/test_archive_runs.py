"""simulations.archive_runs: the committed copy of finished runs is enough for compare_runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fopro_kd.stats import save_predictions
from simulations.archive_runs import archive_runs, main
from simulations.compare_runs import compare_runs

CLASSES = ["a", "b", "c"]


def _run(root: Path, name: str, seed: int, accuracy: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 20)
    predicted = np.where(rng.random(len(labels)) < accuracy, labels, (labels + 1) % 3)
    ids = [f"img{i}" for i in range(len(labels))]
    save_predictions(run / "predictions_test.npz", ids, labels, np.eye(3, dtype=np.float32)[predicted], CLASSES)
    save_predictions(run / "predictions_test_last.npz", ids, labels, np.eye(3, dtype=np.float32)[labels], CLASSES)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    (run / "metrics.json").write_text(json.dumps({"train_counts": {"a": 50, "b": 20, "c": 5}}))
    (run / "best.pt").write_bytes(b"checkpoint")
    return run


def test_archived_runs_give_the_same_comparison_and_leave_checkpoints_behind(tmp_path: Path) -> None:
    runs = {m: [_run(tmp_path / "runs", f"{m}-seed{s}", s, acc) for s in range(2)]
            for m, acc in (("ref", 0.5), ("new", 0.8))}
    archive = tmp_path / "archive"
    assert main([str(r) for rs in runs.values() for r in rs] + ["--to", str(archive)]) == 0
    copies = {m: [archive / r.name for r in rs] for m, rs in runs.items()}
    assert sorted(p.name for p in copies["ref"][0].iterdir()) == [
        "config.yaml", "metrics.json", "predictions_test.npz", "predictions_test_last.npz"]
    for model in ("selected", "last"):
        original = compare_runs(runs, n_boot=100, model=model)
        archived = compare_runs(copies, n_boot=100, model=model)
        assert archived["paired"] == original["paired"] and archived["summary"] == original["summary"]
    assert compare_runs(copies, n_boot=100)["paired"]["new"]["balanced_accuracy"]["mean_diff"] > 0.1


def test_archive_refuses_unfinished_or_clashing_runs_before_copying(tmp_path: Path) -> None:
    good = _run(tmp_path / "a", "ekd-seed0", 0, 0.5)
    unfinished = tmp_path / "b" / "fopro-seed0"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ValueError, match=r"fopro-seed0: not a finished run \(no predictions_test.npz, metrics.json\)"):
        archive_runs([good, unfinished], tmp_path / "archive")
    assert not (tmp_path / "archive").exists(), "nothing copied when one run is refused"
    twin = _run(tmp_path / "c", "ekd-seed0", 0, 0.5)
    with pytest.raises(ValueError, match="two runs named 'ekd-seed0'"):
        archive_runs([good, twin], tmp_path / "archive")
