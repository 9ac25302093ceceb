"""The experiment queues in simulations/queues: what they would run, checked with a recording stand-in for python.

They are the commands docs/results.md names for its HAM10000 tables; a queue that drops an override or archives
only at the end of a variant silently changes an experiment or loses runs when a session stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

QUEUES = Path(__file__).resolve().parents[1] / "simulations" / "queues"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _record_calls(tmp_path: Path, script: str, *args: str) -> list[list[str]]:
    """Run a queue with ``python`` replaced by a script that appends its arguments to a log, one call per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    fake = bin_dir / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("EXTRA_OVERRIDES", None)
    subprocess.run(["bash", str(QUEUES / script), *args], check=True, env=env, capture_output=True, text=True)
    return [line.split() for line in log.read_text().splitlines()]


@pytest.mark.parametrize("script", sorted(p.name for p in QUEUES.glob("*.sh")))
def test_every_queue_script_parses(script):
    subprocess.run(["bash", "-n", str(QUEUES / script)], check=True)


def _train_calls(calls: list[list[str]]) -> list[str]:
    return [" ".join(c) for c in calls if "simulations.benchmark_methods" in c]


def test_prompt_table_runs_each_variant_with_its_archive(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    calls = _record_calls(tmp_path, "ham10000_prompt_table.sh", str(out), str(archive), "fopro-2s-identity",
                          "fopro-2s-radial-prototype")
    train = _train_calls(calls)
    assert len(train) == len(calls) == 2
    for call, variant in zip(train, ("fopro-2s-identity", "fopro-2s-radial-prototype")):
        assert f"--out {out / variant} --skip-finished --archive {archive} --methods {variant} --seeds 0 1 2" in call
        assert "--config configs/ham10000-lt.yaml" in call and "224" not in call


def test_teacher224_queue_sets_the_teacher_resolution_on_every_run(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    train = _train_calls(_record_calls(tmp_path, "ham10000_teacher224.sh", str(out), str(archive)))
    assert len(train) == 1
    assert f"--archive {archive} --methods fopro-2s-identity --seeds 0 1 2" in train[0]
    assert train[0].endswith("--set data.image_size=224 --set teacher.input_size=224")


def test_5fold_queue_archives_every_fold_run(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    train = _train_calls(_record_calls(tmp_path, "ham10000_5fold.sh", str(out), str(archive)))
    assert len(train) == 1
    assert f"--out {out} --skip-finished --archive {archive}" in train[0] and "--folds 5" in train[0]
