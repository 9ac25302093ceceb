"""simulations.compare_runs: paired statistics over finished run directories (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fopro_kd.stats import paired_bootstrap, save_predictions
from simulations.compare_runs import compare_runs, main

CLASSES = ["a", "b", "c"]


def _run(root: Path, name: str, seed: int, predicted: np.ndarray, labels: np.ndarray, ids=None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    probs = np.eye(3, dtype=np.float32)[predicted]
    save_predictions(run / "predictions_test.npz", ids if ids is not None else [f"img{i}" for i in range(len(labels))],
                     labels, probs, CLASSES)
    (run / "metrics.json").write_text(json.dumps({"balanced_accuracy": 0.5, "mean_epoch_seconds": 1.0,
                                                  "train_counts": {"a": 50, "b": 20, "c": 5}}))
    return run


@pytest.fixture()
def runs(tmp_path: Path) -> tuple[np.ndarray, dict[str, list[Path]], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    preds = {m: np.stack([np.where(rng.random(len(labels)) < acc, labels, (labels + 1) % 3) for _ in range(3)])
             for m, acc in (("ref", 0.5), ("new", 0.7))}
    dirs = {m: [_run(tmp_path, f"{m}-s{s}", s, preds[m][s], labels) for s in range(3)] for m in preds}
    return labels, dirs, preds


def test_compare_runs_equals_the_bootstrap_on_the_same_predictions(runs) -> None:
    labels, dirs, preds = runs
    out = compare_runs(dirs, reference="ref", rare_classes=None, n_boot=300)
    direct = paired_bootstrap(labels, preds["ref"], preds["new"], n_boot=300, seed=0)
    pair = out["paired"]["new"]["balanced_accuracy"]
    assert pair["mean_diff"] == pytest.approx(direct["mean_diff"]) and pair["mean_diff"] > 0.1
    assert pair["ci95_total_low"] == pytest.approx(direct["ci95_total_low"])
    assert out["seeds"] == [0, 1, 2] and out["rare_classes"] == ["c", "b", "a"]  # rarest first, from train_counts
    assert [r["method"] for r in out["rows"]] == ["ref"] * 3 + ["new"] * 3


def test_compare_runs_of_the_last_models_reads_their_own_predictions(runs) -> None:
    """``model="last"`` compares ``predictions_test_last.npz`` (here: the selected models swapped between
    variants, so the difference changes sign); a run without that file is one error naming it."""
    labels, dirs, preds = runs
    for m, other in (("ref", "new"), ("new", "ref")):
        for s, d in enumerate(dirs[m]):
            save_predictions(d / "predictions_test_last.npz", [f"img{i}" for i in range(len(labels))], labels,
                             np.eye(3, dtype=np.float32)[preds[other][s]], CLASSES)
    selected = compare_runs(dirs, reference="ref", n_boot=200)
    last = compare_runs(dirs, reference="ref", n_boot=200, model="last")
    assert last["model"] == "last" and selected["model"] == "selected"
    diff = selected["paired"]["new"]["balanced_accuracy"]["mean_diff"]
    assert diff > 0.1 and last["paired"]["new"]["balanced_accuracy"]["mean_diff"] == pytest.approx(-diff)
    assert [r["balanced_accuracy"] for r in last["rows"][:3]] == pytest.approx(
        [r["balanced_accuracy"] for r in selected["rows"][3:]])
    (dirs["new"][2] / "predictions_test_last.npz").unlink()
    with pytest.raises(FileNotFoundError, match="new-s2/predictions_test_last.npz"):
        compare_runs(dirs, reference="ref", model="last")


def test_compare_runs_refuses_unpaired_or_mismatched_runs(runs, tmp_path: Path) -> None:
    labels, dirs, preds = runs
    swapped = {"ref": dirs["ref"], "new": [dirs["new"][1], dirs["new"][0], dirs["new"][2]]}
    with pytest.raises(ValueError, match="new-s1: seed 1, but the reference's run 0"):
        compare_runs(swapped)
    with pytest.raises(ValueError, match="same number of runs"):
        compare_runs({"ref": dirs["ref"], "new": dirs["new"][:2]})
    other = _run(tmp_path, "other-ids", 0, preds["new"][0], labels, ids=[f"x{i}" for i in range(len(labels))])
    with pytest.raises(ValueError, match="not tested on the same images"):
        compare_runs({"ref": dirs["ref"][:1], "new": [other]})
    with pytest.raises(ValueError, match="--reference 'nope'"):
        compare_runs(dirs, reference="nope")


def test_compare_runs_cli_prints_the_table_and_writes_json(runs, tmp_path: Path, capsys) -> None:
    _, dirs, _ = runs
    out = tmp_path / "cmp.json"
    argv = [f"--variant=ref={','.join(map(str, dirs['ref']))}", f"--variant=new={','.join(map(str, dirs['new']))}",
            "--rare-classes", "c", "--bootstrap", "200", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "3 seed(s)" in table and "(reference)" in table
    assert json.loads(out.read_text())["rare_classes"] == ["c"]
    assert main(["--variant", "ref"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
