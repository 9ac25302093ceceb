"""The equal-budget comparison script: variant parsing and a tiny single-site run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from simulations.benchmark_methods import format_table, run_benchmark, variant_overrides


def test_variant_overrides_single_site_and_federated() -> None:
    assert "akd.mode=minmax" in variant_overrides("fopro-kd+akd", federated=False)
    fed = variant_overrides("fedmas+fopro-kd", federated=True)
    assert "federation.strategy=fedmas" in fed and "train.method=fopro-kd" in fed
    with pytest.raises(ValueError, match="STRATEGY\\+METHOD"):
        variant_overrides("fedavg", federated=True)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        variant_overrides("nope", federated=False)


def _tiny_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"kind": "synthetic", "image_size": 32, "num_classes": 3, "max_per_class": 12},
        "split": {"val_per_class": 3, "test_per_class": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": 32},
        "train": {"epochs": 1, "batch_size": 8, "num_threads": 1},
    }))
    return config


def test_tiny_single_site_benchmark_writes_results(tmp_path: Path, monkeypatch) -> None:
    """Two variants x two seeds: rows, summary over seeds and the paired block against the reference."""
    import fopro_kd.training.single_site as single_site

    for plot in ("plot_per_class_recall", "plot_history"):  # PNGs are 60% of a tiny run's time; not tested here
        monkeypatch.setattr(single_site, plot, lambda *args, **kwargs: None)
    results = run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out", ["bsm", "ce"], [0, 1], [],
                            reference="ce", rare_classes=["class_2"], n_boot=200)
    rows = results["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("bsm", 0), ("ce", 0), ("bsm", 1), ("ce", 1)]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert all(0.0 <= r["balanced_accuracy"] <= 1.0 for r in rows)
    assert saved["reference"] == "ce" and saved["rare_classes"] == ["class_2"] and saved["n_test"] == 9
    for variant in ("bsm", "ce"):
        for metric in ("balanced_accuracy", "rare_recall"):
            block = saved["summary"][variant][metric]
            assert len(block["per_seed"]) == 2 and block["std"] is not None
            assert block["mean"] == pytest.approx(sum(block["per_seed"]) / 2)
    # the summary's bACC on the saved predictions is the run's own test bACC
    assert saved["summary"]["bsm"]["balanced_accuracy"]["per_seed"] == pytest.approx(
        [r["balanced_accuracy"] for r in rows if r["method"] == "bsm"])
    assert set(saved["paired"]) == {"bsm"}  # no block for the reference itself
    for metric in ("balanced_accuracy", "rare_recall"):
        pair = saved["paired"]["bsm"][metric]
        assert pair["ci95_low"] <= pair["mean_diff"] <= pair["ci95_high"] and len(pair["per_seed"]) == 2
        assert pair["within_image_noise"] == (pair["ci95_low"] <= 0 <= pair["ci95_high"])
        # two seeds: the verdict reads the seeds-and-images interval, which contains the image one's centre
        assert pair["interval"] == "seeds+images" and pair["seed_sd"] is not None
        assert pair["within_noise"] == (pair["ci95_total_low"] <= 0 <= pair["ci95_total_high"])
        assert pair["ci95_total_low"] <= pair["mean_diff"] <= pair["ci95_total_high"]
        ref = saved["summary"]["ce"][metric]["per_seed"]
        var = saved["summary"]["bsm"][metric]["per_seed"]
        assert pair["per_seed"] == pytest.approx([v - r for v, r in zip(var, ref)])
    assert (tmp_path / "out" / "bsm-seed1" / "predictions_test.npz").is_file()
    # the same statistics for the last epoch's models (no selection): each run's own last-epoch test score
    last_epoch = {(r["method"], r["seed"]): json.loads(
        (tmp_path / "out" / f"{r['method']}-seed{r['seed']}" / "metrics.json").read_text())["last_epoch"]
        for r in rows}
    for variant in ("bsm", "ce"):
        assert saved["last_model"]["summary"][variant]["balanced_accuracy"]["per_seed"] == pytest.approx(
            [last_epoch[(variant, s)]["balanced_accuracy"] for s in (0, 1)])
    assert set(saved["last_model"]["paired"]) == {"bsm"}
    table = format_table(saved)
    assert "bsm" in table and "(reference)" in table and table.count("\n") == 3

    # --skip-finished: the same queue again trains nothing and gives the same statistics ...
    calls = []
    real_train = single_site.train_single_site

    def counting_train(cfg, out, **kwargs):
        calls.append(str(out))
        return real_train(cfg, out, **kwargs)

    import simulations.benchmark_methods as benchmark_methods

    monkeypatch.setattr(benchmark_methods, "train_single_site", counting_train)
    again = run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out", ["bsm", "ce"], [0, 1], [],
                          reference="ce", rare_classes=["class_2"], n_boot=200, skip_finished=True)
    assert calls == [] and again["paired"] == saved["paired"]
    # ... also from the committed archive of those runs (a fresh checkout has no runs/): nothing retrained
    from simulations.archive_runs import archive_runs

    archive_runs([tmp_path / "out" / f"{m}-seed{s}" for m in ("bsm", "ce") for s in (0, 1)], tmp_path / "archived")
    restored = run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "archived", ["bsm", "ce"], [0, 1], [],
                             reference="ce", rare_classes=["class_2"], n_boot=200, skip_finished=True)
    assert calls == [] and restored["paired"] == saved["paired"] and restored["last_model"] == saved["last_model"]
    # ... also where the feature cache lives elsewhere (a cache location is not a setting of the experiment)
    moved = run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "archived", ["bsm", "ce"], [0, 1],
                          [f"train.feature_cache_dir={tmp_path / 'elsewhere'}"], reference="ce",
                          rare_classes=["class_2"], n_boot=200, skip_finished=True)
    assert calls == [] and moved["paired"] == saved["paired"]
    # ... and a run whose config would differ (another lr) is trained again, not reused
    changed = run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out", ["bsm", "ce"], [0], ["train.lr=0.001"],
                            reference="ce", rare_classes=["class_2"], n_boot=50, skip_finished=True)
    assert len(calls) == 2 and len(changed["rows"]) == 2


def test_archive_grows_run_by_run_and_a_fresh_out_reuses_it(tmp_path: Path, monkeypatch) -> None:
    """--archive: each run is archived as soon as it finishes (a stop mid-queue keeps the finished ones), and a
    queue on an empty --out (a fresh checkout) restores and reuses them instead of retraining."""
    import fopro_kd.training.single_site as single_site
    import simulations.benchmark_methods as benchmark_methods

    for plot in ("plot_per_class_recall", "plot_history"):
        monkeypatch.setattr(single_site, plot, lambda *args, **kwargs: None)
    real_train = single_site.train_single_site
    calls = []

    def stop_at_second_run(cfg, out, **kwargs):
        calls.append(Path(out).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("session stopped")
        return real_train(cfg, out, **kwargs)

    monkeypatch.setattr(benchmark_methods, "train_single_site", stop_at_second_run)
    archive = tmp_path / "archive"
    kwargs = {"reference": "ce", "rare_classes": ["class_2"], "n_boot": 50, "skip_finished": True,
              "archive": archive}
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out1", ["bsm", "ce"], [0], [], **kwargs)
    assert calls == ["bsm-seed0", "ce-seed0"]
    assert sorted(p.name for p in archive.iterdir()) == ["bsm-seed0"]  # archived before the stop
    assert (archive / "bsm-seed0" / "predictions_test.npz").is_file()

    calls.clear()
    monkeypatch.setattr(benchmark_methods, "train_single_site", lambda cfg, out, **kw: (
        calls.append(Path(out).name), real_train(cfg, out, **kw))[1])
    results = run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out2", ["bsm", "ce"], [0], [], **kwargs)
    assert calls == ["ce-seed0"]  # the archived bsm run is reused, only the missing one trains
    assert sorted(p.name for p in archive.iterdir()) == ["bsm-seed0", "ce-seed0"]
    assert [r["method"] for r in results["rows"]] == ["bsm", "ce"]

    calls.clear()
    again = run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out3", ["bsm", "ce"], [0], [], **kwargs)
    assert calls == [] and again["paired"] == results["paired"]

    with pytest.raises(ValueError, match="--archive needs --skip-finished"):
        run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out4", ["bsm"], [0], [], archive=archive)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reference": "ekd"}, "--reference 'ekd' is not one of the variants run"),
    ({"seeds": [0, 1, 0]}, "--seeds: seed\\(s\\) \\[0\\] repeat"),
    ({"methods": ["bsm", "bsm"]}, "--methods: variant\\(s\\) \\['bsm'\\] given more than once"),
    ({"folds": 1}, "--folds must be in 2"),
    ({"rare_classes": ["nope"]}, "--rare-classes: unknown class"),
])
def test_bad_benchmark_input_fails_before_training(tmp_path: Path, monkeypatch, kwargs, message) -> None:
    import simulations.benchmark_methods as bench

    def no_training(*args, **kw):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(bench, "_run_variant", no_training)
    args = {"methods": ["bsm", "ce"], "seeds": [0, 1], **kwargs}
    with pytest.raises(ValueError, match=message):
        run_benchmark(str(_tiny_config(tmp_path)), tmp_path / "out", args.pop("methods"), args.pop("seeds"), [],
                      **args)
    assert not (tmp_path / "out").exists()


def test_benchmark_cli_reports_bad_input(tmp_path: Path, capsys) -> None:
    from simulations.benchmark_methods import main

    code = main(["--config", str(_tiny_config(tmp_path)), "--out", str(tmp_path / "out"), "--methods", "bsm",
                 "--reference", "fopro-kd"])
    assert code == 2 and "--reference 'fopro-kd'" in capsys.readouterr().err


def test_a_stopped_federation_in_the_queue_is_resumed_not_restarted(tmp_path: Path, monkeypatch) -> None:
    """--skip-finished --federated: a run with this config and a server checkpoint continues with --resume."""
    import simulations.benchmark_methods as bench
    import simulations.simulate as simulate
    from fopro_kd.config import load_config
    from fopro_kd.run_dir import RunDir
    from server.checkpoints import ServerCheckpointStore

    config = str(_tiny_config(tmp_path))
    overrides = variant_overrides("fedavg+bsm", federated=True)
    cfg = load_config(config, overrides)
    out = tmp_path / "fedavg+bsm-seed0"
    RunDir(out).save_config(cfg)
    assert not bench.resumable_federation(cfg.to_dict(), out), "no checkpoint: nothing to resume"
    ServerCheckpointStore(RunDir(out)).save({"round": 2, "arrays": {"w": __import__("torch").zeros(1)}})
    assert bench.resumable_federation(cfg.to_dict(), out)
    assert not bench.resumable_federation(load_config(config, overrides + ["train.lr=0.001"]).to_dict(), out), \
        "another config: not this run's to continue"
    calls = []

    def fake_simulation(cfg, out_dir=None, resume_dir=None, **kwargs):
        calls.append((out_dir, resume_dir))
        (Path(resume_dir or out_dir) / "metrics.json").write_text(json.dumps({"mean_round_seconds": 1.0,
                                                                             "best_round": 2}))
        return 0

    monkeypatch.setattr(simulate, "run_simulation_from_config", fake_simulation)
    bench._run_variant(config, overrides, out, None, federated=True, skip_finished=True)
    assert calls == [(None, out)], "continued from its checkpoint"
    assert not bench.resumable_federation(cfg.to_dict(), out), "finished (metrics.json): never resumed again"


def test_a_stopped_single_site_run_in_the_queue_is_resumed(tmp_path: Path, monkeypatch) -> None:
    """--skip-finished: a directory holding this config (a run stopped mid-way) is continued, another is not."""
    import simulations.benchmark_methods as bench
    from fopro_kd.config import load_config
    from fopro_kd.run_dir import RunDir

    config = str(_tiny_config(tmp_path))
    seen = []

    def fake_train(cfg, out, **kwargs):
        seen.append(kwargs["resume"])
        return {"mean_epoch_seconds": 1.0}

    monkeypatch.setattr(bench, "train_single_site", fake_train)
    bench._run_variant(config, ["train.method=bsm"], tmp_path / "fresh", None, federated=False, skip_finished=True)
    RunDir(tmp_path / "stopped").save_config(load_config(config, ["train.method=bsm"]))
    bench._run_variant(config, ["train.method=bsm"], tmp_path / "stopped", None, federated=False, skip_finished=True)
    bench._run_variant(config, ["train.method=ce"], tmp_path / "stopped", None, federated=False, skip_finished=True)
    assert seen == [False, True, False]


def test_federated_queue_draws_the_round_curves_of_each_seed(tmp_path: Path, monkeypatch) -> None:
    """After every federation the curves of that seed's federations so far are redrawn (runs faked here)."""
    import csv

    import numpy as np

    import simulations.benchmark_methods as bench
    from fopro_kd.stats import save_predictions

    config = _tiny_config(tmp_path)
    classes = [f"class_{i}" for i in range(4)]

    def fake_federation(config_path, overrides, out, splits, federated, skip_finished):
        assert federated and splits is None
        out.mkdir(parents=True)
        with open(out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["round", "test_balanced_accuracy",
                                                        *(f"recall/{c}" for c in classes)])
            writer.writeheader()
            for rnd in range(3):
                writer.writerow({"round": rnd, "test_balanced_accuracy": 0.1 * rnd,
                                 **{f"recall/{c}": 0.2 * rnd for c in classes}})
        labels = np.arange(8) % 4
        save_predictions(out / "predictions_test.npz", [str(i) for i in range(8)], labels, np.eye(4)[labels],
                         classes)
        return {"balanced_accuracy": 1.0, "few_shot": 1.0, "medium_shot": 1.0, "many_shot": 1.0, "macro_f1": 1.0,
                "seconds": 1.0, "best_epoch": 2}

    monkeypatch.setattr(bench, "_run_variant", fake_federation)
    run_benchmark(str(config), tmp_path / "out", ["fedavg+bsm", "fedmas+bsm"], [0, 1], [], federated=True,
                  rare_classes=["class_0", "class_1"], n_boot=20)
    for seed in (0, 1):
        for name in ("balanced-accuracy", "rare-recall"):
            assert (tmp_path / "out" / f"rounds-seed{seed}-{name}.png").is_file(), (seed, name)
