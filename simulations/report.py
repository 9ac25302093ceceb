"""``fopro-kd report RUN_DIR...``: one side-by-side table of single-site and federated runs.

Reads each run's ``metrics.json`` (written by ``fopro-kd train`` or ``fopro-kd simulate``)
and prints strategy, method, global balanced accuracy, many/medium/few-shot recall and
the per-class recall of the reported (best-validation) model. Values are percentages;
``-`` marks a value that is undefined (e.g. no few-shot class in the test set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_run", "print_report", "report_rows", "format_table"]

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


def print_report(run_dirs: list[Path]) -> None:
    """Print the side-by-side table of ``run_dirs`` (test metrics of each run's selected model, in %)."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    header, rows = report_rows(run_dirs)
    print("test metrics of the model selected on validation (%; per-class columns = recall)")
    print(format_table(header, rows))
