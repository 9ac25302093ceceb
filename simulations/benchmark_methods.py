"""Variant comparison at equal budget: methods on one site, or strategies in a federation.

Usage::

    python -m simulations.benchmark_methods --config configs/demo.yaml --out runs/bench-demo \
        [--methods bsm ekd fopro-kd fopro-kd+akd] [--seeds 0 1] [--set train.epochs=4]
    python -m simulations.benchmark_methods --federated --config configs/sim-demo.yaml \
        --out runs/bench-sim --methods fedavg+bsm fedavg+fopro-kd fedmas+fopro-kd class_balanced+fopro-kd

Every variant runs with the same config, seed, data split and epoch/round budget; only the
variant's overrides change (``train.method`` / ``akd.mode``; for ``--federated`` also
``federation.strategy``). Writes ``results.json`` and ``results.csv`` (balanced accuracy,
few-shot accuracy, seconds per epoch or per round) and prints a table.
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
    # the cheaper prompt schedule (docs/performance.md): prompt trained on every 4th batch
    "fopro-kd-every4": ["train.method=fopro-kd", "train.loss=bsm", "akd.mode=discriminative", "akd.prompt_every=4"],
}


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


def _run_variant(config: str, overrides: list[str], out: Path, splits, federated: bool) -> dict:
    cfg = load_config(config, overrides)
    if not federated:
        metrics = train_single_site(cfg, out, progress=False, splits=splits)
        return {**metrics, "seconds": metrics["mean_epoch_seconds"]}
    from simulations.simulate import run_simulation_from_config

    status = run_simulation_from_config(cfg, out_dir=str(out))
    if status:
        raise RuntimeError(f"simulation {out} ended with status {status}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics, "seconds": metrics["mean_round_seconds"], "best_epoch": metrics["best_round"]}


def run_benchmark(
    config: str, out: Path, methods: list[str], seeds: list[int], overrides: list[str], federated: bool = False
) -> list[dict]:
    variants = {name: variant_overrides(name, federated) for name in methods}  # fail before any training
    rows = []
    for seed in seeds:
        # one split per seed, shared by every single-site variant (federated runs rebuild it per process)
        splits = None if federated else build_splits(load_config(config, overrides + [f"seed={seed}"]))
        for method, extra in variants.items():
            metrics = _run_variant(config, overrides + [f"seed={seed}"] + extra, out / f"{method}-seed{seed}",
                                   splits, federated)
            rows.append({
                "method": method, "seed": seed,
                "balanced_accuracy": metrics["balanced_accuracy"], "few_shot": metrics["few_shot"],
                "medium_shot": metrics["medium_shot"], "many_shot": metrics["many_shot"],
                "macro_f1": metrics["macro_f1"], "seconds_per_epoch": metrics["seconds"],
                "best_epoch": metrics["best_epoch"],
                "outside_training_share": metrics.get("mean_outside_training_share"),
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
    lines = [f"{'variant':<24} {'bACC':>7} {'few':>7} {'medium':>7} {'many':>7} {'s/unit':>8} {'rel.time':>8}"]
    base_time = None
    for method in methods:
        picked = [r for r in rows if r["method"] == method]

        def mean(key: str) -> float:
            values = [r[key] for r in picked if r[key] is not None]
            return sum(values) / len(values) if values else float("nan")

        seconds = mean("seconds_per_epoch")
        base_time = base_time or seconds
        lines.append(
            f"{method:<24} {mean('balanced_accuracy'):7.4f} {mean('few_shot'):7.4f} {mean('medium_shot'):7.4f} "
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
    parser.add_argument("--federated", action="store_true", help="variants are STRATEGY+METHOD simulations")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rows = run_benchmark(args.config, Path(args.out), args.methods, args.seeds, args.overrides, args.federated)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
