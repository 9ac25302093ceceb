"""Paired statistics over finished run directories: seeds gathered from several sessions or queues.

``simulations.benchmark_methods`` runs its variants and seeds itself. Long HAM10000 runs are
usually queued over several sessions, in different output folders, so this command takes the
finished run directories instead and computes the same summary and paired intervals
(:func:`simulations.benchmark_methods.paired_statistics`)::

    python -m simulations.compare_runs \\
        --variant ekd=runs/ham/ekd-s0,runs/ham-seeds/ekd-seed1,runs/ham-seeds2/ekd-seed2 \\
        --variant fopro=runs/ham/fopro-s0,runs/ham-seeds/fopro-seed1,runs/ham-seeds2/fopro-seed2 \\
        --reference ekd --rare-classes df vasc akiec --out runs/ham-compare.json

The i-th directory of every variant is seed i's run: each must hold ``predictions_test.npz``
and ``config.yaml``, the i-th runs of all variants must have the same ``seed`` (the pairing),
and every run must be tested on the same images. Any of these failing is one error that
names the directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from fopro_kd.stats import DEFAULT_BOOTSTRAP, MODEL_CHOICES, balanced_accuracy, load_predictions, mean_recall
from simulations.benchmark_methods import format_table, paired_statistics, resolve_rare_classes


def parse_variant(text: str) -> tuple[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` -> (name, directories)."""
    name, sep, dirs = text.partition("=")
    if not sep or not name or not dirs:
        raise ValueError(f"--variant {text!r}: expected NAME=DIR[,DIR...]")
    return name, [Path(d) for d in dirs.split(",") if d]


def _run_seed(run: Path) -> int:
    config = run / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{run}: no config.yaml (not a run directory)")
    return int(yaml.safe_load(config.read_text())["seed"])


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
        raise ValueError(f"every variant needs the same number of runs (one per seed), got {counts}")
    seeds_of = {m: [_run_seed(d) for d in dirs] for m, dirs in variants.items()}
    seeds = seeds_of[reference]
    for m, own in seeds_of.items():
        for i, (s, r) in enumerate(zip(own, seeds)):
            if s != r:
                raise ValueError(f"{variants[m][i]}: seed {s}, but the reference's run {i} "
                                 f"({variants[reference][i]}) has seed {r}: the runs are not paired")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat within a variant: {seeds}")
    predictions = {}
    for m, dirs in variants.items():
        for s, d in zip(seeds, dirs):
            predictions[(m, s)] = [load_predictions(d, model)]
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
    for m, dirs in variants.items():
        for s, d in zip(seeds, dirs):
            pred, done = predictions[(m, s)][0], run_metrics[d]
            rows.append({
                "method": m, "seed": s, "run": str(d),
                "balanced_accuracy": balanced_accuracy(pred.labels, pred.predicted),
                "rare_recall": mean_recall(pred.labels, pred.predicted, rare),
                "seconds_per_epoch": done.get("mean_epoch_seconds", done.get("mean_round_seconds")),
            })
    try:
        stats = paired_statistics(predictions, methods, seeds, reference, rare, n_boot)
    except ValueError as exc:
        raise ValueError(f"{exc} (runs: {[str(d) for dirs in variants.values() for d in dirs]})") from exc
    return {"reference": reference, "seeds": seeds, "folds": None, "rare_classes": [class_names[c] for c in rare],
            "model": model, "n_boot": n_boot, "rows": rows, **stats}


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
