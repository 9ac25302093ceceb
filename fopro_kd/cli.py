"""The library's command line: train, evaluate, teacher pretrain, probe, report.

Thin by design: parse arguments, load and validate the config, call the library.
Configuration errors exit with status 2 and one clear line, before any work starts.

``fopro-kd simulate`` is not defined here: it runs the Flower apps (``server/``, ``client/``,
``flwr``), and the library never imports the layers above it. The ``fopro-kd`` console script
(``pyproject.toml`` ``[project.scripts]``) is ``simulations.cli:main``, which calls :func:`main`
with the ``simulate`` command added through ``extra_commands``: the composition happens in
the top layer, which depends on everything anyway, and ``python -m fopro_kd.cli`` is this
library-only CLI (every command but ``simulate``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fopro_kd.models.weights import default_offline_hub

default_offline_hub()  # before any command can reach the Hub (its docstring: hospitals have no Hub access)

from fopro_kd.checkpoint import CheckpointError  # noqa: E402
from fopro_kd.config import Config, ConfigError, load_config  # noqa: E402

logger = logging.getLogger("fopro_kd")

CommandAdder = Callable[[Any], None]
"""Adds one sub-command to the ``fopro-kd`` sub-parsers (with :func:`add_subcommand`), as the library's own do."""


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")


def load_cli_config(args: argparse.Namespace) -> Config:
    """The validated config of ``--config`` / ``--set`` / ``--device`` (raises ConfigError naming the field)."""
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    return load_config(args.config, overrides)


FINISHED_RUN_FILES = ("metrics.json", "best.pt")
"""A run directory holding one of these is a finished single-site run (``train --out`` refuses it)."""


def check_teacher_at_start_up(cfg: Config, always: bool = False) -> None:
    """Teacher source, file and architecture (state-dict keys) before any data is decoded (issue 14).

    ``always``: the command uses the teacher whatever the method (``probe``).
    """
    from fopro_kd.models.teacher import check_teacher_startup
    from fopro_kd.training.components import uses_teacher

    if always or uses_teacher(cfg) or cfg.student.init == "teacher":
        checked = check_teacher_startup(cfg.teacher)
        logger.info("teacher start-up check: %s", checked)


def check_train_out(out: Path, overwrite: bool) -> None:
    """Refuse to train into a finished run's directory (its best.pt / metrics.json) unless ``--overwrite``."""
    found = [name for name in FINISHED_RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"--out {out} already holds a finished run ({', '.join(found)}); choose another --out or pass "
            f"--overwrite to replace it"
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from fopro_kd.run_dir import default_run_dir
    from fopro_kd.training.single_site import train_single_site

    cfg = load_cli_config(args)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out: the directory of the stopped run")
    out = Path(args.out) if args.out else default_run_dir(cfg)
    if args.resume and (out / "metrics.json").exists():
        raise ConfigError(f"--resume: {out} holds a finished run (metrics.json); nothing to resume")
    if not args.resume:  # a stopped run has best.pt of its best epoch so far: --resume continues it
        check_train_out(out, args.overwrite)
    check_teacher_at_start_up(cfg)
    metrics = train_single_site(cfg, out, progress=not args.no_progress, resume=args.resume)
    print(f"run directory: {out}")
    print(f"test balanced accuracy: {metrics['balanced_accuracy']:.4f}")
    few = metrics["few_shot"]
    print(f"test few-shot accuracy: {'n/a' if few is None else f'{few:.4f}'}")
    tail = metrics.get("tail")
    print(f"test tail recall ({', '.join(metrics.get('tail_classes') or [])}): "
          f"{'n/a' if tail is None else f'{tail:.4f}'}")
    if (out / "report.html").is_file():
        print(f"run report: {out / 'report.html'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fopro_kd.metrics import format_summary
    from fopro_kd.training.single_site import evaluate_checkpoint

    cfg = load_cli_config(args)
    if args.no_verify:
        logger.warning("--no-verify: %s is used without checking its SHA-256 sidecar", args.checkpoint)
    else:
        from fopro_kd.checkpoint import verify_checkpoint

        verify_checkpoint(args.checkpoint)
    metrics = evaluate_checkpoint(cfg, args.checkpoint, split=args.split)
    print(format_summary(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def _cmd_teacher_pretrain(args: argparse.Namespace) -> int:
    from fopro_kd.models.demo_teacher import DemoTeacherSettings, demo_teacher_file, pretrain_demo_teacher

    settings = DemoTeacherSettings(arch=args.arch, image_size=args.image_size, epochs=args.epochs, seed=args.seed)
    out = Path(args.out) if args.out else demo_teacher_file(settings)
    if out.is_file() and not args.force:
        print(f"demo teacher already cached: {out} (use --force to retrain)")
        return 0
    stats = pretrain_demo_teacher(settings, out, progress=True)
    print(f"demo teacher written to {out} (train accuracy {stats['train_accuracy']:.3f})")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from fopro_kd.probe import RESULT_JSON, RESULT_PNG, format_probe, run_probe
    from fopro_kd.run_dir import default_run_dir

    if args.max_images is not None:
        args.overrides = [*args.overrides, f"probe.max_images={args.max_images}"]
    cfg = load_cli_config(args)
    check_teacher_at_start_up(cfg, always=True)
    out = Path(args.out) if args.out else default_run_dir(cfg, kind="probe")
    payload = run_probe(cfg, out, progress=not args.no_progress)
    print(format_probe(payload))
    print(f"wrote {out / RESULT_JSON} and {out / RESULT_PNG} ({payload['seconds']} s)")
    return 0


SIMULATE_ELSEWHERE = (
    "'simulate' runs the Flower apps, which the library does not import: run `python -m simulations.cli simulate "
    "...`, or the fopro-kd console script (pyproject: simulations.cli:main; reinstall with `pip install -e .` if "
    "yours still points at fopro_kd.cli:main)"
)


def _cmd_simulate_elsewhere(args: argparse.Namespace) -> int:
    raise ConfigError(SIMULATE_ELSEWHERE)


def _cmd_report(args: argparse.Namespace) -> int:
    from fopro_kd.report_table import print_report

    print_report([Path(p) for p in args.run_dirs], rare_classes=args.rare_classes, fmt=args.format,
                 allow_mixed=args.allow_mixed)
    return 0


def add_subcommand(sub: Any, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` ends with a worked example (argparse epilog)."""
    return sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


_EPILOG = """examples:
  fopro-kd train --config configs/demo.yaml --out runs/demo
  fopro-kd train --config configs/demo.yaml --set train.method=bsm --out runs/demo-bsm
  fopro-kd evaluate --config configs/demo.yaml --checkpoint runs/demo/best.pt
  fopro-kd simulate --config configs/sim-demo.yaml --out runs/sim-demo
  fopro-kd report runs/demo runs/demo-bsm --format markdown

Every run directory holds report.html (open it in a browser), metrics.json, history.csv and plots/.
Run `fopro-kd COMMAND --help` for the options of one command."""


def build_parser(extra_commands: Sequence[CommandAdder] = ()) -> argparse.ArgumentParser:
    """The ``fopro-kd`` parser: the library's commands, then each of ``extra_commands`` (``simulate``)."""
    parser = argparse.ArgumentParser(prog="fopro-kd", description="fopro-kd: federated FoPro-KD distillation for "
                                     "long-tailed medical images (train, evaluate, simulate, probe, report).",
                                     epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, including Flower's, Ray's and the state database's own messages "
                             "(by default they are shown from WARNING up)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_subcommand(sub, "train", "single-site training (EKD with one client): select on validation, report on test",
             "fopro-kd train --config configs/demo.yaml --set train.epochs=2 --out runs/demo")
    add_config_args(p)
    p.add_argument("--out", help="run directory (default: runs/<time>-<name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an --out that already holds a finished run (replaces its best.pt and metrics)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run stopped in --out after its last complete epoch (same config; "
                        "resume_state.pt), with the result it would have had")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    p = add_subcommand(sub, "evaluate", "re-score a saved student checkpoint on one split of the config's data",
             "fopro-kd evaluate --config configs/demo.yaml --checkpoint runs/demo/best.pt --split test")
    add_config_args(p)
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="student checkpoint written by a run (RUN_DIR/best.pt); its classes must match the data")
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="which split of the config's data to score (default: test)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics to this JSON file")
    p.add_argument("--no-verify", action="store_true",
                   help="score a checkpoint that has no .sha256 sidecar (by default it is refused); a sidecar that "
                        "does not match is always refused")
    p.set_defaults(func=_cmd_evaluate)

    p = add_subcommand(sub, "teacher", "demo teacher utilities", "fopro-kd teacher pretrain --epochs 4")
    tsub = p.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    t = add_subcommand(tsub, "pretrain", "pretrain the offline demo teacher on the synthetic public domain",
             "fopro-kd teacher pretrain --arch resnet18 --image-size 48 --force")
    t.add_argument("--arch", default="resnet18", help="timm architecture of the demo teacher (default: resnet18)")
    t.add_argument("--image-size", type=int, default=64, help="input size in pixels (default: 64)")
    t.add_argument("--epochs", type=int, default=4, help="pretraining epochs (default: 4)")
    t.add_argument("--seed", type=int, default=1234, help="random seed of the pretraining (default: 1234)")
    t.add_argument("--out", help="output file (default: the cache the demo uses)")
    t.add_argument("--force", action="store_true", help="retrain even when the cached teacher exists")
    t.set_defaults(func=_cmd_teacher_pretrain)

    for add in extra_commands:  # e.g. simulations.cli.add_simulate_command (the console script's `simulate`)
        add(sub)
    if "simulate" not in sub.choices:  # the library alone: one line saying where the command is, not "invalid choice"
        p = sub.add_parser("simulate", help="cross-site federated simulation: python -m simulations.cli simulate",
                           add_help=False, prefix_chars="\0")  # no options: every argument lands in `ignored`
        p.add_argument("ignored", nargs="*")
        p.set_defaults(func=_cmd_simulate_elsewhere)

    p = add_subcommand(sub, "probe", "frequency preference of the teacher on the site's training split",
             "fopro-kd probe --config configs/demo.yaml --max-images 200 --out runs/probe-demo")
    add_config_args(p)
    p.add_argument("--out", help="output directory (default: runs/<time>-<name>)")
    p.add_argument("--max-images", type=int, metavar="N",
                   help="subsample the training split to N images (class-balanced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_probe)

    p = add_subcommand(sub, "report", "side-by-side table of finished runs (single-site and federated) on one test set",
             "fopro-kd report runs/a/demo runs/b/demo --format markdown > results.md")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.json)")
    p.add_argument("--rare-classes", nargs="+", metavar="CLASS",
                   help="classes of the paired rare-recall difference (default: the first run's tail classes, "
                        "metrics.tail_classes)")
    p.add_argument("--format", choices=["text", "markdown", "csv"], default="text",
                   help="table format: aligned text (default), Markdown (paste into docs) or CSV (spreadsheets)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="compare runs on different data sets or test splits anyway (a warning heads the table); "
                        "by default such a comparison is refused")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None, extra_commands: Sequence[CommandAdder] = ()) -> int:
    """Run one command; configuration and weight errors are one line on stderr and exit status 2.

    ``extra_commands``: sub-commands defined above the library (``simulations.cli`` adds ``simulate``).
    """
    from fopro_kd.logging_setup import configure_logging

    args = build_parser(extra_commands).parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f"fopro-kd: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a teacher / student weights error (WeightsLoadError): one line, no traceback
        from fopro_kd.models.weights import WeightsLoadError

        if not isinstance(exc, WeightsLoadError):
            raise
        print(f"fopro-kd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover - `python -m fopro_kd.cli`
    sys.exit(main())
