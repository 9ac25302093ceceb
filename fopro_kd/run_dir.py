"""The run directory: config snapshot, metrics (JSON/CSV), plots and checkpoints.

Every file a run produces goes under one folder, and every write is atomic, so an
interrupted run never leaves a metrics file or checkpoint that looks complete but is not.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from fopro_kd.checkpoint import atomic_write_text
from fopro_kd.config import Config


def default_run_dir(cfg: Config, kind: str = "train") -> Path:
    name = cfg.run_name or f"{kind}-{cfg.data.kind}-{cfg.train.method}"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf become None so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())
    return value


class RunDir:
    """One run's output folder; ``resolve`` refuses paths that would escape it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "plots").mkdir(exist_ok=True)
        self.history: list[dict[str, Any]] = []

    def resolve(self, relative: str | Path) -> Path:
        target = (self.path / relative).resolve()
        if target != self.path and self.path not in target.parents:
            raise ValueError(f"refusing to write outside the run directory {self.path}: {relative}")
        return target

    def save_config(self, cfg: Config) -> Path:
        path = self.resolve("config.yaml")
        atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return path

    def write_json(self, name: str, payload: Any) -> Path:
        path = self.resolve(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(_plain(payload), indent=2, sort_keys=False) + "\n")
        return path

    def append_history(self, row: dict[str, Any], name: str = "history.csv") -> Path:
        """Add one row (epoch or round) and rewrite the CSV (columns may grow over time)."""
        self.history.append(_plain(row))
        return self.write_history(name)

    def write_history(self, name: str = "history.csv") -> Path:
        """Rewrite the CSV from ``self.history`` (after a row was completed in place), atomically."""
        columns: list[str] = []
        for entry in self.history:
            columns.extend(k for k in entry if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for entry in self.history:
            writer.writerow({k: ("" if entry.get(k) is None else entry.get(k)) for k in columns})
        path = self.resolve(name)
        atomic_write_text(path, buffer.getvalue())
        return path

    def plot_path(self, name: str) -> Path:
        return self.resolve(Path("plots") / name)
