"""Variant comparison at equal budget: methods on one site, or strategies in a federation, over seeds and folds.

Usage::

    python -m simulations.benchmark_methods --config configs/demo.yaml --out runs/bench-demo \
        [--methods bsm ekd fopro-kd fopro-kd+akd] [--seeds 0 1 2] [--reference bsm] [--set train.epochs=4]
    python -m simulations.benchmark_methods --config configs/ham10000-lt.yaml --out runs/bench-ham-cv \
        --methods bsm ekd --seeds 0 1 2 --folds 5 --rare-classes df vasc akiec
    python -m simulations.benchmark_methods --federated --config configs/sim-demo.yaml \
        --out runs/bench-sim --methods fedavg+bsm fedavg+fopro-kd fedmas+fopro-kd class_balanced+fopro-kd

Every variant runs with the same config, seeds, data split and epoch/round budget; only the
variant's overrides change (``train.method`` / ``akd.mode``; for ``--federated`` also
``federation.strategy``). The run seed (``seed``) changes the initialisation and the batch
order; the split depends on ``split.seed`` only, so every variant and seed is tested on the
same images and their differences are *paired*.

``--folds K`` runs every fold ``i = 0..K-1`` with ``split.mode=kfold split.folds=K
split.fold=i`` (whole lesions per fold, :func:`fopro_kd.data.splits.kfold_group_split`); each
fold is its own training run with run seed ``seed * 1000 + i`` (so folds are independent
initialisations while ``--seeds`` stays the label of a repeat), and the statistics use each
seed's test predictions *pooled over the folds*: every image is tested exactly once.

Writes ``results.json``: ``rows`` (one per run: variant, seed, fold, test metrics, seconds per
epoch or round), ``summary.<variant>.<metric>.{mean, std, per_seed}`` over seeds and
``paired.<variant>.<metric>.{mean_diff, ci95_low, ci95_high, per_seed, seed_sd, image_se,
ci95_total_low, ci95_total_high, within_noise, within_image_noise, interval}`` against the
reference variant, for ``balanced_accuracy`` and ``rare_recall`` (mean recall of
``--rare-classes``, default the 3 rarest training classes): ``ci95_*`` is a paired,
class-stratified bootstrap over test images (:func:`fopro_kd.stats.paired_bootstrap`),
``ci95_total_*`` adds the seed-to-seed spread (:func:`fopro_kd.stats.seed_and_image_interval`,
docs/results.md "Statistics used"). ``results.csv`` holds the rows. A table is printed;
"within noise" marks an interval that contains 0 (the seeds-and-images one from two seeds on).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fopro_kd.models.weights import default_offline_hub  # noqa: E402

default_offline_hub()

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from fopro_kd.config import ConfigError, config_from_dict, experiment_settings, load_config  # noqa: E402
from fopro_kd.seeding import FOLD_SEED_STRIDE, fold_run_seed  # noqa: E402
from fopro_kd.data import build_splits  # noqa: E402
from fopro_kd.stats import (  # noqa: E402
    DEFAULT_BOOTSTRAP,
    LAST_PREDICTIONS_FILE,
    PREDICTIONS_FILE,
    Predictions,
    align_predictions,
    balanced_accuracy,
    fold_t_interval,
    load_predictions,
    mean_recall,
    paired_bootstrap,
    pool_predictions,
    rarest_classes,
)
from fopro_kd.training.single_site import train_single_site  # noqa: E402
from simulations.archive_runs import archive_runs, restore_archived_run  # noqa: E402
from simulations.plot_rounds import write_round_curves  # noqa: E402

METRICS = ("balanced_accuracy", "rare_recall")
"""The metrics of ``summary`` and ``paired``."""
RARE_DEFAULT = 3
"""``--rare-classes`` default: this many rarest training classes."""

METHOD_OVERRIDES: dict[str, list[str]] = {
    "ce": ["train.method=ce", "train.loss=ce"],
    "bsm": ["train.method=bsm", "train.loss=bsm"],
    "ekd": ["train.method=ekd", "train.loss=bsm"],
    "fopro-kd": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=discriminative"],
    "fopro-kd+akd": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=minmax"],
    # the cheaper prompt schedule (docs/performance.md): prompt trained on every 4th batch
    "fopro-kd-every4": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=discriminative", "akd.prompt_every=4"],
    # the control of every prompt result: the FoPro-KD code path with the prompt frozen at the identity
    "ekd+identity-fpg": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=off"],
    # the same control on the two-stage path: the identity prompt is frozen from the start and its targets are cached
    # once (train.feature_cache_dir shares them between seeds: the key holds the prompt, which never changes)
    "fopro-2s-identity": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=off", "prompt.schedule=two_stage",
                          "prompt.param=radial", "prompt.explore_epochs=0"],
    # cached teacher targets (needs augment.teacher_view flips or clean in the base config)
    "ekd-cached": ["train.method=ekd", "train.loss=bsm", "train.cache_teacher_features=true"],
    # the probe's frequency preference as a fixed prompt: radial rings from `fopro-kd probe`, never trained, targets
    # cached from the first epoch (needs --set prompt.probe_file=<frequency_preference.json> for the data)
    "fopro-2s-probe-frozen": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=off", "prompt.schedule=two_stage",
                              "prompt.param=radial", "prompt.init=probe", "prompt.explore_epochs=0"],
}
TWO_STAGE_LR = 0.01
"""Prompt learning rate of the two-stage variants: one exploration epoch is a few hundred prompt steps,
and Adam moves each parameter by about lr per step, so 1e-3 leaves M within a few percent of 1."""
for _param in ("free", "radial"):
    for _mode in ("discriminative", "minmax", "prototype", "bn_stats"):
        # two-stage FoPro-KD: prompt explored for prompt.explore_epochs, then frozen and cached
        METHOD_OVERRIDES[f"fopro-2s-{_param}-{_mode}"] = [
            "train.method=fopro-kd", "train.loss=bsm", "prompt.schedule=two_stage", f"prompt.param={_param}",
            f"akd.mode={_mode}", f"prompt.lr={TWO_STAGE_LR}",
        ]
    # adversarial KD: the prompt ascends the student's loss and the student trains on x̃ too (akd.student_input)
    METHOD_OVERRIDES[f"fopro-2s-{_param}-advkd"] = METHOD_OVERRIDES[f"fopro-2s-{_param}-minmax"] + [
        "akd.student_input=prompted"]


def variant_overrides(name: str, federated: bool) -> list[str]:
    """``bsm`` / ``fopro-kd+akd`` (single site) or ``fedmas+fopro-kd`` (federated: strategy+method)."""
    strategy = None
    method = name
    if federated:
        strategy, _, method = name.partition("+")
        if not method:
            raise ValueError(f"federated variant {name!r} must look like 'STRATEGY+METHOD', e.g. 'fedavg+bsm'")
    if method not in METHOD_OVERRIDES:
        raise ValueError(f"unknown method {method!r} in variant {name!r}; choose from {sorted(METHOD_OVERRIDES)}")
    return METHOD_OVERRIDES[method] + ([f"federation.strategy={strategy}"] if strategy else [])


def run_seed(seed: int, fold: int | None) -> int:
    """The training seed of repeat ``seed`` on ``fold`` (:func:`fopro_kd.seeding.fold_run_seed`)."""
    return fold_run_seed(seed, fold)


def check_arguments(
    methods: Sequence[str], seeds: Sequence[int], reference: str | None, folds: int | None, federated: bool
) -> dict[str, list[str]]:
    """Variant overrides, after checking the command line; every error names the option, before any training."""
    if not methods:
        raise ValueError("--methods: give at least one variant")
    repeated = sorted({m for m in methods if list(methods).count(m) > 1})
    if repeated:
        raise ValueError(f"--methods: variant(s) {repeated} given more than once")
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    repeated_seeds = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated_seeds:
        raise ValueError(
            f"--seeds: seed(s) {repeated_seeds} repeat; a repeated seed is the same run again and would count "
            f"twice in the mean and the interval"
        )
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be >= 0, got {list(seeds)}")
    if reference is not None and reference not in methods:
        raise ValueError(f"--reference {reference!r} is not one of the variants run (--methods {list(methods)})")
    if folds is not None and not 2 <= folds < FOLD_SEED_STRIDE:
        raise ValueError(f"--folds must be in 2..{FOLD_SEED_STRIDE - 1}, got {folds}")
    return {name: variant_overrides(name, federated) for name in methods}


def resolve_rare_classes(names: Sequence[str] | None, class_names: list[str], train_counts: np.ndarray) -> list[int]:
    """Class indices of ``--rare-classes`` (default: the 3 rarest training classes)."""
    if not names:
        return rarest_classes(train_counts, RARE_DEFAULT)
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise ValueError(f"--rare-classes: unknown class(es) {unknown}; the data has {class_names}")
    if len(set(names)) != len(names):
        raise ValueError(f"--rare-classes: classes repeat in {list(names)}")
    return [class_names.index(n) for n in names]


def finished_run_metrics(cfg_dict: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """The metrics of a run already finished in ``out`` with exactly this config, else ``None``.

    Finished = ``metrics.json`` and the test predictions exist (both are written atomically, the
    metrics last) and the run's ``config.yaml`` snapshot, read back as a config, equals the
    config that would run now, so a queue stopped halfway (a session's end, a crash) resumes
    where it stopped and never reuses a run made with other settings. Reading the snapshot
    back fills fields added to the config since the run with their defaults, which by the
    project's rule reproduce the earlier behaviour; a snapshot that no longer validates is
    not reused.
    """
    metrics_file = out / "metrics.json"
    if not (metrics_file.is_file() and (out / PREDICTIONS_FILE).is_file() and _same_config(cfg_dict, out)):
        return None
    return json.loads(metrics_file.read_text())


def _same_config(cfg_dict: dict[str, Any], out: Path) -> bool:
    """Whether ``out/config.yaml``, read back as a config (newer fields at their defaults), is the experiment of
    ``cfg_dict`` (:func:`fopro_kd.config.experiment_settings`: same settings and files, caches anywhere)."""
    config_file = out / "config.yaml"
    if not config_file.is_file():
        return False
    try:
        saved = config_from_dict(yaml.safe_load(config_file.read_text()) or {}, str(config_file)).to_dict()
    except ConfigError:
        return False
    return experiment_settings(saved) == experiment_settings(config_from_dict(cfg_dict).to_dict())


def resumable_federation(cfg_dict: dict[str, Any], out: Path) -> bool:
    """A federated run stopped in ``out`` (no ``metrics.json``) with exactly this config and a server checkpoint.

    ``--skip-finished --federated`` continues it from its last complete round (``fopro-kd
    simulate --resume``) instead of failing on a directory that holds another run's checkpoints,
    so a queue of federations longer than one session resumes at round granularity.
    """
    if (out / "metrics.json").is_file() or not _same_config(cfg_dict, out):
        return False
    from fopro_kd.run_dir import RunDir
    from server.checkpoints import ServerCheckpointStore  # the federated path only: Flower is imported here

    return bool(ServerCheckpointStore(RunDir(out)).checkpoints())


def _run_variant(config: str, overrides: list[str], out: Path, splits, federated: bool,
                 skip_finished: bool = False) -> dict:
    cfg = load_config(config, overrides)
    metrics = finished_run_metrics(cfg.to_dict(), out) if skip_finished else None
    if metrics is not None:
        logging.getLogger("fopro_kd").info("%s: finished with this config, reused (--skip-finished)", out)
    elif not federated:  # a run stopped with this config continues after its last epoch (resume_state.pt)
        metrics = train_single_site(cfg, out, progress=False, splits=splits,
                                    resume=skip_finished and _same_config(cfg.to_dict(), out))
    else:
        from simulations.simulate import run_simulation_from_config

        resume = skip_finished and resumable_federation(cfg.to_dict(), out)
        if resume:
            logging.getLogger("fopro_kd").info("%s: stopped with this config, resumed (--skip-finished)", out)
        status = run_simulation_from_config(cfg, out_dir=None if resume else str(out),
                                            resume_dir=out if resume else None)
        if status:
            raise RuntimeError(f"simulation {out} ended with status {status}")
        metrics = json.loads((out / "metrics.json").read_text())
    if not federated:
        return {**metrics, "seconds": metrics["mean_epoch_seconds"]}
    return {**metrics, "seconds": metrics["mean_round_seconds"], "best_epoch": metrics["best_round"]}


def run_benchmark(
    config: str,
    out: Path,
    methods: list[str],
    seeds: list[int],
    overrides: list[str],
    federated: bool = False,
    *,
    reference: str | None = None,
    folds: int | None = None,
    rare_classes: Sequence[str] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    skip_finished: bool = False,
    archive: Path | None = None,
) -> dict[str, Any]:
    """Run every variant x seed (x fold), then the per-variant summary and the paired statistics.

    ``skip_finished``: a run directory that already holds a finished run with exactly the
    config it would get is reused instead of retrained (:func:`finished_run_metrics`).

    ``archive`` (single site, with ``skip_finished``): a folder of committed runs
    (:mod:`simulations.archive_runs`) that the queue grows run by run: a run archived there is copied
    into ``out`` before its turn (and reused when its config is the one it would get), and every run
    is archived as soon as it finishes, so a session stopped mid-queue loses at most the run in progress.

    Returns the content of ``results.json`` (``rows``, ``summary``, ``paired`` and the settings).
    Bad arguments, configs and rare-class names raise ``ValueError`` / ``ConfigError`` before
    the first run trains.
    """
    out = Path(out)
    variants = check_arguments(methods, seeds, reference, folds, federated)
    if archive is not None and (federated or not skip_finished):
        raise ValueError("--archive needs --skip-finished (archived runs are reused as finished runs) and a "
                         "single-site queue (a federation's run directory is not archived)")
    if n_boot < 1:
        raise ValueError(f"--bootstrap must be >= 1 resamples, got {n_boot}")
    reference = reference or methods[0]
    fold_list: list[int | None] = list(range(folds)) if folds else [None]

    def fold_overrides(fold: int | None) -> list[str]:
        return [] if fold is None else ["split.mode=kfold", f"split.folds={folds}", f"split.fold={fold}"]

    base = load_config(config, overrides + fold_overrides(fold_list[0]))
    own_data = set()  # variants whose overrides change data.* / split.*: they build their own split
    for method, extra in variants.items():  # every variant's config is valid (fails before any training)
        cfg = load_config(config, overrides + fold_overrides(fold_list[0]) + extra).to_dict()
        if (cfg["data"], cfg["split"]) != (base.to_dict()["data"], base.to_dict()["split"]):
            own_data.add(method)
    first_splits = build_splits(base)
    class_names = list(first_splits.class_names)
    rare = resolve_rare_classes(rare_classes, class_names, first_splits.train.class_counts())
    if federated:
        first_splits = None  # the simulation builds its own; do not hold a second copy of the images
    settings = {
        "reference": reference, "seeds": list(seeds), "folds": folds, "federated": federated,
        "rare_classes": [class_names[c] for c in rare], "n_boot": n_boot,
        "run_seed": "seed" if folds is None else f"seed * {FOLD_SEED_STRIDE} + fold",
    }
    logger = logging.getLogger("fopro_kd")
    rows: list[dict[str, Any]] = []
    predictions: dict[tuple[str, int], list[Predictions]] = {}
    last_predictions: dict[tuple[str, int], list[Predictions]] = {}  # the last epoch's / round's models
    curves: dict[str, dict[str, Path]] = {}  # federated: "-seed<s>[-fold<f>]" -> {variant: run dir}
    for fold in fold_list:
        # one split per fold, shared by every seed and single-site variant (it depends on split.seed only;
        # federated runs rebuild it in the simulation)
        splits = None
        if not federated:
            splits = first_splits if fold == fold_list[0] else build_splits(
                load_config(config, overrides + fold_overrides(fold)))
            first_splits = None  # at most one fold's images in memory
        for seed in seeds:
            for method, extra in variants.items():
                suffix = f"-seed{seed}" + ("" if fold is None else f"-fold{fold}")
                name = method + suffix
                seed_override = [f"seed={run_seed(seed, fold)}"]
                if archive is not None:
                    restore_archived_run(Path(archive), out / name)
                metrics = _run_variant(config, overrides + fold_overrides(fold) + seed_override + extra,
                                       out / name, None if method in own_data else splits, federated,
                                       skip_finished)
                if archive is not None:
                    archive_runs([out / name], Path(archive))
                pred = load_predictions(out / name)
                predictions.setdefault((method, seed), []).append(pred)
                if (out / name / LAST_PREDICTIONS_FILE).is_file():
                    last_predictions.setdefault((method, seed), []).append(load_predictions(out / name, "last"))
                rows.append({
                    "method": method, "seed": seed, "fold": fold, "run_seed": run_seed(seed, fold),
                    "balanced_accuracy": metrics["balanced_accuracy"], "few_shot": metrics["few_shot"],
                    "medium_shot": metrics["medium_shot"], "many_shot": metrics["many_shot"],
                    "rare_recall": mean_recall(pred.labels, pred.predicted, rare),
                    "macro_f1": metrics["macro_f1"], "seconds_per_epoch": metrics["seconds"],
                    "best_epoch": metrics["best_epoch"],
                    "outside_training_share": metrics.get("mean_outside_training_share"),
                })
                logger.info("%s: bACC %.4f", name, metrics["balanced_accuracy"])
                _write(out, {**settings, "rows": rows})
                if federated:  # every federation of this seed so far, per round on one axis
                    done = curves.setdefault(suffix, {})
                    done[method] = out / name
                    write_round_curves(done, [str(pred.class_names[i]) for i in rare], out / f"rounds{suffix}")
    results = {**settings, "rows": rows, **paired_statistics(predictions, list(methods), list(seeds), reference,
                                                              rare, n_boot)}
    if sum(len(p) for p in last_predictions.values()) == len(rows):  # every run has its last model's predictions
        results["last_model"] = paired_statistics(last_predictions, list(methods), list(seeds), reference, rare,
                                                  n_boot)
    _write(out, results)
    return results


def paired_statistics(
    predictions: dict[tuple[str, int], list[Predictions]],
    methods: list[str],
    seeds: list[int],
    reference: str,
    rare: list[int],
    n_boot: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
    kfold: int | None = None,
) -> dict[str, Any]:
    """``summary`` and ``paired`` blocks from each (variant, seed)'s test predictions (folds pooled).

    ``summary.<v>.<m>``: mean and standard deviation (ddof 1; ``None`` for one seed) over seeds
    of the metric on the pooled predictions. ``paired.<v>.<m>`` (every variant but the
    reference): :func:`fopro_kd.stats.paired_bootstrap` against the reference; the
    seeds-and-images interval from two seeds on, or with k folds the corrected resampled t
    interval over the per-fold differences (:func:`fopro_kd.stats.fold_t_interval`, also
    ``per_fold``); ``within_noise`` from the widest interval available (:func:`noise_verdict`).
    ``kfold``: the K of the cross-validation the folds come from, for the interval's overlap
    correction; default the number of folds given (a complete cross-validation). Fewer folds
    than K (folds gathered while the rest still run) pool the images those folds tested.
    """
    folds = len(next(iter(predictions.values())))
    if any(len(parts) != folds for parts in predictions.values()):
        raise ValueError("every (variant, seed) needs the same number of folds")
    kfold = folds if kfold is None else kfold
    if kfold < folds:
        raise ValueError(f"{folds} folds given for a {kfold}-fold cross-validation")
    pooled = {key: pool_predictions(parts) for key, parts in predictions.items()}
    anchor = pooled[(reference, seeds[0])]
    try:
        pooled = {key: align_predictions(anchor, p) for key, p in pooled.items()}
    except ValueError as exc:
        raise ValueError(f"the runs cannot be paired: {exc}") from exc
    labels = anchor.labels
    predicted = {m: np.stack([pooled[(m, s)].predicted for s in seeds]) for m in methods}
    metric_fns = metric_fns_of(rare)
    summary: dict[str, Any] = {}
    for m in methods:
        summary[m] = {}
        for metric, fn in metric_fns.items():
            values = [fn(labels, row) for row in predicted[m]]
            summary[m][metric] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "per_seed": [float(v) for v in values],
            }
    paired: dict[str, Any] = {}
    for m in methods:
        if m == reference:
            continue
        paired[m] = {}
        for metric in METRICS:
            result = paired_bootstrap(labels, predicted[reference], predicted[m],
                                      classes=None if metric == "balanced_accuracy" else rare,
                                      n_boot=n_boot, seed=bootstrap_seed)
            if folds > 1:  # k-fold: the per-fold differences carry the training noise
                per_fold = _per_fold_differences(predictions, m, reference, seeds, metric_fns[metric])
                result = {**result, **fold_t_interval(per_fold, result["mean_diff"], kfold), "per_fold": per_fold}
            paired[m][metric] = {
                **{k: result[k] for k in ("mean_diff", "ci95_low", "ci95_high", "per_seed", "seed_sd", "image_se",
                                          "ci95_total_low", "ci95_total_high")},
                **({"per_fold": result["per_fold"]} if "per_fold" in result else {}),
                **noise_verdict(result),
            }
    return {"n_test": int(len(labels)), "summary": summary, "paired": paired}


def metric_fns_of(rare: list[int]) -> dict[str, Any]:
    """``metric name -> f(labels, predicted)`` for :data:`METRICS`."""
    return {"balanced_accuracy": balanced_accuracy, "rare_recall": lambda y, p: mean_recall(y, p, rare)}


def _per_fold_differences(predictions: dict[tuple[str, int], list[Predictions]], method: str, reference: str,
                          seeds: list[int], metric) -> list[float]:
    """metric(method) − metric(reference) on each fold's own test images, for every seed (J = folds × seeds)."""
    diffs = []
    for s in seeds:
        for ref_fold, var_fold in zip(predictions[(reference, s)], predictions[(method, s)]):
            var_fold = align_predictions(ref_fold, var_fold)
            diffs.append(float(metric(ref_fold.labels, var_fold.predicted) - metric(ref_fold.labels,
                                                                                     ref_fold.predicted)))
    return diffs


def noise_verdict(result: dict[str, Any]) -> dict[str, Any]:
    """``within_noise`` from the widest interval the seeds allow, and which one it was.

    From two seeds on the verdict reads the seeds-and-images interval
    (:func:`fopro_kd.stats.seed_and_image_interval`): a difference is resolved only when it
    exceeds the training noise as well as the test-image noise. With one seed only the image
    interval exists, and ``interval`` says so (the project's rule asks for >= 3 seeds anyway).
    With k folds it reads the fold interval (``interval: "folds"``) *and* the image interval: a
    difference is resolved only when both exclude 0. Why both: the fold interval's width comes
    from the spread of J per-fold differences, and with few folds that spread can be small by
    chance (two folds of HAM10000 once differed by −1.4 and −1.4 points, giving [−1.9, −0.9]
    while the test-image bootstrap alone gave [−3.2, +0.5]); the seeds-and-images interval
    cannot be narrower than the image one, the fold interval can.
    ``within_image_noise`` keeps the image-only verdict for comparison.
    """
    within_images = bool(result["ci95_low"] <= 0.0 <= result["ci95_high"])
    if result.get("ci95_total_low") is None:
        return {"within_noise": within_images, "within_image_noise": within_images, "interval": "images"}
    within_total = bool(result["ci95_total_low"] <= 0.0 <= result["ci95_total_high"])
    if "per_fold" in result:
        return {"within_noise": within_total or within_images, "within_image_noise": within_images,
                "interval": "folds"}
    return {"within_noise": within_total, "within_image_noise": within_images, "interval": "seeds+images"}


def _write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    rows = results["rows"]
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Per variant: bACC and rare recall (mean ± std over seeds, %), paired difference to the reference, time."""
    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary, paired = results.get("summary", {}), results.get("paired", {})
    reference = results.get("reference", methods[0])
    rare = ",".join(results.get("rare_classes", []))
    pooled = f", {results['folds']}-fold pooled" if results.get("folds") else ""
    done = results.get("folds_done")
    if results.get("folds") and done is not None and len(done) < results["folds"]:
        pooled = f", folds {','.join(map(str, done))} of {results['folds']} pooled (partial)"
    interval = ("corrected fold t interval from 2 folds on, test images only with 1 fold" if results.get("folds")
                else "seeds + test images from 2 seeds on, test images only with 1 seed")
    width = max([24] + [len(m) for m in methods])
    lines = [
        f"{len(results.get('seeds', []))} seed(s){pooled}, {results.get('n_test', '?')} test images; rare = {rare}; "
        f"differences vs {reference!r} in points, paired 95% interval ({interval})",
        f"{'variant':<{width}} {'bACC':>12} {'rare':>12} {'d bACC [95% CI]':>28} {'d rare [95% CI]':>28} "
        f"{'s/unit':>8} {'rel.time':>8}",
    ]
    base_time = None
    for method in methods:
        times = [r["seconds_per_epoch"] for r in rows if r["method"] == method and r["seconds_per_epoch"] is not None]
        seconds = sum(times) / len(times) if times else float("nan")
        base_time = base_time or seconds
        cells = []
        for metric in METRICS:
            s = summary.get(method, {}).get(metric, {})
            std = s.get("std")
            cells.append(f"{_pct(s.get('mean'))}" + ("" if std is None else f" ± {_pct(std)}"))
        deltas = []
        for metric in METRICS:
            if method == reference:
                deltas.append("(reference)")
                continue
            d = paired.get(method, {}).get(metric)
            if d is None:
                deltas.append("-")
                continue
            low, high = (d["ci95_total_low"], d["ci95_total_high"]) if d.get("ci95_total_low") is not None else (
                d["ci95_low"], d["ci95_high"])
            text = f"{_pct(d['mean_diff'], True)} [{_pct(low, True)}, {_pct(high, True)}]"
            deltas.append(text + (" within noise" if d["within_noise"] else ""))
        lines.append(
            f"{method:<{width}} {cells[0]:>12} {cells[1]:>12} {deltas[0]:>28} {deltas[1]:>28} "
            f"{seconds:8.1f} {seconds / base_time:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=["bsm", "ekd", "fopro-kd", "fopro-kd+akd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="repeats (distinct run seeds)")
    parser.add_argument("--reference", help="variant the others are compared with (default: the first of --methods)")
    parser.add_argument("--folds", type=int, help="k-fold cross-validation: run every fold 0..K-1 (split.mode=kfold)")
    parser.add_argument("--rare-classes", nargs="+", help="class names of the rare-recall metric "
                        f"(default: the {RARE_DEFAULT} rarest training classes)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples B")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--federated", action="store_true", help="variants are STRATEGY+METHOD simulations")
    parser.add_argument("--skip-finished", action="store_true",
                        help="reuse runs already finished in --out with the same config (resume a stopped queue)")
    parser.add_argument("--archive", type=Path,
                        help="with --skip-finished: reuse the runs archived in this folder and archive each run "
                        "as soon as it finishes (a queue that grows over sessions)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        results = run_benchmark(args.config, Path(args.out), args.methods, args.seeds, args.overrides,
                                args.federated, reference=args.reference, folds=args.folds,
                                rare_classes=args.rare_classes, n_boot=args.bootstrap,
                                skip_finished=args.skip_finished, archive=args.archive)
    except ValueError as exc:  # ConfigError included: bad input, reported before training
        print(f"benchmark_methods: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if "last_model" in results:
        print("\nlast epoch / round (no model selection):")
        print(format_table({**results, **results["last_model"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
