"""simulations.compare_runs: paired statistics over finished run directories (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fopro_kd.seeding import fold_run_seed
from fopro_kd.stats import balanced_accuracy, fold_t_interval, paired_bootstrap, save_predictions
from simulations.benchmark_methods import format_table
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


def _fold_run(root: Path, name: str, fold: int, folds: int, predicted: np.ndarray, labels: np.ndarray) -> Path:
    """A finished k-fold run as ``benchmark_methods --folds`` writes it: fold ``fold`` of repeat 0."""
    run = _run(root, name, fold_run_seed(0, fold), predicted, labels, ids=[f"f{fold}-img{i}" for i in range(len(labels))])
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["split"] = {"mode": "kfold", "folds": folds, "fold": fold, "seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.fixture()
def fold_runs(tmp_path: Path) -> tuple[np.ndarray, dict[str, list[Path]], dict[str, list[np.ndarray]]]:
    """Three folds of a 3-fold cross-validation, each fold testing its own 60 images."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    preds = {m: [np.where(rng.random(len(labels)) < acc, labels, (labels + 1) % 3) for _ in range(3)]
             for m, acc in (("ref", 0.5), ("new", 0.75))}
    dirs = {m: [_fold_run(tmp_path, f"{m}-seed0-fold{f}", f, 3, preds[m][f], labels) for f in range(3)]
            for m in preds}
    return labels, dirs, preds


def test_compare_runs_pools_the_folds_and_reads_the_corrected_fold_interval(fold_runs) -> None:
    """All folds: the pooled difference weighs every image once, the interval is the fold t interval
    with K = 3; the directories' order does not matter (folds are found by their config)."""
    labels, dirs, preds = fold_runs
    shuffled = {"ref": dirs["ref"], "new": dirs["new"][::-1]}
    out = compare_runs(shuffled, reference="ref", n_boot=200)
    pair = out["paired"]["new"]["balanced_accuracy"]
    per_fold = [balanced_accuracy(labels, preds["new"][f]) - balanced_accuracy(labels, preds["ref"][f])
                for f in range(3)]
    pooled = (balanced_accuracy(np.tile(labels, 3), np.concatenate(preds["new"]))
              - balanced_accuracy(np.tile(labels, 3), np.concatenate(preds["ref"])))
    assert out["n_test"] == 180 and out["folds"] == 3 and out["folds_done"] == [0, 1, 2] and out["seeds"] == [0]
    assert pair["mean_diff"] == pytest.approx(pooled) and pooled > 0.1
    assert pair["per_fold"] == pytest.approx(per_fold) and pair["interval"] == "folds"
    expected = fold_t_interval(per_fold, pooled, 3)
    assert pair["ci95_total_low"] == pytest.approx(expected["ci95_total_low"])
    assert pair["ci95_total_high"] == pytest.approx(expected["ci95_total_high"])
    assert [r["fold"] for r in out["rows"]] == [0, 1, 2, 0, 1, 2]


def test_compare_runs_of_a_partial_cross_validation_keeps_its_k(fold_runs, capsys) -> None:
    """Two of three folds: only their 120 images are pooled, and the interval's overlap correction
    is still the 3-fold one (wider than if the two folds were a complete 2-fold split)."""
    labels, dirs, preds = fold_runs
    out = compare_runs({m: d[:2] for m, d in dirs.items()}, reference="ref", n_boot=200)
    pair = out["paired"]["new"]["balanced_accuracy"]
    per_fold = [balanced_accuracy(labels, preds["new"][f]) - balanced_accuracy(labels, preds["ref"][f])
                for f in range(2)]
    as_three = fold_t_interval(per_fold, pair["mean_diff"], 3)
    as_two = fold_t_interval(per_fold, pair["mean_diff"], 2)
    assert out["n_test"] == 120 and out["folds"] == 3 and out["folds_done"] == [0, 1]
    assert pair["ci95_total_low"] == pytest.approx(as_three["ci95_total_low"])
    assert as_two["ci95_total_low"] < as_three["ci95_total_low"]  # the 2-fold correction (1/(k-1) = 1) is wider
    assert "folds 0,1 of 3 pooled (partial)" in format_table(out)
    one = compare_runs({m: d[:1] for m, d in dirs.items()}, reference="ref", n_boot=200)
    assert one["paired"]["new"]["balanced_accuracy"]["interval"] == "images" and one["n_test"] == 60


def test_compare_runs_refuses_unpaired_folds(fold_runs, runs) -> None:
    _, dirs, _ = fold_runs
    with pytest.raises(ValueError, match=r"do not hold the same \(seed, fold\) runs: they differ in \[\(0, 1\), \(0, 2\)\]"):
        compare_runs({"ref": dirs["ref"][:2], "new": [dirs["new"][0], dirs["new"][2]]}, reference="ref")
    with pytest.raises(ValueError, match="seed 0 fold 0 already given for 'new'"):
        compare_runs({"ref": dirs["ref"], "new": [dirs["new"][0], dirs["new"][0], dirs["new"][1]]})
    _, single, _ = runs
    with pytest.raises(ValueError, match="k-fold runs .* mixed with runs on one split"):
        compare_runs({"ref": dirs["ref"][:1], "new": single["new"][:1]})


def test_forest_plot_rows_are_the_paired_differences_in_points(runs, tmp_path: Path) -> None:
    """The figure's numbers: every compared variant once (not the reference), ×100, the intervals around the mean."""
    from fopro_kd.plots import paired_difference_rows, plot_paired_differences

    _, dirs, _ = runs
    out = compare_runs(dirs, reference="ref", n_boot=300)
    rows = paired_difference_rows(out["paired"], "balanced_accuracy")
    assert [r["name"] for r in rows] == ["new"]
    pair = out["paired"]["new"]["balanced_accuracy"]
    row = rows[0]
    assert row["mean"] == pytest.approx(100 * pair["mean_diff"]) and row["mean"] > 10  # "new" is the better variant
    assert row["images"][0] < row["mean"] < row["images"][1]
    assert row["total"][0] <= row["images"][0] and row["images"][1] <= row["total"][1]  # seeds widen it
    assert row["interval"] == "seeds+images"
    assert paired_difference_rows(out["paired"], "no_such_metric") == []
    png = plot_paired_differences(out["paired"], tmp_path / "forest.png", "ref")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_cli_draws_the_forest_plot(runs, tmp_path: Path) -> None:
    _, dirs, _ = runs
    figure = tmp_path / "figs" / "cmp.png"
    argv = [f"--variant=ref={','.join(map(str, dirs['ref']))}", f"--variant=new={','.join(map(str, dirs['new']))}",
            "--bootstrap", "200", "--plot", str(figure)]
    assert main(argv) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
