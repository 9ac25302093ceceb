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


def test_prompt_table_runs_one_seed_at_a_time_and_archives_each_at_once(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    calls = _record_calls(tmp_path, "ham10000_prompt_table.sh", str(out), str(archive), "fopro-2s-identity")
    kinds = [("train" if "simulations.benchmark_methods" in c else "archive" if "simulations.archive_runs" in c
              else "other") for c in calls]
    assert kinds == ["train", "archive"] * 3
    seeds = [c[c.index("--seeds") + 1:c.index("--seeds") + 2] for c in calls if "--seeds" in c]
    assert seeds == [["0"], ["1"], ["2"]]
    archived = [c[c.index("simulations.archive_runs") + 1] for c in calls if "simulations.archive_runs" in c]
    assert archived == [str(out / "fopro-2s-identity" / f"fopro-2s-identity-seed{s}") for s in range(3)]
    assert not any("teacher.input_size=224" in c for c in calls)


def test_prompt_table_skips_archiving_a_run_already_archived(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    (archive / "fopro-2s-identity-seed1").mkdir(parents=True)
    calls = _record_calls(tmp_path, "ham10000_prompt_table.sh", str(out), str(archive), "fopro-2s-identity")
    archived = [c[c.index("simulations.archive_runs") + 1] for c in calls if "simulations.archive_runs" in c]
    assert archived == [str(out / "fopro-2s-identity" / f"fopro-2s-identity-seed{s}") for s in (0, 2)]
    # the archived run was copied into OUT so that --skip-finished can reuse it
    assert (out / "fopro-2s-identity" / "fopro-2s-identity-seed1").is_dir()


def test_teacher224_queue_sets_the_teacher_resolution_on_every_run(tmp_path):
    calls = _record_calls(tmp_path, "ham10000_teacher224.sh", str(tmp_path / "out"), str(tmp_path / "archive"))
    train = [" ".join(c) for c in calls if "simulations.benchmark_methods" in c]
    assert len(train) == 3
    for call in train:
        assert "--set data.image_size=224 --set teacher.input_size=224" in call
        assert "--methods fopro-2s-identity" in call
        assert "--config configs/ham10000-lt.yaml" in call
