"""``fopro-kd report RUN_DIR...``: one side-by-side table of single-site and federated runs.

Reads each run's ``metrics.json`` (written by ``fopro-kd train`` or ``fopro-kd simulate``)
and prints strategy, method, global balanced accuracy, many/medium/few-shot recall and
the per-class recall of the reported (best-validation) model. Values are percentages;
``-`` marks a value that is undefined (e.g. no few-shot class in the test set).

When runs share a test set (the same test image ids in their ``predictions_test.npz``), a
second table gives each run's paired difference to the *first* run, for balanced accuracy and
the mean recall of the rare classes (default: the 3 rarest training classes of the first run),
with a paired, class-stratified bootstrap 95% interval over test images
(:func:`fopro_kd.stats.paired_bootstrap`; one seed per run here, the benchmark script pools
seeds). "within noise" marks an interval containing 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_run", "paired_report_rows", "print_report", "report_rows", "format_table"]

_SUMMARY = (("bACC", "balanced_accuracy"), ("many", "many_shot"), ("medium", "medium_shot"), ("few", "few_shot"))


def load_run(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a run, plus method/strategy from ``config.yaml`` when the metrics lack them."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (not a finished fopro-kd run directory?)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    metrics.setdefault("method", (config.get("train") or {}).get("method"))
    return metrics


def _percent(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * float(value):.1f}"


def report_rows(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of strings per run (federated runs show their strategy, single-site runs ``single-site``)."""
    runs = [(Path(d), load_run(Path(d))) for d in run_dirs]
    classes: list[str] = []
    for _, metrics in runs:
        classes.extend(c for c in (metrics.get("per_class_recall") or {}) if c not in classes)
    header = ["run", "strategy", "method", "round/epoch", *(name for name, _ in _SUMMARY), *classes]
    rows = []
    for run_dir, m in runs:
        federated = "strategy" in m
        strategy = m["strategy"] + (f" ({m['fedmas_rule']})" if m.get("fedmas_rule") else "") if federated else "single-site"
        best = m.get("best_round") if federated else m.get("best_epoch")
        recall = m.get("per_class_recall") or {}
        rows.append([
            run_dir.name, strategy, str(m.get("method") or "-"), "-" if best is None else str(best),
            *(_percent(m.get(key)) for _, key in _SUMMARY),
            *(_percent(recall.get(c)) for c in classes),
        ])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in rows)
    return "\n".join(lines)


def _rare_of(first: Path, class_names: list[str], names: list[str] | None) -> list[int]:
    """Rare classes: ``names``, or the 3 rarest training classes in the first run's ``metrics.json``."""
    from fopro_kd.stats import rarest_classes

    if names:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise ValueError(f"--rare-classes: unknown class(es) {unknown}; the runs have {class_names}")
        return [class_names.index(n) for n in names]
    counts = load_run(first).get("train_counts") or {}
    if not isinstance(counts, dict) or set(counts) != set(class_names):
        return []
    return rarest_classes([int(counts[c]) for c in class_names], 3)


def paired_report_rows(
    run_dirs: list[Path], rare_classes: list[str] | None = None, n_boot: int | None = None
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and notes of the paired comparison of each run with the first (shared test set only).

    Runs without ``predictions_test.npz`` or on other test images than the first are listed in
    the notes, not compared. No rows when the first run has no predictions.
    """
    from fopro_kd.stats import (
        DEFAULT_BOOTSTRAP, align_predictions, load_predictions, paired_bootstrap, PREDICTIONS_FILE,
    )

    header = ["run", "vs", "d bACC", "95% CI", "d rare", "95% CI"]
    dirs = [Path(d) for d in run_dirs]
    if not (dirs[0] / PREDICTIONS_FILE).is_file():
        return header, [], [f"{dirs[0].name}: no {PREDICTIONS_FILE}; no paired comparison"]
    anchor = load_predictions(dirs[0])
    rare = _rare_of(dirs[0], anchor.class_names, rare_classes)
    notes = [f"rare classes: {', '.join(anchor.class_names[c] for c in rare) or '-'}; "
             f"{len(anchor)} shared test images"]
    rows = []

    def interval(result: dict) -> str:
        text = f"[{100 * result['ci95_low']:+.1f}, {100 * result['ci95_high']:+.1f}]"
        return text + (" within noise" if result["ci95_low"] <= 0.0 <= result["ci95_high"] else "")

    for run_dir in dirs[1:]:
        if not (run_dir / PREDICTIONS_FILE).is_file():
            notes.append(f"{run_dir.name}: no {PREDICTIONS_FILE} (run before it was written?)")
            continue
        try:
            other = align_predictions(anchor, load_predictions(run_dir))
        except ValueError as exc:
            notes.append(f"{run_dir.name}: not paired with {dirs[0].name} ({exc})")
            continue
        boot = dict(n_boot=n_boot or DEFAULT_BOOTSTRAP, seed=0)
        bacc = paired_bootstrap(anchor.labels, anchor.predicted, other.predicted, **boot)
        cells = [run_dir.name, dirs[0].name, f"{100 * bacc['mean_diff']:+.1f}", interval(bacc)]
        if rare:
            rr = paired_bootstrap(anchor.labels, anchor.predicted, other.predicted, classes=rare, **boot)
            cells += [f"{100 * rr['mean_diff']:+.1f}", interval(rr)]
        else:
            cells += ["-", "-"]
        rows.append(cells)
    return header, rows, notes


def print_report(run_dirs: list[Path], rare_classes: list[str] | None = None) -> None:
    """Print the side-by-side table of ``run_dirs`` (test metrics of each run's selected model, in %),
    then the paired differences to the first run where the runs share a test set."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    header, rows = report_rows(run_dirs)
    print("test metrics of the model selected on validation (%; per-class columns = recall)")
    print(format_table(header, rows))
    if len(run_dirs) < 2:
        return
    header, rows, notes = paired_report_rows(run_dirs, rare_classes)
    if rows:
        print()
        print("paired difference to the first run (points; paired bootstrap 95% interval over test images)")
        print(format_table(header, rows))
    for note in notes:
        print(f"  {note}")
