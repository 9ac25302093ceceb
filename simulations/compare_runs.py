"""Paired statistics over finished run directories: seeds gathered from several sessions or queues.

``simulations.benchmark_methods`` runs its variants and seeds itself. Long HAM10000 runs are
usually queued over several sessions, in different output folders, so this command takes the
finished run directories instead and computes the same summary and paired intervals
(:func:`simulations.benchmark_methods.paired_statistics`)::

    python -m simulations.compare_runs \\
        --variant ekd=runs/ham/ekd-s0,runs/ham-seeds/ekd-seed1,runs/ham-seeds2/ekd-seed2 \\
        --variant fopro=runs/ham/fopro-s0,runs/ham-seeds/fopro-seed1,runs/ham-seeds2/fopro-seed2 \\
        --reference ekd --rare-classes df vasc akiec --out runs/ham-compare.json \\
        --plot runs/ham-compare.png

The i-th directory of every variant is seed i's run: each must hold ``predictions_test.npz``
and ``config.yaml``, the i-th runs of all variants must have the same ``seed`` (the pairing),
and every run must be tested on the same images. Any of these failing is one error that
names the directory. ``--plot`` draws the paired differences as a forest plot (one row per
variant, a line at 0; :func:`fopro_kd.plots.plot_paired_differences`).

Folds of a k-fold cross-validation (runs with ``split.mode: kfold``, e.g. a
``benchmark_methods --folds K`` queue's ``VARIANT-seedS-foldF`` folders) are grouped by their
repeat and pooled, as ``benchmark_methods`` does: every variant must hold the same folds of
the same repeats, in any order. Fewer folds than K are allowed, so a cross-validation that runs
over several sessions can be read while its last folds still train: the pooled images are then
the tested folds' only, and the table says "partial".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fopro_kd.plots import plot_paired_differences
from fopro_kd.seeding import FOLD_SEED_STRIDE
from fopro_kd.stats import DEFAULT_BOOTSTRAP, MODEL_CHOICES, balanced_accuracy, load_predictions, mean_recall
from simulations.benchmark_methods import format_table, paired_statistics, resolve_rare_classes


def parse_variant(text: str) -> tuple[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` -> (name, directories)."""
    name, sep, dirs = text.partition("=")
    if not sep or not name or not dirs:
        raise ValueError(f"--variant {text!r}: expected NAME=DIR[,DIR...]")
    return name, [Path(d) for d in dirs.split(",") if d]


@dataclass(frozen=True)
class RunIdentity:
    """Where a finished run sits in a comparison: its repeat (seed) and, for k-fold runs, its fold."""

    seed: int
    fold: int | None = None
    folds: int | None = None
    split_seed: int | None = None


def _run_identity(run: Path) -> RunIdentity:
    """Read from ``run/config.yaml``: a k-fold run's repeat is its run seed // FOLD_SEED_STRIDE
    (:func:`fopro_kd.seeding.fold_run_seed`)."""
    config = run / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{run}: no config.yaml (not a run directory)")
    cfg = yaml.safe_load(config.read_text())
    split = cfg.get("split") or {}
    if split.get("mode") != "kfold":
        return RunIdentity(int(cfg["seed"]))
    fold = int(split["fold"])
    return RunIdentity(int(cfg["seed"]) // FOLD_SEED_STRIDE, fold, int(split["folds"]), split.get("seed"))


def _group_folds(variants: dict[str, list[Path]], identity: dict[Path, RunIdentity],
                 reference: str) -> tuple[dict[str, dict[int, list[Path]]], int, list[int]]:
    """k-fold runs per variant as ``{repeat: [fold dirs in fold order]}``; the same folds of the same
    repeats for every variant (the pairing), one run per fold, one split; returns (groups, K, folds done)."""
    kinds = {(identity[d].folds, identity[d].split_seed) for dirs in variants.values() for d in dirs}
    if len(kinds) != 1:
        raise ValueError(f"the runs come from different k-fold splits (folds, split.seed): {sorted(kinds, key=str)}")
    groups: dict[str, dict[int, list[Path]]] = {}
    layout: dict[str, list[tuple[int, int]]] = {}
    for m, dirs in variants.items():
        by_key: dict[tuple[int, int], Path] = {}
        for d in dirs:
            key = (identity[d].seed, identity[d].fold)
            if key in by_key:
                raise ValueError(f"{d}: seed {key[0]} fold {key[1]} already given for {m!r} by {by_key[key]}")
            by_key[key] = d
        layout[m] = sorted(by_key)
        groups[m] = {}
        for key in layout[m]:
            groups[m].setdefault(key[0], []).append(by_key[key])
    for m, keys in layout.items():
        if keys != layout[reference]:
            missing = sorted(set(layout[reference]) ^ set(keys))
            raise ValueError(f"variant {m!r} and the reference {reference!r} do not hold the same (seed, fold) runs: "
                             f"they differ in {missing}; the folds are not paired")
    folds_done = sorted({f for _, f in layout[reference]})
    per_seed = {s: sorted(f for s2, f in layout[reference] if s2 == s) for s, _ in layout[reference]}
    if any(done != folds_done for done in per_seed.values()):
        raise ValueError(f"every seed needs the same folds, got {per_seed}")
    return groups, int(next(iter(kinds))[0]), folds_done


def compare_runs(
    variants: dict[str, list[Path]],
    reference: str | None = None,
    rare_classes: list[str] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    model: str = "selected",
) -> dict[str, Any]:
    """Summary and paired blocks (as ``benchmark_methods``'s ``results.json``) for finished runs.

    ``model``: ``selected`` compares the models chosen on the validation split, ``last`` the last epoch's
    or round's (a fixed budget: no selection noise, :data:`fopro_kd.stats.MODEL_CHOICES`).
    """
    if len(variants) < 2:
        raise ValueError("compare_runs needs at least two --variant (a reference and one to compare)")
    methods = list(variants)
    reference = reference or methods[0]
    if reference not in variants:
        raise ValueError(f"--reference {reference!r} is not one of the variants {methods}")
    counts = {m: len(d) for m, d in variants.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every variant needs the same number of runs (one per seed, or per seed and fold), "
                         f"got {counts}")
    identity = {d: _run_identity(d) for dirs in variants.values() for d in dirs}
    kfold_runs = {d for d, who in identity.items() if who.fold is not None}
    if kfold_runs and len(kfold_runs) != len(identity):
        raise ValueError(f"k-fold runs ({sorted(map(str, kfold_runs))[0]}, ...) mixed with runs on one split "
                         f"({sorted(str(d) for d in identity if d not in kfold_runs)[0]}, ...): they cannot be paired")
    kfold, folds_done = None, None
    if kfold_runs:
        groups, kfold, folds_done = _group_folds(variants, identity, reference)
        seeds = sorted(groups[reference])
        run_dirs = {(m, s): groups[m][s] for m in variants for s in seeds}
    else:
        seeds_of = {m: [identity[d].seed for d in dirs] for m, dirs in variants.items()}
        seeds = seeds_of[reference]
        for m, own in seeds_of.items():
            for i, (s, r) in enumerate(zip(own, seeds)):
                if s != r:
                    raise ValueError(f"{variants[m][i]}: seed {s}, but the reference's run {i} "
                                     f"({variants[reference][i]}) has seed {r}: the runs are not paired")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat within a variant: {seeds}")
        run_dirs = {(m, s): [d] for m, dirs in variants.items() for s, d in zip(seeds, dirs)}
    predictions = {key: [load_predictions(d, model) for d in dirs] for key, dirs in run_dirs.items()}
    run_metrics = {d: json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
                   for dirs in variants.values() for d in dirs}
    anchor_dir = variants[reference][0]
    metrics = run_metrics[anchor_dir]
    class_names = predictions[(reference, seeds[0])][0].class_names
    counts_train = metrics.get("train_counts")
    train_counts = [counts_train[c] for c in class_names] if isinstance(counts_train, dict) else counts_train
    if not rare_classes and train_counts is None:
        raise ValueError(f"{anchor_dir}: metrics.json has no train_counts; name the rare classes (--rare-classes)")
    rare = resolve_rare_classes(rare_classes, class_names, train_counts)
    rows = []
    for m in methods:
        for s in seeds:
            for d, pred in zip(run_dirs[(m, s)], predictions[(m, s)]):
                done = run_metrics[d]
                rows.append({
                    "method": m, "seed": s, "fold": identity[d].fold, "run": str(d),
                    "balanced_accuracy": balanced_accuracy(pred.labels, pred.predicted),
                    "rare_recall": mean_recall(pred.labels, pred.predicted, rare),
                    "seconds_per_epoch": done.get("mean_epoch_seconds", done.get("mean_round_seconds")),
                })
    try:
        stats = paired_statistics(predictions, methods, seeds, reference, rare, n_boot, kfold=kfold)
    except ValueError as exc:
        raise ValueError(f"{exc} (runs: {[str(d) for dirs in variants.values() for d in dirs]})") from exc
    return {"reference": reference, "seeds": seeds, "folds": kfold, "folds_done": folds_done,
            "rare_classes": [class_names[c] for c in rare], "model": model, "n_boot": n_boot, "rows": rows, **stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=DIR[,DIR...]",
                        help="a variant and its run directories, one per seed, in seed order (repeat per variant)")
    parser.add_argument("--reference", default=None, help="variant the others are compared with (default: the first)")
    parser.add_argument("--rare-classes", nargs="+", default=None, help="class names (default: 3 rarest in training)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples")
    parser.add_argument("--model", choices=sorted(MODEL_CHOICES), default="selected",
                        help="compare the validation-selected models (default) or the last epoch's / round's")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="draw the paired differences and their intervals as a PNG here (one row per variant)")
    args = parser.parse_args(argv)
    try:
        variants: dict[str, list[Path]] = {}
        for text in args.variant:
            name, dirs = parse_variant(text)
            if name in variants:
                raise ValueError(f"--variant {name!r} given twice")
            variants[name] = dirs
        results = compare_runs(variants, args.reference, args.rare_classes, args.bootstrap, args.model)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot_paired_differences(results["paired"], args.plot, results["reference"],
                                subtitle=_plot_subtitle(results))
    return 0


def _plot_subtitle(results: dict[str, Any]) -> str:
    """What the figure compares: the model read, the repeats, and the rare classes."""
    repeats = f"{len(results['seeds'])} seed(s)"
    if results.get("folds"):
        repeats += f" × {results['folds']} folds"
    return f"{results['model']} models, {repeats}; rare: {', '.join(results['rare_classes'])}"


if __name__ == "__main__":
    raise SystemExit(main())
