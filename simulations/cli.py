"""The ``fopro-kd`` program: the library's commands plus ``simulate`` (Flower simulation engine).

``pyproject.toml`` points the ``fopro-kd`` console script here (``[project.scripts]``).
:func:`main` is :func:`fopro_kd.cli.main` with one more sub-command, ``simulate``, defined in
this module, so every library command (train, evaluate, teacher, probe, report) behaves
exactly as in ``python -m fopro_kd.cli``.

Why the composition lives here: ``simulate`` runs the ServerApp and ClientApps (``server/``,
``client/``, ``flwr``), and the library must never import the layers above it. This top layer
already depends on all of them, so it adds the command explicitly. Two alternatives were set
aside: a lookup by module name inside the library (the same upward import, only hidden from
readers and from ``tests/test_import_structure.py``), and an ``importlib.metadata`` entry-point
plugin (``fopro_kd.commands``): it works only in an environment installed after the entry
point was declared, and a missing plugin makes ``simulate`` disappear without an error.

Run it as ``fopro-kd simulate ...`` (after ``pip install -e .``) or ``python -m simulations.cli
simulate ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fopro_kd import cli as library_cli
from fopro_kd.config import ConfigError

__all__ = ["add_simulate_command", "main"]


def _cmd_simulate(args: argparse.Namespace) -> int:
    # imported here: simulations.simulate sets Ray's environment defaults at import, which only
    # a simulation should do (not `fopro-kd train`)
    from simulations.simulate import run_simulation_from_config

    cfg = library_cli.load_cli_config(args)
    library_cli.check_teacher_at_start_up(cfg)
    resume = Path(args.resume) if args.resume else None
    if resume is not None and args.out and Path(args.out).resolve() != resume.resolve():
        raise ConfigError("--resume RUN_DIR continues that run directory; do not also pass a different --out")
    return int(run_simulation_from_config(cfg, out_dir=args.out, resume_dir=resume) or 0)


def add_simulate_command(sub: Any) -> None:
    """``fopro-kd simulate``: a cross-site federation on this machine (:mod:`simulations.simulate`)."""
    p = library_cli.add_subcommand(
        sub, "simulate", "cross-site federated simulation (Flower simulation engine)",
        "fopro-kd simulate --config configs/sim-demo.yaml --set federation.num_rounds=3 --out runs/sim-demo")
    library_cli.add_config_args(p, required=False)
    p.add_argument("--out", help="run directory (default: runs/<time>-<name>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in this run directory from its last complete round")
    p.set_defaults(func=_cmd_simulate)


def main(argv: list[str] | None = None) -> int:
    """The ``fopro-kd`` console script: the library's commands and ``simulate``."""
    return library_cli.main(argv, extra_commands=[add_simulate_command])


if __name__ == "__main__":  # pragma: no cover - `python -m simulations.cli`
    sys.exit(main())
