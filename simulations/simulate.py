"""``fopro-kd simulate``: a cross-site federation on one machine with Flower's simulation engine.

Phases (each a small function):

1. prepare the run directory and validate the federation settings (fail before Ray starts);
2. build the splits once in this process (warms the decoded-image cache), plan the sites
   and write each site's class histogram (JSON + plot) *before* training;
3. make sure the demo teacher exists (pretrained once here, not by every actor at once);
4. run ``flwr.simulation.run_simulation`` with the fopro-kd ServerApp and ClientApp.

Client processes rebuild their partition from ``(config, partition-id)``
(:mod:`client.data`); no dataset is pickled into Ray.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from fopro_kd.config import Config  # noqa: E402
from fopro_kd.run_dir import RunDir, default_run_dir  # noqa: E402

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["ResumeNotSupportedError", "run_simulation_from_config", "simulate", "write_site_histograms"]


class ResumeNotSupportedError(NotImplementedError):
    """``--resume`` is not implemented for simulations: Flower's simulation engine restarts from round 1."""


def write_site_histograms(cfg: Config, run: RunDir) -> dict[str, dict[str, int]]:
    """Plan the sites, print a class-count table and write ``site_histograms.json`` + plot."""
    from client.data import cached_splits, plan_sites, site_name
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


def _backend_config(cfg: Config) -> dict[str, Any]:
    import torch

    gpus = 0.0
    if cfg.device in ("cuda", "auto") and torch.cuda.is_available():
        gpus = min(1.0, 1.0 / max(1, cfg.federation.num_clients))
    return {
        "client_resources": {"num_cpus": float(cfg.federation.client_num_cpus), "num_gpus": gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": "ERROR", "log_to_driver": True},
    }


def _parallel_slots(cfg: Config) -> int:
    cpus = os.cpu_count() or 1
    return max(1, min(cfg.federation.num_clients, int(cpus // cfg.federation.client_num_cpus) or 1))


def simulate(cfg: Config, out_dir: str | Path, client_app: Any = None) -> dict[str, Any]:
    """Run the whole simulation into ``out_dir``; return ``metrics.json`` as a dict.

    ``client_app`` replaces the fopro-kd ClientApp (tests inject failures this way).
    """
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import check_federation_config, make_server_app

    check_federation_config(cfg)
    run = RunDir(out_dir)
    run.save_config(cfg)
    write_site_histograms(cfg, run)
    _prepare_teacher(cfg)
    client_app = client_app or make_client_app(cfg, state_root=run.path / "client_state")
    server_app = make_server_app(cfg, run.path, parallel_slots=_parallel_slots(cfg))
    logger.info("simulating %d hospitals for %d rounds (%s) into %s", cfg.federation.num_clients,
                cfg.federation.num_rounds, cfg.federation.strategy, run.path)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.federation.num_clients,
        backend_config=_backend_config(cfg),  # type: ignore[arg-type]
    )
    metrics_file = run.path / "metrics.json"
    if not metrics_file.is_file():
        raise RuntimeError(f"the simulation ended without writing {metrics_file}; see the log above")
    return json.loads(metrics_file.read_text())


def run_simulation_from_config(cfg: Config, out_dir: str | None, resume_dir: Path | None = None) -> int:
    """Entry point of ``fopro-kd simulate``; returns the process exit status."""
    if resume_dir is not None:
        raise ResumeNotSupportedError(
            f"--resume {resume_dir}: resuming a simulation is not implemented (Flower's simulation engine always "
            "starts at round 1); start a new run with --out"
        )
    out = Path(out_dir) if out_dir else default_run_dir(cfg, "simulate")
    metrics = simulate(cfg, out)
    bacc = metrics.get("balanced_accuracy")
    print(f"run directory: {out}")
    print(f"best round (validation): {metrics.get('best_round')}")
    print(f"global test balanced accuracy: {'n/a' if bacc is None else f'{bacc:.4f}'}")
    for site, values in sorted(metrics.get("per_site", {}).items()):
        site_bacc = values.get("balanced_accuracy")
        print(f"  {site}: local test bACC {'n/a' if site_bacc is None else f'{site_bacc:.4f}'}")
    sys.stdout.flush()
    return 0
