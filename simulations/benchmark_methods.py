"""Method comparison at equal budget: bsm, ekd, fopro-kd, fopro-kd + AKD (minmax).

Usage::

    python -m simulations.benchmark_methods --config configs/demo.yaml --out runs/bench-demo \
        [--methods bsm ekd fopro-kd fopro-kd+akd] [--seeds 0 1] [--set train.epochs=4]

Every method runs with the same config, seed, data split and epoch budget; only
``train.method`` and ``akd.mode`` change. Writes ``results.json`` and ``results.csv``
(balanced accuracy, few-shot accuracy, seconds per epoch) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fopro_kd.config import load_config  # noqa: E402
from fopro_kd.data import build_splits  # noqa: E402
from fopro_kd.training.single_site import train_single_site  # noqa: E402

METHOD_OVERRIDES: dict[str, list[str]] = {
    "ce": ["train.method=ce", "train.loss=ce"],
    "bsm": ["train.method=bsm", "train.loss=bsm"],
    "ekd": ["train.method=ekd", "train.loss=bsm"],
    "fopro-kd": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=discriminative"],
    "fopro-kd+akd": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=minmax"],
}


def run_benchmark(config: str, out: Path, methods: list[str], seeds: list[int], overrides: list[str]) -> list[dict]:
    unknown = [m for m in methods if m not in METHOD_OVERRIDES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHOD_OVERRIDES)}")
    rows = []
    for seed in seeds:
        base = load_config(config, overrides + [f"seed={seed}"])
        splits = build_splits(base)  # one split per seed, shared by every method
        for method in methods:
            cfg = load_config(config, overrides + [f"seed={seed}"] + METHOD_OVERRIDES[method])
            metrics = train_single_site(cfg, out / f"{method}-seed{seed}", progress=False, splits=splits)
            rows.append({
                "method": method, "seed": seed,
                "balanced_accuracy": metrics["balanced_accuracy"], "few_shot": metrics["few_shot"],
                "medium_shot": metrics["medium_shot"], "many_shot": metrics["many_shot"],
                "macro_f1": metrics["macro_f1"], "seconds_per_epoch": metrics["mean_epoch_seconds"],
                "best_epoch": metrics["best_epoch"],
            })
            logging.getLogger("fopro_kd").info("%s seed %d: bACC %.4f", method, seed, metrics["balanced_accuracy"])
            _write(out, rows)
    return rows


def _write(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    """Mean over seeds per method; time per epoch relative to the first method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"{'method':<14} {'bACC':>7} {'few':>7} {'medium':>7} {'many':>7} {'s/epoch':>8} {'rel.time':>8}"]
    base_time = None
    for method in methods:
        picked = [r for r in rows if r["method"] == method]

        def mean(key: str) -> float:
            values = [r[key] for r in picked if r[key] is not None]
            return sum(values) / len(values) if values else float("nan")

        seconds = mean("seconds_per_epoch")
        base_time = base_time or seconds
        lines.append(
            f"{method:<14} {mean('balanced_accuracy'):7.4f} {mean('few_shot'):7.4f} {mean('medium_shot'):7.4f} "
            f"{mean('many_shot'):7.4f} {seconds:8.1f} {seconds / base_time:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=["bsm", "ekd", "fopro-kd", "fopro-kd+akd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = run_benchmark(args.config, Path(args.out), args.methods, args.seeds, args.overrides)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
