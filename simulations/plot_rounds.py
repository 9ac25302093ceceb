"""Per-round curves of several federations side by side: global test balanced accuracy and rare-class recall.

Each federation's ``history.csv`` already holds, per round, the global model's test balanced
accuracy and per-class recall (``recall/<class>``); a comparison needs them on one axis. Usage::

    python -m simulations.plot_rounds --variant fedavg+bsm=runs/sim-ham-fed/fedavg+bsm-seed0 \\
        --variant fedavg+fopro=runs/sim-ham-fed/fedavg+fopro-2s-radial-prototype-seed0 \\
        --rare-classes df vasc akiec --out docs/figures/sim-ham-rounds

writes ``<out>-balanced-accuracy.png`` and ``<out>-rare-recall.png`` (and prints the last
round's figures). Rounds the server did not test (``federation.test_every_round: false``,
``evaluate_every``) are gaps, not zeros.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from fopro_kd.plots import plot_lines_by_group


def read_history(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no history.csv (is this a finished or running federation?)")
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _value(row: dict[str, str], key: str) -> float | None:
    text = row.get(key, "")
    return float(text) if text not in ("", None) else None


def round_curves(variants: dict[str, Path], rare_classes: list[str]) -> list[dict[str, Any]]:
    """One row per round: ``bacc/<variant>`` and ``rare/<variant>`` (mean recall of ``rare_classes``)."""
    rows: dict[int, dict[str, Any]] = {}
    for name, run_dir in variants.items():
        history = read_history(run_dir)
        missing = [c for c in rare_classes if history and f"recall/{c}" not in history[0]]
        if missing:
            raise ValueError(f"{run_dir}: history.csv has no recall of {missing} (classes: "
                             f"{sorted(k[7:] for k in history[0] if k.startswith('recall/'))})")
        for row in history:
            rnd = int(row["round"])
            out = rows.setdefault(rnd, {"round": rnd})
            out[f"bacc/{name}"] = _value(row, "test_balanced_accuracy")
            recalls = [_value(row, f"recall/{c}") for c in rare_classes]
            out[f"rare/{name}"] = (sum(recalls) / len(recalls)) if recalls and None not in recalls else None
    return [rows[r] for r in sorted(rows)]


def write_round_curves(variants: dict[str, Path], rare_classes: list[str], prefix: str | Path) -> list[Path]:
    """``<prefix>-balanced-accuracy.png`` and ``<prefix>-rare-recall.png`` for ``variants`` (name -> run dir)."""
    return plot_round_curves(round_curves(variants, rare_classes), rare_classes, prefix)


def plot_round_curves(rows: list[dict[str, Any]], rare_classes: list[str], prefix: str | Path) -> list[Path]:
    """The two figures of :func:`write_round_curves` from rows already read (:func:`round_curves`)."""
    rare = ", ".join(rare_classes)
    return [
        plot_lines_by_group(rows, "round", "bacc/", f"{prefix}-balanced-accuracy.png",
                            "global model, test balanced accuracy per round", ylabel="balanced accuracy"),
        plot_lines_by_group(rows, "round", "rare/", f"{prefix}-rare-recall.png",
                            f"global model, mean test recall of {rare} per round", ylabel="rare-class recall"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=DIR",
                        help="a federation's name and run directory (repeat)")
    parser.add_argument("--rare-classes", nargs="+", required=True, help="class names averaged as rare recall")
    parser.add_argument("--out", required=True, help="path prefix of the two PNG files")
    args = parser.parse_args(argv)
    variants: dict[str, Path] = {}
    for item in args.variant:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--variant {item!r}: expected NAME=DIR")
        if name in variants:
            parser.error(f"--variant {name!r} given twice")
        variants[name] = Path(folder)
    rows = round_curves(variants, args.rare_classes)
    paths = plot_round_curves(rows, args.rare_classes, args.out)
    for name in variants:
        tested = [r for r in rows if r.get(f"bacc/{name}") is not None]
        if tested:
            last = tested[-1]
            print(f"{name}: round {last['round']}: test bACC {last[f'bacc/{name}']:.3f}, "
                  f"rare recall {last[f'rare/{name}']:.3f}")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
