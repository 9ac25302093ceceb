"""Performance benchmarks of fopro-kd: ``python -m simulations.bench SUITE [--json OUT]``.

Suites (each prints a table and, with ``--json``, writes its medians and targets):

``step``        images/s of one local training step vs a bare PyTorch reference (64 / 224 px),
                method step-time ratios, teacher feature cache speedup;
``data``        images/s of the training data pipeline on HAM10000 (64 / 128 px) vs the step rate;
``simulation``  wall time per round of ``configs/sim-demo.yaml`` and the share outside client training;
``scaling``     the same data over 4 and 64 virtual hospitals (``--hospitals`` for more): round time and peak memory;
``comm``        bytes per client per round, fp32 vs fp16 / bf16 transfer, and the accuracy effect;
``two_stage``   a two-stage FoPro-KD epoch (frozen prompt, cached targets) against a BSM epoch (HAM10000 shapes);
``all``         every suite, in this order.

Every comparison is measured in the same run, interleaved, after a warm-up, and reported
as medians and ratios: other jobs may share the CPUs, so figures from different runs are
not comparable. ``--quick`` runs a tiny size (the tests use it). The default size of
``all`` is meant to finish in under 10 minutes on 2 CPU cores.

Examples::

    python -m simulations.bench all --json runs/bench/all.json
    python -m simulations.bench step --profile
    python -m simulations.bench simulation --set federation.num_rounds=3
    python -m simulations.bench scaling --hospitals 4 16 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# OpenMP threads that spin-wait at every barrier make a 2-thread torch step 4-6x slower as soon
# as another process wants a core (measured on the shared 2-core machines, docs/performance.md).
# The benchmark process sleeps instead, so side-by-side ratios survive a shared machine; it must
# be set before torch starts its OpenMP runtime. Simulations started by the bench do not inherit
# it (they are measured as `fopro-kd simulate` runs). Override: OMP_WAIT_POLICY=ACTIVE.
# Only when run as a program: importing this module (the tests) changes no environment.
if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["FOPRO_BENCH_OMP_SET"] = "1"

import torch  # noqa: E402

from fopro_kd.models.weights import default_offline_hub  # noqa: E402

default_offline_hub()  # the benchmarked runs use no Hub (its docstring); the sub-processes inherit it

from simulations.bench_common import environment, format_targets, loadavg  # noqa: E402

SUITES = ("step", "data", "simulation", "scaling", "comm", "two_stage")


def _module(suite: str):
    if suite == "step":
        from simulations import bench_step as module
    elif suite == "data":
        from simulations import bench_data as module
    elif suite in ("simulation", "scaling"):
        from simulations import bench_sim as module
    elif suite == "comm":
        from simulations import bench_comm as module
    elif suite == "two_stage":
        from simulations import bench_two_stage as module
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(suite)
    return module


def run_suite(suite: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Run one suite and return its JSON-able result (``suite``, ``env``, ``targets``, ``wall_s`` + its own keys)."""
    module = _module(suite)
    threads = torch.get_num_threads()
    if opts["quick"]:
        # tiny sizes measure nothing; one thread keeps them fast on a loaded machine, where
        # spinning OpenMP threads (the default policy, e.g. under pytest) slow them down 5-10x
        torch.set_num_threads(1)
    try:
        env = environment(opts["device"])
        started = time.perf_counter()
        if suite == "scaling":
            result = module.run_scaling(opts)
        elif suite == "simulation":
            result = module.run_simulation_suite(opts)
        else:
            result = module.run(opts)
    finally:
        torch.set_num_threads(threads)
    env["loadavg_end"] = loadavg()
    env["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return {"suite": suite, "quick": bool(opts["quick"]), "env": env,
            "wall_s": time.perf_counter() - started, **result}


def render(suite: str, result: dict[str, Any]) -> str:
    module = _module(suite)
    body = module.render_scaling(result) if suite == "scaling" else (
        module.render_simulation(result) if suite == "simulation" else module.render(result))
    env = result["env"]
    head = (f"== {suite} ({'quick' if result['quick'] else 'default size'}; {env['device']}, "
            f"{env['torch_threads']} torch threads, load {env['loadavg_start']} -> {env['loadavg_end']}, "
            f"{result['wall_s']:.0f} s) ==")
    tail = "" if not result.get("targets") else "\ntargets:\n" + format_targets(result["targets"])
    return f"{head}\n{body}{tail}\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for tests); figures are not meaningful")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up repetitions (default per suite)")
    p.add_argument("--repeats", type=int, default=None, help="measured repetitions; medians are reported")
    p.add_argument("--compile", action="store_true", help="step: torch.compile the backbones (both sides)")
    p.add_argument("--profile", action="store_true", help="step: torch.profiler top operators of the framework step")
    p.add_argument("--config", default=str(Path("configs") / "sim-demo.yaml"),
                   help="simulation/scaling/comm: the federation config (default configs/sim-demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="simulation/scaling/comm: config override, repeatable (e.g. federation.num_rounds=2)")
    p.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=None, metavar="KEY=VALUE",
                   help="simulation: the baseline is the same config with these overrides (instead of the behaviour "
                        "before issue 16), to measure one setting against the shipped one in the same run")
    p.add_argument("--hospitals", type=int, nargs="+", default=None, help="scaling: hospital counts (default 4 64)")
    p.add_argument("--ham-root", default=None, help="data: HAM10000 folder (default ../shared/data/ham10000)")
    p.add_argument("--run-dir", default=None,
                   help="comm: evaluate the global model (best.pt) of this finished simulation run")
    p.add_argument("--work-dir", default=None, help="where simulation runs are written (default: a temp folder)")
    p.add_argument("--keep-runs", action="store_true", help="keep the simulation run directories")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    opts: dict[str, Any] = {
        "quick": args.quick, "device": device, "warmup": args.warmup, "repeats": args.repeats,
        "compile": args.compile, "profile": args.profile, "config": args.config, "overrides": list(args.overrides),
        "hospitals": args.hospitals, "ham_root": args.ham_root, "run_dir": args.run_dir,
        "work_dir": args.work_dir, "keep_runs": args.keep_runs, "baseline_overrides": args.baseline_overrides,
    }
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    results: dict[str, Any] = {}
    failed = []
    try:
        for suite in suites:
            try:
                result = run_suite(suite, opts)
            except Exception as exc:  # noqa: BLE001 - `all` reports the failure and runs the other suites
                if len(suites) == 1:
                    raise
                logging.getLogger("fopro_kd.bench").exception("suite %s failed", suite)
                results[suite] = {"suite": suite, "quick": args.quick, "error": f"{type(exc).__name__}: {exc}",
                                  "targets": [], "wall_s": 0.0}
                failed.append(suite)
                continue
            results[suite] = result
            if suite == "simulation" and result.get("kept_run_dir") and not opts.get("run_dir"):
                opts["run_dir"] = result["kept_run_dir"]  # comm evaluates this run's global model
            print(render(suite, result), flush=True)
    finally:
        for result in results.values():  # temporary simulation folders, kept until comm has read the model
            folder = result.pop("_cleanup", None)
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
                result["kept_run_dir"] = None
    if args.suite == "all":
        output: dict[str, Any] = {"suite": "all", "quick": args.quick, "suites": results,
                                  "targets": [dict(t, suite=s) for s, r in results.items() for t in r.get("targets", [])],
                                  "wall_s": sum(r["wall_s"] for r in results.values())}
        print("== all targets ==\n" + format_targets(output["targets"]))
    else:
        output = results[args.suite]
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=2, default=str))
        print(f"wrote {path}")
    if failed:
        print(f"bench: suites failed: {', '.join(failed)} (see the log above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
