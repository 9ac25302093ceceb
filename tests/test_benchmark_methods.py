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


def test_tiny_single_site_benchmark_writes_results(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"kind": "synthetic", "image_size": 32, "num_classes": 3, "max_per_class": 12},
        "split": {"val_per_class": 3, "test_per_class": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": 32},
        "train": {"epochs": 1, "batch_size": 8},
    }))
    rows = run_benchmark(str(config), tmp_path / "out", ["bsm", "fopro-kd"], [0], [])
    assert [r["method"] for r in rows] == ["bsm", "fopro-kd"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert all(0.0 <= r["balanced_accuracy"] <= 1.0 for r in rows)
    table = format_table(rows)
    assert "bsm" in table and "fopro-kd" in table and table.count("\n") == 2
