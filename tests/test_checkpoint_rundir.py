"""Atomic checksummed checkpoints and the run directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fopro_kd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fopro_kd.config import config_from_dict
from fopro_kd.run_dir import RunDir


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    payload = {"format": "x/1", "w": torch.arange(6.0).view(2, 3), "step": 3, "names": ["a", "b"]}
    digest = save_checkpoint(tmp_path / "c.pt", payload)
    assert len(digest) == 64
    loaded = load_checkpoint(tmp_path / "c.pt", expected_format="x/1")
    assert torch.equal(loaded["w"], payload["w"]) and loaded["names"] == ["a", "b"]
    assert not list(tmp_path.glob(".*.tmp")), "temporary files must not be left behind"


def test_truncated_checkpoint_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(path)


def test_wrong_format_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"format": "other/1"})
    with pytest.raises(CheckpointError, match="format 'other/1'"):
        load_checkpoint(tmp_path / "c.pt", expected_format="fopro-kd-student/1")


def test_pickled_object_refused(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"obj": argparse.Namespace(cmd="rm -rf /")}, path)  # an arbitrary pickled object
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_missing_checkpoint_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"v": torch.tensor(1)})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fopro_kd.checkpoint.os.replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"v": torch.tensor(2)})
    monkeypatch.undo()
    assert int(load_checkpoint(path)["v"]) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_dir_history_grows_columns_and_json_is_standard(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_history({"epoch": 1, "loss": 0.5})
    run.append_history({"epoch": 2, "loss": float("nan"), "val": 0.7})
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["val"] == "" and rows[1]["val"] == "0.7" and rows[1]["loss"] == ""
    run.write_json("metrics.json", {"a": float("inf"), "b": [1, 2]})
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"a": None, "b": [1, 2]}


def test_run_dir_refuses_escaping_paths(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="outside the run directory"):
        run.write_json("../escape.json", {})
    assert not (tmp_path / "escape.json").exists()


def test_config_snapshot_is_loadable(tmp_path: Path) -> None:
    from fopro_kd.config import load_config

    cfg = config_from_dict({"train": {"epochs": 3}, "teacher": {"source": "none"}})
    path = RunDir(tmp_path / "run").save_config(cfg)
    assert load_config(path).to_dict() == cfg.to_dict()
