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

Like with like: every run's test set is fingerprinted (:func:`fopro_kd.run_report.test_fingerprint`:
the sorted test image ids and labels of ``predictions_test.npz``, else the data kind, class names and
per-class test counts of the data summary). Runs whose fingerprints or class lists differ are
refused by ``fopro-kd report`` (``--allow-mixed`` prints the table under a warning instead).
Runs are named by their path relative to the runs' common folder (``a/demo``, ``b/demo``), the
test size and chance level (1 / C) are printed under the table, and ``--format markdown|csv``
writes the tables for documents and spreadsheets.

Part of the library (it was ``simulations/report.py``): it reads run directories with numpy,
YAML and :mod:`fopro_kd.stats` only, never Flower, so ``fopro_kd/cli.py`` can offer ``report``
without importing the simulation layer.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MixedRunsError", "check_same_test_set", "format_rows", "load_run", "paired_report_rows", "print_report",
           "report_rows", "format_table", "run_names"]


class MixedRunsError(ValueError):
    """The runs given to ``fopro-kd report`` were not scored on the same data set / test split."""

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


def run_names(run_dirs: list[Path]) -> list[str]:
    """Unique display names: each run's path relative to the runs' common folder (``a/demo``, ``b/demo``).

    One run is named by its folder name; a run that *is* the common folder by its own name too.
    """
    resolved = [Path(d).resolve() for d in run_dirs]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath([str(p) for p in resolved]))
    names = [str(p.relative_to(common)) if p != common else p.name for p in resolved]
    return [n if n not in ("", ".") else p.name for n, p in zip(names, resolved)]


def report_rows(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of strings per run (federated runs show their strategy, single-site runs ``single-site``).

    ``tail`` and ``test n`` columns appear when a run's metrics carry them (runs before they existed do not).
    """
    runs = [(Path(d), load_run(Path(d))) for d in run_dirs]
    names = run_names([d for d, _ in runs])
    classes: list[str] = []
    for _, metrics in runs:
        classes.extend(c for c in (metrics.get("per_class_recall") or {}) if c not in classes)
    summary = list(_SUMMARY)
    if any("tail" in m for _, m in runs):
        summary.append(("tail", "tail"))
    with_n = any(isinstance(m.get("num_samples"), int) for _, m in runs)
    header = ["run", "strategy", "method", "round/epoch", *(["test n"] if with_n else []),
              *(name for name, _ in summary), *classes]
    rows = []
    for name, (run_dir, m) in zip(names, runs):
        federated = "strategy" in m
        strategy = m["strategy"] + (f" ({m['fedmas_rule']})" if m.get("fedmas_rule") else "") if federated else "single-site"
        best = m.get("best_round") if federated else m.get("best_epoch")
        recall = m.get("per_class_recall") or {}
        rows.append([
            name, strategy, str(m.get("method") or "-"), "-" if best is None else str(best),
            *([str(m.get("num_samples", "-"))] if with_n else []),
            *(_percent(m.get(key)) for _, key in summary),
            *(_percent(recall.get(c)) for c in classes),
        ])
    return header, rows


def format_rows(header: list[str], rows: list[list[str]], fmt: str = "text") -> str:
    """The table as aligned ``text``, a ``markdown`` pipe table or ``csv``."""
    if fmt == "markdown":
        escape = lambda c: str(c).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(escape(h) for h in header) + " |",
                 "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"]
        lines.extend("| " + " | ".join(escape(c) for c in r) + " |" for r in rows)
        return "\n".join(lines)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    if fmt != "text":
        raise ValueError(f"--format must be text, markdown or csv, got {fmt!r}")
    return format_table(header, rows)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in rows)
    return "\n".join(lines)


def _rare_of(first: Path, class_names: list[str], names: list[str] | None) -> list[int]:
    """Rare classes: ``names``, else the first run's ``tail_classes``, else its 3 rarest training classes."""
    from fopro_kd.stats import rarest_classes

    if names:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise ValueError(f"--rare-classes: unknown class(es) {unknown}; the runs have {class_names}")
        return [class_names.index(n) for n in names]
    metrics = load_run(first)
    tail = metrics.get("tail_classes")
    if isinstance(tail, list) and tail and all(n in class_names for n in tail):
        return [class_names.index(n) for n in tail]  # the run's own tail group (metrics.tail_classes)
    counts = metrics.get("train_counts") or {}
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
    label = dict(zip(dirs, run_names(dirs)))
    if not (dirs[0] / PREDICTIONS_FILE).is_file():
        return header, [], [f"{label[dirs[0]]}: no {PREDICTIONS_FILE}; no paired comparison"]
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
            notes.append(f"{label[run_dir]}: no {PREDICTIONS_FILE} (run before it was written?)")
            continue
        try:
            other = align_predictions(anchor, load_predictions(run_dir))
        except ValueError as exc:
            notes.append(f"{label[run_dir]}: not paired with {label[dirs[0]]} ({exc})")
            continue
        boot = dict(n_boot=n_boot or DEFAULT_BOOTSTRAP, seed=0)
        bacc = paired_bootstrap(anchor.labels, anchor.predicted, other.predicted, **boot)
        cells = [label[run_dir], label[dirs[0]], f"{100 * bacc['mean_diff']:+.1f}", interval(bacc)]
        if rare:
            rr = paired_bootstrap(anchor.labels, anchor.predicted, other.predicted, classes=rare, **boot)
            cells += [f"{100 * rr['mean_diff']:+.1f}", interval(rr)]
        else:
            cells += ["-", "-"]
        rows.append(cells)
    return header, rows, notes


def check_same_test_set(run_dirs: list[Path]) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: why the runs are not comparable (empty when they are), and what was checked.

    Compared, in this order: the class lists of ``metrics.json``; the test-image fingerprints of
    ``predictions_test.npz`` when every run has one; else the data-summary fingerprints (data kind,
    class names, test counts per class) when every run has one. Runs with neither cannot be checked
    (a note says so; not a refusal, older runs lack both files).
    """
    from fopro_kd.run_report import test_fingerprint

    dirs = [Path(d) for d in run_dirs]
    names = run_names(dirs)
    metrics = [load_run(d) for d in dirs]
    prints = [test_fingerprint(d) for d in dirs]
    problems: list[str] = []
    classes = [list((m.get("per_class_recall") or {})) for m in metrics]
    if any(c and classes[0] and c != classes[0] for c in classes[1:]):
        problems.append("the runs have different classes: " + "; ".join(
            f"{n}: {', '.join(c) or '?'}" for n, c in zip(names, classes)))
    if all(p["kind"] == "ids" for p in prints):
        key, what = "value", "test images (ids and labels of predictions_test.npz)"
    elif all(p.get("counts_value") for p in prints):
        key, what = "counts_value", "data set and per-class test counts (data summary)"
    else:
        missing = [n for n, p in zip(names, prints) if p["kind"] == "none"]
        return problems, [f"cannot check that the runs share a test set: no predictions_test.npz or data summary in "
                          f"{', '.join(missing) or 'some runs'}"]
    values = [p[key] for p in prints]
    if len(set(values)) > 1:
        problems.append(f"the runs were not scored on the same {what}: " + "; ".join(
            f"{n}: {v} (n={p['n']})" for n, v, p in zip(names, values, prints)))
    return problems, [f"all runs share the same {what} (fingerprint {values[0]})"] if not problems else []


def _test_set_line(run_dirs: list[Path]) -> str:
    """``test set: n = 400 images, 8 classes, chance level 12.5%`` (per run when they differ)."""
    names = run_names(run_dirs)
    parts = []
    for name, run_dir in zip(names, run_dirs):
        m = load_run(run_dir)
        classes = len(m.get("per_class_recall") or {})
        n = m.get("num_samples")
        chance = f"{100 / classes:.1f}%" if classes else "?"
        parts.append((name, f"n = {n if n is not None else '?'} images, {classes or '?'} classes, chance level "
                            f"(balanced accuracy of a constant guess, 1/C) {chance}"))
    if len({text for _, text in parts}) == 1:
        return "test set: " + parts[0][1]
    return "test sets: " + "; ".join(f"{name}: {text}" for name, text in parts)


def print_report(
    run_dirs: list[Path], rare_classes: list[str] | None = None, fmt: str = "text", allow_mixed: bool = True,
) -> None:
    """Print the side-by-side table of ``run_dirs`` (test metrics of each run's selected model, in %),
    then the test size and chance level, then the paired differences to the first run where the runs
    share a test set.

    Runs on different data sets or test splits (:func:`check_same_test_set`) raise
    :class:`MixedRunsError` unless ``allow_mixed`` (then a warning heads the output and goes to
    stderr). The library default is ``allow_mixed=True`` (warn); ``fopro-kd report`` refuses unless
    given ``--allow-mixed``.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    run_dirs = [Path(d) for d in run_dirs]
    header, rows = report_rows(run_dirs)
    problems, checked = check_same_test_set(run_dirs) if len(run_dirs) > 1 else ([], [])
    if problems and not allow_mixed:
        raise MixedRunsError("refusing to compare runs on different data: " + " | ".join(problems)
                             + " (pass --allow-mixed to print the table anyway)")
    for problem in problems:
        warning = f"WARNING: NOT LIKE WITH LIKE: {problem}"
        print(warning, file=sys.stderr)
        if fmt == "text":
            print(warning)
        elif fmt == "markdown":  # the document keeps the warning too
            print(f"> **Warning: not like with like**: {problem}\n")
    if fmt == "text":
        print("test metrics of the model selected on validation (%; per-class columns = recall)")
    elif fmt == "markdown":
        print("Test metrics of the model selected on validation (%; per-class columns = recall)\n")
    print(format_rows(header, rows, fmt))
    notes_out = sys.stdout if fmt != "csv" else sys.stderr
    bullet = "- " if fmt == "markdown" else "  "
    if fmt == "markdown":
        print()
    print(f"{bullet}{_test_set_line(run_dirs)}", file=notes_out)
    for note in checked:
        print(f"{bullet}{note}", file=notes_out)
    if len(run_dirs) < 2:
        return
    header, rows, notes = paired_report_rows(run_dirs, rare_classes)
    if rows:
        print()
        title = "paired difference to the first run (points; paired bootstrap 95% interval over test images)"
        print(title if fmt != "markdown" else title[0].upper() + title[1:] + "\n")
        print(format_rows(header, rows, fmt))
    if fmt == "markdown" and notes:
        print()
    for note in notes:
        print(f"{bullet}{note}", file=notes_out)
