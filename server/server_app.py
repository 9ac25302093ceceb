"""fopro-kd ServerApp: strategy from config, server-side model selection, run-directory report.

Per round the strategy (``federation.strategy`` via
:func:`server.strategies.build_strategy`) samples clients, aggregates their students and
asks every site to score the new global model on its local test split. After each round
:class:`ServerEvaluator` scores the global model on the server's *balanced validation*
split (model selection: the best round's weights are kept in ``best.pt``) and on its
*test* split (reporting only, never used for selection; method.md §9.2), and appends a
row to ``history.csv``. At the end ``metrics.json`` holds the test metrics of the
best-validation round, per-site results, weights and timings.

Configuration: :func:`make_server_app` closes over a :class:`~fopro_kd.config.Config`
(simulation, tests); the module-level ``app`` reads ``config-file``, ``overrides`` and
``out-dir`` from the run config (``flwr run``).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from client.data import RUN_CONFIG_OUT_DIR_KEY, cached_splits, config_from_run_config  # noqa: E402
from fopro_kd.checkpoint import save_checkpoint  # noqa: E402
from fopro_kd.config import Config, ConfigError  # noqa: E402
from fopro_kd.data.dataset import DatasetSplits  # noqa: E402
from fopro_kd.plots import (  # noqa: E402
    plot_class_histograms,
    plot_history,
    plot_lines_by_group,
    plot_per_class_recall,
    plot_weights_per_round,
)
from fopro_kd.run_dir import RunDir, default_run_dir  # noqa: E402
from fopro_kd.seeding import select_device  # noqa: E402
from fopro_kd.training.components import uses_teacher  # noqa: E402
from fopro_kd.training.single_site import evaluate_student, student_checkpoint  # noqa: E402
from server.evaluation import build_global_student, site_metrics_from_counts  # noqa: E402
from server.history import RoundLog, RoundRecorder  # noqa: E402
from server.strategies import build_strategy, get_strategy_class  # noqa: E402
from server.strategies.base import weighted_mean_metrics  # noqa: E402

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["ServerEvaluator", "app", "check_federation_config", "make_server_app", "run_federation"]


# --------------------------------------------------------------------------- start-up checks


def check_federation_config(cfg: Config) -> None:
    """Fail at start-up, before any node does work, on federation settings that cannot run."""
    fed = cfg.federation
    strategy_cls = get_strategy_class(fed.strategy)
    if fed.strategy == "fedmas" and not uses_teacher(cfg):
        raise ConfigError(
            f"'federation.strategy: fedmas' needs the teacher's representation loss for its robust factor, but "
            f"'train.method' is {cfg.train.method!r}; use method 'ekd' or 'fopro-kd'"
        )
    if strategy_cls.needs_class_counts and fed.share_class_counts is False:
        raise ConfigError(
            f"'federation.strategy: {fed.strategy}' weights clients by their per-class counts, but "
            "'federation.share_class_counts' is false; set it to null (or true) or choose another strategy"
        )
    if fed.local_steps is not None and fed.local_steps <= 0:
        raise ConfigError(f"'federation.local_steps' must be > 0 or null, got {fed.local_steps}")


# --------------------------------------------------------------------------- evaluation / selection


@dataclass
class Selection:
    """Best round so far on the validation split."""

    round: int = -1
    val_balanced_accuracy: float = -1.0
    test_metrics: dict[str, Any] = field(default_factory=dict)


class ServerEvaluator:
    """``evaluate_fn`` of ``Strategy.start``: score, select, log one history row per round.

    Parameters
    ----------
    cfg : Config
    splits : DatasetSplits
        The server's data: ``val`` (selection) and ``test`` (reporting); ``train`` class
        counts define the shot groups.
    run : RunDir
    recorder : RoundRecorder
        Per-round replies of the strategy (weights, bytes, site evaluation, timings).
    parallel_slots : int, optional
        How many clients train at the same time (simulation: actors; None: every sampled
        node is its own machine), for the share of round time spent outside training.
    """

    def __init__(
        self,
        cfg: Config,
        splits: DatasetSplits,
        run: RunDir,
        recorder: RoundRecorder,
        parallel_slots: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.splits = splits
        self.run = run
        self.recorder = recorder
        self.parallel_slots = parallel_slots
        self.device = select_device(cfg.device)
        self.train_counts = splits.train.class_counts()
        self.student = build_global_student(cfg, splits.train.num_classes).to(self.device)
        self.best = Selection()
        self.timings: list[dict[str, float]] = []
        self._last_end = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if len(arrays) == 0:
            logger.warning("round %d: no global model to evaluate (no round aggregated yet)", server_round)
            return None
        started = time.perf_counter()
        self.student.load_state_dict(arrays.to_torch_state_dict())
        val = evaluate_student(self.student, self.splits.val, self.train_counts, self.cfg, self.device)
        test = evaluate_student(self.student, self.splits.test, self.train_counts, self.cfg, self.device)
        eval_seconds = time.perf_counter() - started
        entry = self.recorder.rounds.get(server_round) if server_round > 0 else None
        row = self._row(server_round, val, test, entry, eval_seconds, started)
        self.run.append_history(row)
        score = val["balanced_accuracy"] if val["balanced_accuracy"] is not None else -1.0
        if server_round > 0 and score > self.best.val_balanced_accuracy:
            self._select(server_round, score, test, entry)
        self._last_end = time.perf_counter()
        logger.info("round %d: val bACC %.4f, test bACC %.4f", server_round, score, test["balanced_accuracy"] or 0.0)
        return MetricRecord({
            "val-balanced-accuracy": float(score),
            "test-balanced-accuracy": float(test["balanced_accuracy"] or 0.0),
        })

    # ------------------------------------------------------------------ pieces
    def _timing(self, entry: RoundLog | None, eval_seconds: float, started: float) -> dict[str, float]:
        if entry is None:
            return {}
        round_seconds = (started - entry.started) + eval_seconds
        train = list(entry.train_seconds.values())
        slots = self.parallel_slots or max(1, len(train))
        busy = sum(train) / max(1, min(slots, max(1, len(train))))
        outside = min(1.0, max(0.0, 1.0 - busy / round_seconds)) if round_seconds > 0 else 0.0
        timing = {
            "round_seconds": round_seconds,
            "server_eval_seconds": eval_seconds,
            "client_train_seconds_max": max(train) if train else 0.0,
            "client_train_seconds_sum": float(sum(train)),
            "outside_training_share": outside,
        }
        self.timings.append({"round": entry.server_round, **timing})
        return timing

    def _row(
        self, server_round: int, val: dict, test: dict, entry: RoundLog | None, eval_seconds: float, started: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "round": server_round,
            "val_balanced_accuracy": val["balanced_accuracy"],
            "val_few_shot": val["few_shot"],
            "test_balanced_accuracy": test["balanced_accuracy"],
            "test_few_shot": test["few_shot"],
            "test_medium_shot": test["medium_shot"],
            "test_many_shot": test["many_shot"],
        }
        row.update({f"recall/{name}": value for name, value in test["per_class_recall"].items()})
        if entry is not None:
            by_site = self.recorder.by_site
            row.update({f"weight/{site}": w for site, w in by_site(entry.weights).items()})
            row.update({f"bytes/{site}": b for site, b in by_site(entry.bytes_up).items()})
            for site, (correct, total) in by_site(entry.site_eval).items():
                row[f"site_bacc/{site}"] = self._site_metrics(correct, total)["balanced_accuracy"]
            row["clients_aggregated"] = len(entry.weights)
            row["clients_rejected"] = len(entry.rejections)  # error replies included
        row.update(self._timing(entry, eval_seconds, started))
        return row

    def _site_metrics(self, correct: list[int], total: list[int]) -> dict[str, Any]:
        return site_metrics_from_counts(correct, total, self.splits.class_names, self.train_counts, self.cfg.metrics)

    def _select(self, server_round: int, score: float, test: dict, entry: RoundLog | None) -> None:
        self.best = Selection(server_round, score, copy.deepcopy(test))
        per_site = {}
        if entry is not None:
            per_site = {site: self._site_metrics(c, t) for site, (c, t) in self.recorder.by_site(entry.site_eval).items()}
        self.best.test_metrics["per_site"] = per_site
        save_checkpoint(
            self.run.resolve("best.pt"),
            student_checkpoint(self.student, self.cfg, self.splits.class_names,
                               {"round": server_round, "val_balanced_accuracy": float(score)}),
        )


# --------------------------------------------------------------------------- report


def _final_metrics(cfg: Config, evaluator: ServerEvaluator, recorder: RoundRecorder, wall: float) -> dict[str, Any]:
    best = evaluator.best
    metrics: dict[str, Any] = dict(best.test_metrics)
    metrics.setdefault("per_site", {})
    timings = evaluator.timings
    metrics.update({
        "method": cfg.train.method,
        "strategy": cfg.federation.strategy,
        "fedmas_rule": cfg.federation.fedmas_rule if cfg.federation.strategy == "fedmas" else None,
        "best_round": best.round,
        "val_balanced_accuracy": best.val_balanced_accuracy if best.round > 0 else None,
        "rounds": cfg.federation.num_rounds,
        "num_clients": cfg.federation.num_clients,
        "round_seconds": [t["round_seconds"] for t in timings],
        "mean_round_seconds": float(np.mean([t["round_seconds"] for t in timings])) if timings else None,
        "outside_training_share": [t["outside_training_share"] for t in timings],
        "mean_outside_training_share": (
            float(np.mean([t["outside_training_share"] for t in timings])) if timings else None
        ),
        "wall_seconds": wall,
        "failed_replies": {
            str(r): {**recorder.by_site(log.train_errors),
                     **{f"evaluate:{k}": v for k, v in recorder.by_site(log.eval_errors).items()}}
            for r, log in sorted(recorder.rounds.items()) if log.train_errors or log.eval_errors
        },
        "rejected_replies": [{**rej, "site": recorder.site_of(rej.get("node_id", -1))}
                             for log in recorder.rounds.values() for rej in log.rejections],
    })
    return metrics


def _write_plots(run: RunDir, metrics: dict[str, Any], evaluator: ServerEvaluator, recorder: RoundRecorder) -> None:
    rows = run.history
    plot_history(rows, ["val_balanced_accuracy", "test_balanced_accuracy", "test_few_shot"],
                 run.plot_path("balanced_accuracy.png"), x_key="round")
    plot_lines_by_group(rows, "round", "recall/", run.plot_path("per_class_recall_rounds.png"),
                        "Test recall per class (global model)")
    plot_lines_by_group(rows, "round", "site_bacc/", run.plot_path("site_balanced_accuracy.png"),
                        "Balanced accuracy on each site's local test split")
    plot_weights_per_round(rows, run.plot_path("aggregation_weights.png"))
    if metrics.get("per_class_recall"):
        names = evaluator.splits.class_names
        plot_per_class_recall(metrics["per_class_recall"], dict(zip(names, map(int, evaluator.train_counts))),
                              run.plot_path("per_class_recall.png"))
    shared = {}
    for log in recorder.rounds.values():
        shared.update(recorder.by_site(log.class_counts))
    if shared:  # only when sites chose to share their class counts
        names = evaluator.splits.class_names
        hist = {site: dict(zip(names, counts)) for site, counts in sorted(shared.items())}
        run.write_json("reported_class_counts.json", hist)
        plot_class_histograms(hist, run.plot_path("reported_class_histograms.png"))


# --------------------------------------------------------------------------- orchestration


def aggregate_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """``num-examples``-weighted mean of the clients' scalar metrics, without the ``site-id`` label.

    Used for both train and evaluate replies (the strategy has already dropped invalid ones).
    """
    records = [c.metric_records.get("metrics") or next(iter(c.metric_records.values())) for c in contents]
    counts = np.asarray([float(r[weighted_by_key]) for r in records], dtype=np.float64)
    aggregated = weighted_mean_metrics(records, counts, skip=(weighted_by_key, "site-id"))
    aggregated[weighted_by_key] = int(counts.sum())
    return aggregated


def _initial_arrays(cfg: Config, num_classes: int) -> ArrayRecord:
    student = build_global_student(cfg, num_classes, seed=cfg.seed)
    return ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()})


def run_federation(
    grid: Grid, cfg: Config, out_dir: str | Path, parallel_slots: int | None = None
) -> dict[str, Any]:
    """Run ``cfg.federation.num_rounds`` rounds on ``grid`` and write the run directory.

    Returns the content of ``metrics.json``.
    """
    started = time.perf_counter()
    check_federation_config(cfg)
    run = RunDir(out_dir)
    run.save_config(cfg)
    splits = cached_splits(cfg)
    recorder = RoundRecorder()
    strategy = recorder.instrument(build_strategy(
        cfg.federation, train_metrics_aggr_fn=aggregate_metrics, evaluate_metrics_aggr_fn=aggregate_metrics))
    evaluator = ServerEvaluator(cfg, splits, run, recorder, parallel_slots)
    logger.info("federation: %s, %d rounds, %d clients, run directory %s", cfg.federation.strategy,
                cfg.federation.num_rounds, cfg.federation.num_clients, run.path)
    strategy.start(
        grid=grid,
        initial_arrays=_initial_arrays(cfg, splits.train.num_classes),
        num_rounds=cfg.federation.num_rounds,
        timeout=cfg.federation.round_timeout_s,
        train_config=ConfigRecord({"num-rounds": int(cfg.federation.num_rounds)}),
        evaluate_fn=evaluator,
    )
    metrics = _final_metrics(cfg, evaluator, recorder, time.perf_counter() - started)
    run.write_json("metrics.json", metrics)
    _write_plots(run, metrics, evaluator, recorder)
    logger.info("federation finished: best round %d, test bACC %s", metrics["best_round"],
                metrics.get("balanced_accuracy"))
    return metrics


def make_server_app(cfg: Config, out_dir: str | Path, parallel_slots: int | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` writing to ``out_dir`` (simulation and tests)."""
    server_app = ServerApp()
    out = Path(out_dir).resolve()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out, parallel_slots)

    return server_app


def _out_dir_from_run_config(cfg: Config, context: Context) -> Path:
    raw = str(context.run_config.get(RUN_CONFIG_OUT_DIR_KEY, "") or "")
    if not raw:
        return default_run_dir(cfg, "federated").resolve()
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ConfigError(
            f"run config '{RUN_CONFIG_OUT_DIR_KEY}' must be an absolute path (the app runs from an installed copy), "
            f"got {raw!r}"
        )
    return path


app = ServerApp()
"""The ServerApp of ``flwr run`` (``[tool.flwr.app.components] serverapp``)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the config from the run config and run the federation."""
    cfg = config_from_run_config(context.run_config)
    torch.set_num_threads(max(1, cfg.train.num_threads or torch.get_num_threads()))
    run_federation(grid, cfg, _out_dir_from_run_config(cfg, context))
