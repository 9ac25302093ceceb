"""Keep what a comparison needs from finished runs, small enough to commit (``docs/results-data/``).

Run directories (``runs/``) are not committed: they hold checkpoints, and a fresh checkout has
none, so a later session could not pair its new runs with the runs a results table came from.
This copies, per run, only the files :mod:`simulations.compare_runs` and ``fopro-kd report`` read:
the test predictions of the selected and of the last model (image ids, labels and class
probabilities: no pixels), ``metrics.json``, ``config.yaml`` and ``history.csv``, about 20 kB a run::

    python -m simulations.archive_runs runs/ham-s15/*/*-seed? --to docs/results-data/ham-s15

The archived directories are run directories for those tools (same file names), so a table's
command works on them unchanged, and ``benchmark_methods --skip-finished`` with ``--out`` on an
archive folder (or a copy of it) reuses them as finished runs when their config is the one it
would run, so a queue (a 5-fold protocol, more seeds) can grow over several sessions;
``benchmark_methods --archive DIR`` does both per run (:func:`restore_archived_run` before a run's
turn, :func:`archive_runs` the moment it finishes).
Checkpoints, reports and plots stay behind.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from fopro_kd.stats import LAST_PREDICTIONS_FILE, PREDICTIONS_FILE

REQUIRED = (PREDICTIONS_FILE, "metrics.json", "config.yaml")
"""What every archived run has: a run without them is not finished (or not a run)."""
OPTIONAL = (LAST_PREDICTIONS_FILE, "history.csv")
"""Copied when present (older runs have no last-model predictions)."""


def archive_runs(runs: Sequence[Path], to: Path) -> list[Path]:
    """Copy each run's :data:`REQUIRED` and :data:`OPTIONAL` files to ``to / <run name>``.

    Every run is checked before anything is copied: a missing file or two runs with one name is one
    ``ValueError`` naming the run, and nothing is written.
    """
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("archive_runs: no run directories given")
    names: dict[str, Path] = {}
    for run in runs:
        missing = [f for f in REQUIRED if not (run / f).is_file()]
        if missing:
            raise ValueError(f"{run}: not a finished run (no {', '.join(missing)})")
        if run.name in names:
            raise ValueError(f"{run} and {names[run.name]}: two runs named {run.name!r} would share one archive "
                             "folder; archive them to different --to folders")
        names[run.name] = run
    written = []
    for run in runs:
        target = Path(to) / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in REQUIRED + OPTIONAL:
            if (run / name).is_file():
                shutil.copyfile(run / name, target / name)
        written.append(target)
    return written


def restore_archived_run(archive: Path, run_dir: Path) -> bool:
    """Copy ``archive / run_dir.name`` to ``run_dir`` when the archive has that run and ``run_dir`` does not exist.

    Why: a fresh checkout has no ``runs/``; a queue that restores its archived runs before their turn lets
    ``--skip-finished`` reuse them (or retrain them where the config differs) instead of losing the
    sessions that ran them. Returns whether anything was copied; an existing ``run_dir`` is never touched.
    """
    source = Path(archive) / run_dir.name
    if run_dir.exists() or not source.is_dir():
        return False
    shutil.copytree(source, run_dir)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--to", type=Path, required=True, help="archive folder (one subfolder per run)")
    args = parser.parse_args(argv)
    try:
        written = archive_runs(args.runs, args.to)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"archived {len(written)} run(s) to {args.to}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
