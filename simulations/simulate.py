"""``fopro-kd simulate``: a cross-site federation on one machine with Flower's simulation engine.

Phases (each a small function):

1. prepare the run directory and validate the federation settings (fail before Ray starts);
2. build the splits once in this process (warms the decoded-image cache), plan the sites
   and write each site's class histogram (JSON + plot) *before* training;
3. make sure the demo teacher exists (pretrained once here, not by every actor at once);
4. run ``flwr.simulation.run_simulation`` with the fopro-kd ServerApp and ClientApp;
   ``--resume RUN_DIR`` continues a run from its newest valid server checkpoint
   (docs/reliability.md); Ray is always shut down afterwards, also after a failure.

Client processes rebuild their partition from ``(config, partition-id)``
(:mod:`fopro_kd.federation.sites`); no dataset is pickled into Ray.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from fopro_kd.models.weights import default_offline_hub  # noqa: E402

default_offline_hub()  # before the Hub can be used (its docstring); the simulated clients inherit it

from fopro_kd.config import Config  # noqa: E402
from fopro_kd.run_dir import RunDir, default_run_dir  # noqa: E402

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["EXIT_ABORTED", "run_simulation_from_config", "simulate", "write_site_histograms"]


def write_site_histograms(cfg: Config, run: RunDir) -> dict[str, dict[str, int]]:
    """Plan the sites, print a class-count table and write ``site_histograms.json`` + plot."""
    from fopro_kd.federation.sites import cached_splits, plan_sites, site_name
    from fopro_kd.plots import plot_class_histograms

    splits = cached_splits(cfg)
    plans = plan_sites(cfg, splits)
    labels = splits.train.labels.numpy()
    names = splits.class_names
    histograms: dict[str, dict[str, int]] = {}
    local_test: dict[str, int] = {}
    for plan in plans:
        counts = [int((labels[plan.train_indices] == c).sum()) for c in range(len(names))]
        histograms[site_name(plan.site_id)] = dict(zip(names, counts))
        local_test[site_name(plan.site_id)] = int(len(plan.test_indices))
        if not plan.train_indices.size:
            logger.warning("%s has an empty partition: it will be skipped every round", site_name(plan.site_id))
        elif sum(c > 0 for c in counts) == 1:
            logger.warning("%s holds a single class", site_name(plan.site_id))
    print(_histogram_table(histograms, local_test, {site_name(p.site_id): p.style for p in plans}))
    run.write_json("site_histograms.json", {
        "train": histograms,
        "local_test_sizes": local_test,
        "styles": {site_name(p.site_id): p.style for p in plans},
        "server": splits.summary(),
    })
    plot_class_histograms(histograms, run.plot_path("class_histograms.png"))
    return histograms


def _histogram_table(histograms: dict[str, dict[str, int]], local_test: dict[str, int],
                     styles: dict[str, str | None]) -> str:
    if not histograms:
        return "(no sites)"
    classes = list(next(iter(histograms.values())))
    width = max(6, *(len(c) for c in classes))
    head = f"{'site':<8}" + "".join(f"{c:>{width + 1}}" for c in classes) + f"{'train':>7}{'test':>6}  style"
    lines = [head]
    for site, counts in histograms.items():
        cells = "".join(f"{counts[c]:>{width + 1}}" for c in classes)
        lines.append(f"{site:<8}{cells}{sum(counts.values()):>7}{local_test[site]:>6}  {styles.get(site) or '-'}")
    return "training images per class and site (local test split size last):\n" + "\n".join(lines)


def _prepare_teacher(cfg: Config) -> None:
    """Pretrain/cache the demo teacher here, so simulated clients only load it."""
    from fopro_kd.training.components import uses_teacher

    if uses_teacher(cfg) and cfg.teacher.source == "demo":
        from fopro_kd.models.demo_teacher import demo_teacher_path

        demo_teacher_path(cfg)


def client_gpu_share(cfg: Config) -> float:
    """Ray ``num_gpus`` of one virtual hospital: ``federation.client_num_gpus``, or 1/num_clients (at most 1)
    when ``device`` is cuda/auto and a GPU is visible, else 0. Several hospitals then share one GPU; each
    actor process loads the teacher once (fopro_kd.training.components.shared_teacher)."""
    import torch

    if cfg.federation.client_num_gpus is not None:
        return float(cfg.federation.client_num_gpus)
    if cfg.device in ("cuda", "auto") and torch.cuda.is_available():
        return min(1.0, 1.0 / max(1, cfg.federation.num_clients))
    return 0.0


def _backend_config(cfg: Config) -> dict[str, Any]:
    """Flower's Ray backend: per-hospital resources, and either a private Ray or the cluster at ``ray_address``.

    With ``federation.ray_address`` the simulation joins a running Ray cluster (``ray start --head`` /
    ``ray start --address``; docs/performance.md "Beyond one machine"): Ray then knows the cluster's CPUs and
    GPUs, so no ``num_cpus`` is passed.
    """
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if cfg.federation.ray_address:
        init_args["address"] = cfg.federation.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": float(cfg.federation.client_num_cpus), "num_gpus": client_gpu_share(cfg)},
        "init_args": init_args,
    }


def _parallel_slots(cfg: Config) -> int:
    cpus = os.cpu_count() or 1
    return max(1, min(cfg.federation.num_clients, int(cpus // cfg.federation.client_num_cpus) or 1))


def _shutdown_ray() -> None:
    """Make sure no Ray processes outlive the simulation (also after a failure)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - flwr[simulation] brings ray
        return
    if ray.is_initialized():
        logger.warning("Ray was still running after the simulation; shutting it down")
        ray.shutdown()


def simulate(
    cfg: Config,
    out_dir: str | Path,
    client_app: Any = None,
    *,
    resume: bool = False,
    server_app: Any = None,
) -> dict[str, Any]:
    """Run the whole simulation into ``out_dir`` (or continue it with ``resume``); return ``metrics.json``.

    ``client_app`` / ``server_app`` replace the fopro-kd apps (tests inject failures this way;
    no config key does).

    Raises
    ------
    FederationAborted
        Too many consecutive rounds without enough valid replies (state saved first).
    ResumeError
        Nothing to resume, another run's checkpoint, or a fresh run into a directory that
        already holds checkpoints; raised before Ray starts.
    """
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from client.state import new_live_root, remove_live_root, state_memory_mode
    from fopro_kd.logging_setup import detach_flower_console

    detach_flower_console()  # Flower's own console handler + propagation printed every line twice
    from server.checkpoints import check_fresh_run_dir
    from server.server_app import check_federation_config, load_resume_checkpoint, make_server_app

    check_federation_config(cfg)
    if resume:
        done = load_resume_checkpoint(cfg, out_dir, f"the config of {out_dir}").round  # fail before Ray starts
        logger.info("resuming %s after round %d of %d", out_dir, done, cfg.federation.num_rounds)
    else:
        check_fresh_run_dir(out_dir)
    run = RunDir(out_dir)
    run.save_config(cfg)
    write_site_histograms(cfg, run)
    _prepare_teacher(cfg)
    server_app = server_app or make_server_app(cfg, run.path, parallel_slots=_parallel_slots(cfg), resume=resume)
    # sites keep their state in memory between persists (federation.state_persist_every, federation.state_memory);
    # persisted every round, it is read back every round as in deployment and nothing is held in memory
    memory_state = cfg.federation.state_persist_every > 1
    live_root = new_live_root() if client_app is None and memory_state and state_memory_mode(cfg) == "node" else None
    client_app = client_app or make_client_app(cfg, state_root=run.resolve("client_state"), memory_state=memory_state,
                                               live_root=live_root)
    if memory_state and cfg.federation.num_clients > 16:
        logger.warning("federation.state_persist_every=%d keeps the state of all %d hospitals in memory (%s) between "
                       "persists (one optimizer state each, e.g. 89.5 MB for a ResNet-18 student); set it to 1 if "
                       "memory is short", cfg.federation.state_persist_every, cfg.federation.num_clients,
                       "the driver" if live_root is None else live_root)
    logger.info("simulating %d hospitals for %d rounds (%s) into %s", cfg.federation.num_clients,
                cfg.federation.num_rounds, cfg.federation.strategy, run.path)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=_backend_config(cfg),  # type: ignore[arg-type]
        )
    finally:
        _shutdown_ray()
        remove_live_root(live_root)
    metrics_file = run.path / "metrics.json"
    if not metrics_file.is_file():
        raise RuntimeError(f"the simulation ended without writing {metrics_file}; see the log above")
    return json.loads(metrics_file.read_text())


def _resume_config(cfg: Config, resume_dir: Path) -> Config:
    """The config of a resumed run: RUN_DIR/config.yaml when no config was given (``cfg`` is the defaults)."""
    from fopro_kd.config import ConfigError, load_config
    from server.checkpoints import ResumeError

    if not resume_dir.is_dir():
        raise ResumeError(f"--resume {resume_dir}: no such run directory")
    saved = resume_dir / "config.yaml"
    if cfg.to_dict() != Config().to_dict():
        return cfg  # an explicit --config / --set: must match the checkpoint's config hash
    if not saved.is_file():
        raise ResumeError(f"--resume {resume_dir}: {saved.name} not found; is this a fopro-kd run directory?")
    try:
        return load_config(saved)
    except ConfigError as exc:
        raise ResumeError(f"--resume {resume_dir}: its {saved.name} is not a valid config ({exc})") from exc


EXIT_ABORTED = 3
"""Exit status of ``fopro-kd simulate`` when the federation stopped after too many failed rounds."""


def run_simulation_from_config(
    cfg: Config, out_dir: str | None, resume_dir: Path | None = None, *, client_app: Any = None
) -> int:
    """Entry point of ``fopro-kd simulate``; returns the process exit status.

    0: finished; :data:`EXIT_ABORTED` (3): stopped after ``federation.max_failed_rounds``
    consecutive failed rounds (state saved; continue with ``--resume``). Configuration and
    resume errors raise (the CLI turns them into exit status 2). ``client_app`` is a test hook.
    """
    from server.rounds import FederationAborted

    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        cfg = _resume_config(cfg, resume_dir)
        out = resume_dir
    else:
        out = Path(out_dir) if out_dir else default_run_dir(cfg, "simulate")
    try:
        metrics = simulate(cfg, out, client_app=client_app, resume=resume_dir is not None)
    except FederationAborted as exc:
        print(f"fopro-kd: federation stopped: {exc}", file=sys.stderr)
        sys.stderr.flush()
        return EXIT_ABORTED
    bacc = metrics.get("balanced_accuracy")
    print(f"run directory: {out}")
    if metrics.get("resumed_from_round") is not None:
        print(f"resumed after round {metrics['resumed_from_round']}")
    print(f"best round (validation): {metrics.get('best_round')}")
    print(f"global test balanced accuracy: {'n/a' if bacc is None else f'{bacc:.4f}'}")
    for key, label in (("few_shot", "few-shot recall"), ("tail", "tail recall")):
        value = metrics.get(key)
        names = f" ({', '.join(metrics.get('tail_classes') or [])})" if key == "tail" else ""
        print(f"global test {label}{names}: {'n/a' if value is None else f'{value:.4f}'}")
    for site, values in sorted(metrics.get("per_site", {}).items()):
        site_bacc = values.get("balanced_accuracy")
        print(f"  {site}: local test bACC {'n/a' if site_bacc is None else f'{site_bacc:.4f}'}")
    if (Path(out) / "report.html").is_file():
        print(f"run report: {Path(out) / 'report.html'}")
    sys.stdout.flush()
    return 0
