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

Differential privacy (docs/privacy.md): with ``privacy.mode`` ``local`` or ``central`` the
global model is the GroupNorm DP student, federated evaluation is switched off
(``fraction_evaluate`` forced to 0, logged: per-site test counts are outside the guarantee),
each site's reported ε goes to ``history.csv`` (``epsilon/<site>``) and its maximum to
``metrics.json``; a run in which no site has budget left ends cleanly after that round
(``stopped_early`` in ``metrics.json``). ``central``: the strategy clips and noises the
aggregate (:mod:`server.strategies.central_dp`) and ``central-epsilon`` is recorded per round.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fopro_kd.federation.sites import cached_splits, config_from_run_config  # noqa: E402
from fopro_kd.federation.wire import RUN_CONFIG_OUT_DIR_KEY, RUN_CONFIG_RESUME_DIR_KEY, STATE_KEY  # noqa: E402
from fopro_kd.federated_prompt import check_federated_prompt, explore_rounds  # noqa: E402
from fopro_kd.checkpoint import save_checkpoint  # noqa: E402
from fopro_kd.config import Config, ConfigError  # noqa: E402
from fopro_kd.data.dataset import DatasetSplits  # noqa: E402
from fopro_kd.plots import (  # noqa: E402
    plot_class_histograms,
    plot_history,
    plot_lines_by_group,
    plot_per_class_recall,
    plot_per_class_rounds,
    plot_weights_per_round,
)
from fopro_kd.round_schedule import evaluates_round, persists_round  # noqa: E402
from fopro_kd.run_dir import RunDir, default_run_dir  # noqa: E402
from fopro_kd.run_report import try_write_run_report  # noqa: E402
from fopro_kd.seeding import select_device  # noqa: E402
from fopro_kd.training.components import uses_teacher  # noqa: E402
from fopro_kd.stats import PREDICTIONS_FILE  # noqa: E402
from fopro_kd.training.single_site import (  # noqa: E402
    evaluate_and_save_predictions,
    evaluate_student,
    student_checkpoint,
)
from fopro_kd.federation.evaluation import build_global_student, site_metrics_from_counts  # noqa: E402
from server.checkpoints import (  # noqa: E402
    ResumeError,
    ServerCheckpointStore,
    arrays_from_tensors,
    check_fresh_run_dir,
    config_hash,
    get_rng_state,
    plain,
    set_rng_state,
    tensors_from_arrays,
)
from server.history import RoundLog, RoundRecorder  # noqa: E402
from server.rounds import (  # noqa: E402
    BoundedWaitGrid,
    FederationAborted,
    FederationFinished,
    NodesUnavailable,
    RoundGuard,
)
from server.strategies import ValidatedWeightedAvg, build_strategy, get_strategy_class  # noqa: E402
from server.strategies.base import weighted_mean_metrics  # noqa: E402
from server.strategies.central_dp import CentralDP  # noqa: E402
from server.strategies.robust import RobustAggregate  # noqa: E402

logger = logging.getLogger("fopro_kd.federation")

__all__ = [
    "RUN_CONFIG_RESUME_DIR_KEY",
    "FederationAborted",
    "FederationFinished",
    "ServerEvaluator",
    "app",
    "check_federation_config",
    "load_resume_checkpoint",
    "make_server_app",
    "run_federation",
]


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
    check_federated_prompt(cfg, cfg.teacher.input_size)
    if cfg.privacy.mode == "central":  # DP-FedAvg with public uniform weights (docs/privacy.md §3)
        if issubclass(strategy_cls, RobustAggregate):
            raise ConfigError(
                f"'federation.strategy: {fed.strategy}' cannot run with 'privacy.mode: central': DP-FedAvg's "
                "sensitivity is that of a clipped mean with a fixed denominator, not of a median or trimmed mean; "
                "use 'fedavg' or 'fedprox' (docs/privacy.md §3)"
            )
        if strategy_cls.client_weights is not ValidatedWeightedAvg.client_weights:
            raise ConfigError(
                f"'federation.strategy: {fed.strategy}' cannot run with 'privacy.mode: central': its aggregation "
                "weights are computed from private per-client statistics across clients (FedMAS robust factors, "
                "class counts), which the central noise does not cover; use 'fedavg' or 'fedprox' (uniform public "
                "weights) or 'privacy.mode: local'"
            )
        if not fed.fraction_train > 0:
            raise ConfigError(
                f"'federation.fraction_train' is the Poisson client sampling rate q under 'privacy.mode: central' and "
                f"must be in (0, 1], got {fed.fraction_train!r}"
            )


def strategy_federation_config(cfg: Config) -> Any:
    """``cfg.federation`` as the strategy uses it: in DP mode with ``fraction_evaluate`` 0 (logged).

    Federated evaluation sends each site's per-class correct / total counts on its private
    local test split, un-noised: outside the DP guarantee (docs/privacy.md §4), so it is off.
    """
    fed = cfg.federation
    if cfg.privacy.mode != "off" and fed.fraction_evaluate > 0:
        logger.warning(
            "privacy.mode %r: federated evaluation disabled (federation.fraction_evaluate %g -> 0): per-class counts on "
            "each hospital's local test split are outside the DP guarantee; the global model is scored on the "
            "server's validation and test splits only", cfg.privacy.mode, fed.fraction_evaluate,
        )
        return dataclasses.replace(fed, fraction_evaluate=0.0)
    return fed


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
        self.best_arrays: dict[str, torch.Tensor] | None = None
        """Copy of the best round's global weights (kept for the checkpoint once later rounds overwrite the student)."""
        self.central_dp: CentralDP | None = None
        """``privacy.mode: central``: the strategy's clipping/noise state, for the ``central-epsilon`` column."""
        self.timings: list[dict[str, float]] = []
        self._last_end = time.perf_counter()
        self.guard: RoundGuard | None = None
        """The round guard (update-norm bound and discarded aggregates per round, for the history row)."""

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if len(arrays) == 0:
            logger.warning("round %d: no global model to evaluate (no round aggregated yet)", server_round)
            return None
        started = time.perf_counter()
        entry = self.recorder.rounds.get(server_round) if server_round > 0 else None
        if not evaluates_round(self.cfg, server_round):  # federation.evaluate_every: the clients' figures only
            self.run.append_history(self._row(server_round, None, None, entry, 0.0, started))
            self._last_end = time.perf_counter()
            return None
        self.student.load_state_dict(arrays.to_torch_state_dict())
        val = evaluate_student(self.student, self.splits.val, self.train_counts, self.cfg, self.device)
        test = None
        if self.cfg.federation.test_every_round:
            test = evaluate_student(self.student, self.splits.test, self.train_counts, self.cfg, self.device)
        eval_seconds = time.perf_counter() - started
        row = self._row(server_round, val, test, entry, eval_seconds, started)
        self.run.append_history(row)
        score = val["balanced_accuracy"] if val["balanced_accuracy"] is not None else -1.0
        if server_round > 0 and score > self.best.val_balanced_accuracy:
            self._select(server_round, score, test, entry)
        self._last_end = time.perf_counter()
        result = {"val-balanced-accuracy": float(score)}
        if test is not None:
            result["test-balanced-accuracy"] = float(test["balanced_accuracy"] or 0.0)
        logger.info("round %d: val bACC %.4f%s", server_round, score,
                    "" if test is None else f", test bACC {test['balanced_accuracy'] or 0.0:.4f}")
        return MetricRecord(result)

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
        self, server_round: int, val: dict | None, test: dict | None, entry: RoundLog | None, eval_seconds: float,
        started: float,
    ) -> dict[str, Any]:
        """One history row; ``val`` / ``test`` None (a round not scored, or no per-round test) leave their columns empty."""
        val = val or {}
        row: dict[str, Any] = {
            "round": server_round,
            "val_balanced_accuracy": val.get("balanced_accuracy"),
            "val_few_shot": val.get("few_shot"),
            "test_balanced_accuracy": None if test is None else test["balanced_accuracy"],
            "test_few_shot": None if test is None else test["few_shot"],
            "test_medium_shot": None if test is None else test["medium_shot"],
            "test_many_shot": None if test is None else test["many_shot"],
            "test_tail": None if test is None else test.get("tail"),
        }
        names = self.splits.class_names
        recalls = {} if test is None else test["per_class_recall"]
        row.update({f"recall/{name}": recalls.get(name) for name in (recalls or names)})
        if entry is not None:
            by_site = self.recorder.by_site
            row.update({f"weight/{site}": w for site, w in by_site(entry.weights).items()})
            row.update({f"bytes/{site}": b for site, b in by_site(entry.bytes_up).items()})
            for site, (correct, total) in by_site(entry.site_eval).items():
                if len(correct) != len(self.splits.class_names):
                    logger.warning("round %d: %s sent %d per-class counts for %d classes; ignored", server_round,
                                   site, len(correct), len(self.splits.class_names))
                    continue
                row[f"site_bacc/{site}"] = self._site_metrics(correct, total)["balanced_accuracy"]
            row["clients_aggregated"] = len(entry.weights)
            row["clients_rejected"] = len(entry.rejections) + len(entry.missing)  # error and missing replies included
            row["clients_failed"] = len(self.recorder.failures(entry))  # error replies + no reply before the timeout
            if self.guard is not None:  # robust aggregation (docs/reliability.md): bound used, aggregate discarded
                row["update_norm_bound"] = self.guard.norm_bounds.get(server_round)
                row["aggregate_rejected"] = self.guard.aggregate_rejections.get(server_round, "")
            if self.cfg.privacy.mode == "local":
                row["clients_declined"] = len(entry.budget_declines)  # out of privacy budget: no model sent
        if self.cfg.privacy.mode == "local" and server_round > 0:
            row.update({f"epsilon/{site}": eps for site, eps in self.recorder.epsilon_so_far(server_round).items()})
        if self.central_dp is not None:
            row["central-epsilon"] = self.central_dp.epsilon()
            row["central-noise-std"] = self.central_dp.last_noise_std if server_round > 0 else 0.0
        row.update(self._timing(entry, eval_seconds, started))
        return row

    def _site_metrics(self, correct: list[int], total: list[int]) -> dict[str, Any]:
        return site_metrics_from_counts(correct, total, self.splits.class_names, self.train_counts, self.cfg.metrics)

    def restore(self, best: dict[str, Any], best_arrays: ArrayRecord | None, timings: list[dict[str, float]]) -> None:
        """Continue from a checkpoint: best-so-far selection (and ``best.pt`` rewritten from it), timings."""
        self.best = Selection(int(best["round"]), float(best["val_balanced_accuracy"]), dict(best["test_metrics"]))
        self.timings = [dict(t) for t in timings]
        if self.best.round > 0 and best_arrays is not None:
            self.student.load_state_dict(best_arrays.to_torch_state_dict())
            self.best_arrays = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
            self._save_best(self.best.round, self.best.val_balanced_accuracy)

    def _save_best(self, server_round: int, score: float) -> None:
        save_checkpoint(
            self.run.resolve("best.pt"),
            student_checkpoint(self.student, self.cfg, self.splits.class_names,
                               {"round": server_round, "val_balanced_accuracy": float(score)}),
        )

    def save_test_predictions(self) -> Path | None:
        """Write the selected (best-validation) model's test predictions to ``predictions_test.npz``.

        The final test metrics were computed when the round was selected; this re-scores the same
        weights once (eval mode, deterministic) to keep the per-image predictions the paired
        statistics need (:mod:`fopro_kd.stats`). ``None`` when no round was selected.
        """
        if self.best.round <= 0 or self.best_arrays is None:
            return None
        self.student.load_state_dict(self.best_arrays)
        path = self.run.resolve(PREDICTIONS_FILE)
        evaluate_and_save_predictions(self.student, self.splits.test, self.train_counts, self.cfg, self.device, path)
        return path

    def test_selected(self) -> None:
        """``federation.test_every_round: false``: score the selected model on the test split, once, at the end."""
        if self.best.round <= 0 or self.best_arrays is None or "balanced_accuracy" in self.best.test_metrics:
            return
        self.student.load_state_dict(self.best_arrays)
        test = evaluate_student(self.student, self.splits.test, self.train_counts, self.cfg, self.device)
        self.best.test_metrics = {**copy.deepcopy(test), "per_site": self.best.test_metrics.get("per_site", {})}
        logger.info("selected round %d: test bACC %.4f", self.best.round, test["balanced_accuracy"] or 0.0)

    def _select(self, server_round: int, score: float, test: dict | None, entry: RoundLog | None) -> None:
        self.best = Selection(server_round, score, copy.deepcopy(test) if test is not None else {})
        self.best_arrays = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        per_site = {}
        if entry is not None:
            per_site = {site: self._site_metrics(c, t) for site, (c, t) in self.recorder.by_site(entry.site_eval).items()
                        if len(c) == len(self.splits.class_names)}
        self.best.test_metrics["per_site"] = per_site
        self._save_best(server_round, score)


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
            str(r): {**recorder.by_site(recorder.failures(log)),
                     **{f"evaluate:{k}": v for k, v in recorder.by_site(log.eval_errors).items()}}
            for r, log in sorted(recorder.rounds.items()) if log.train_errors or log.missing or log.eval_errors
        },
        "rejected_replies": [{**rej, "site": recorder.site_of(rej.get("node_id", -1))}
                             for _, log in sorted(recorder.rounds.items()) for rej in log.rejections],
        "missing_replies": [{"round": r, "node_id": node, "site": recorder.site_of(node), "check": "timeout",
                             "reason": reason}
                            for r, log in sorted(recorder.rounds.items()) for node, reason in sorted(log.missing.items())],
        "rounds_without_aggregation": [r for r, log in sorted(recorder.rounds.items()) if log.aggregated is False],
        "rejected_aggregates": ({} if evaluator.guard is None
                                else {str(r): v for r, v in sorted(evaluator.guard.aggregate_rejections.items())}),
    })
    if cfg.privacy.mode != "off":
        metrics["privacy"] = _privacy_summary(cfg, evaluator, recorder)
        metrics["dp_epsilon_max"] = metrics["privacy"].get("epsilon_max")
        metrics["central_epsilon"] = metrics["privacy"].get("central_epsilon")
    return metrics


def _privacy_summary(cfg: Config, evaluator: ServerEvaluator, recorder: RoundRecorder) -> dict[str, Any]:
    """What ``metrics.json`` says about privacy: per-site and max ε (local), central ε, declined rounds."""
    p = cfg.privacy
    summary: dict[str, Any] = {"mode": p.mode, "delta": p.delta, "accountant": p.accountant,
                               "federated_evaluation": False}
    if p.mode == "local":
        last = max(recorder.rounds) if recorder.rounds else 0
        per_site = recorder.epsilon_so_far(last)
        summary.update({
            "target_epsilon": p.target_epsilon,
            "epsilon_per_site": per_site,
            "epsilon_max": max(per_site.values()) if per_site else None,
            "statistics": p.statistics,
            "prompt": p.prompt,
            "budget_declines": {str(r): recorder.by_site(log.budget_declines)
                                for r, log in sorted(recorder.rounds.items()) if log.budget_declines},
        })
    central = evaluator.central_dp
    if central is not None:
        summary.update({"central_epsilon": central.epsilon(), "central_rounds": central.rounds,
                        "central_clip_norm": central.clip_norm, "central_noise_multiplier": central.noise_multiplier,
                        "central_sample_rates": [q for _, q, _ in central.history],
                        "central": central.summary()})  # sensitivity, noise_std, client_sampling, epsilon, delta, ...
    return summary


def _site_test_sizes(recorder: RoundRecorder, server_round: int) -> dict[str, int]:
    """Local test images of each site (from its federated-evaluation counts, the selected round first)."""
    sizes: dict[str, int] = {}
    rounds = sorted(recorder.rounds, key=lambda r: (r != server_round, -r))
    for r in rounds:
        for site, (_correct, total) in recorder.by_site(recorder.rounds[r].site_eval).items():
            sizes.setdefault(site, int(sum(total)))
    return sizes


def _write_plots(run: RunDir, metrics: dict[str, Any], evaluator: ServerEvaluator, recorder: RoundRecorder) -> None:
    rows = run.history
    names = evaluator.splits.class_names
    train_counts = dict(zip(names, map(int, evaluator.train_counts)))
    test_counts = dict(zip(names, map(int, evaluator.splits.test.class_counts())))
    selected = metrics.get("best_round") if (metrics.get("best_round") or 0) > 0 else None
    chance = 1.0 / len(names) if names else None
    plot_history(rows, ["val_balanced_accuracy", "test_balanced_accuracy", "test_few_shot", "test_tail"],
                 run.plot_path("balanced_accuracy.png"), x_key="round", selected=selected, chance=chance,
                 title=f"Global model per round (test n={len(evaluator.splits.test)}, "
                       f"validation n={len(evaluator.splits.val)})")
    plot_per_class_rounds(rows, run.plot_path("per_class_recall_rounds.png"), train_counts, test_counts,
                          selected=selected, chance=chance)
    site_n = _site_test_sizes(recorder, selected or -1)
    plot_lines_by_group(rows, "round", "site_bacc/", run.plot_path("site_balanced_accuracy.png"),
                        "Balanced accuracy on each site's local test split",
                        labels={site: f"{site} (test n={n})" for site, n in site_n.items()},
                        ylabel="local test balanced accuracy", selected=selected, chance=chance)
    plot_weights_per_round(rows, run.plot_path("aggregation_weights.png"), selected=selected)
    if metrics.get("per_class_recall"):
        plot_per_class_recall(metrics["per_class_recall"], train_counts, run.plot_path("per_class_recall.png"))
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


def _strategy_state(cfg: Config, strategy: Any, recorder: RoundRecorder, server_round: int) -> dict[str, Any]:
    """What the strategy knows at the end of ``server_round`` (FedMAS factors, DRW phase) for the checkpoint.

    Every strategy here is stateless between rounds apart from the round number (the DRW
    switch is derived from it); the robust factors are stored for the record and the report.
    """
    state: dict[str, Any] = {"name": cfg.federation.strategy, "round": int(server_round)}
    if getattr(strategy, "central_dp", None) is not None:
        state["central_dp"] = strategy.central_dp.state_dict()
    if cfg.federation.strategy == "fedmas":
        switch = int(getattr(strategy, "drw_switch", 0))
        entry = recorder.rounds.get(server_round)
        state.update({
            "rule": cfg.federation.fedmas_rule,
            "drw_switch_round": switch + 1,  # first server round with DRW weights
            "phase": ("drw" if server_round >= switch + 1 else "fedavg") if cfg.federation.fedmas_rule == "mas_DRW"
            else cfg.federation.fedmas_rule,
            "robust_factors": {} if entry is None else recorder.by_site(entry.robust_factors),
            "last_weight_mode": str(getattr(strategy, "last_weight_mode", "")),
        })
    return state


@dataclass
class _Resume:
    """What a resumed federation takes from its checkpoint."""

    payload: dict[str, Any]
    path: Path

    @property
    def round(self) -> int:
        return int(self.payload["round"])


def load_resume_checkpoint(cfg: Config, run_dir: str | Path, config_source: str = "the config") -> _Resume:
    """The checkpoint a resumed run continues from (see :class:`server.checkpoints.ServerCheckpointStore`).

    Raises :class:`~server.checkpoints.ResumeError` naming the run directory when nothing can be
    resumed, or both config hashes when the checkpoint belongs to another run.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ResumeError(f"cannot resume {path}: no such run directory")
    store = ServerCheckpointStore(RunDir(path))
    payload, ckpt = store.load_latest(config_hash(cfg), config_source)
    if int(payload["num_rounds"]) != cfg.federation.num_rounds:  # covered by the hash; kept as a clear message
        raise ResumeError(f"checkpoint {ckpt} is from a {payload['num_rounds']}-round run, the config has "
                          f"{cfg.federation.num_rounds} rounds")
    return _Resume(payload, ckpt)


def run_federation(
    grid: Grid,
    cfg: Config,
    out_dir: str | Path,
    parallel_slots: int | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg.federation.num_rounds`` rounds on ``grid`` and write the run directory.

    After every round (round 0 = the initial model included) a checkpoint is written to
    ``checkpoints/server-round-XXXX.pt`` (:mod:`server.checkpoints`). With ``resume=True`` the
    run continues from the newest valid checkpoint in ``out_dir``: Flower's strategy starts
    from the checkpoint's global model for the remaining rounds, with round numbers offset
    so that the strategy, the clients and the history see the true round.

    Returns the content of ``metrics.json``.

    Raises
    ------
    FederationAborted
        After ``federation.max_failed_rounds`` consecutive rounds with too few valid replies;
        the checkpoint of the last round and ``aborted.json`` are written first.
    ResumeError
        A fresh run in a directory holding another run's checkpoints, or nothing to resume.
    """
    wall_start = time.perf_counter()
    fed = cfg.federation
    check_federation_config(cfg)
    resumed = load_resume_checkpoint(cfg, out_dir, f"the config of {Path(out_dir)}") if resume else None
    if resumed is None:
        check_fresh_run_dir(out_dir)
    run = RunDir(out_dir)
    run.save_config(cfg)
    store = ServerCheckpointStore(run)
    splits = cached_splits(cfg)
    recorder = RoundRecorder()
    strategy = recorder.instrument(build_strategy(
        strategy_federation_config(cfg), train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics, min_valid_replies=fed.min_valid_replies,
        max_update_norm=fed.max_update_norm, transfer_dtype=fed.transfer_dtype))
    evaluator = ServerEvaluator(cfg, splits, run, recorder, parallel_slots)
    strategy.evaluate_schedule = lambda server_round: evaluates_round(cfg, server_round)
    if cfg.prompt.scope == "federated":  # one prompt for every site: averaged while exploring, then frozen
        strategy.enable_federated_prompt(explore_rounds(cfg))
    if cfg.privacy.mode == "central":  # Poisson sampling, DP-FedAvg with a fixed denominator (docs/privacy.md §3)
        strategy.central_dp = evaluator.central_dp = CentralDP.from_config(cfg)
        strategy.central_dp.public_keys = evaluator.student.frozen_state_keys()
    done = 0
    wall_before = 0.0
    state_key = f"run-{uuid.uuid4().hex[:16]}"
    run_uid = state_key
    if resumed is not None:
        payload = resumed.payload
        done = resumed.round
        wall_before = float(payload.get("wall_seconds", 0.0))
        state_key, run_uid = str(payload["state_key"]), str(payload.get("run_uid", payload["state_key"]))
        recorder.load_payload(payload["recorder"])
        rows = [dict(r) for r in payload["history"]]
        run.history = rows[:-1]
        if rows:
            run.append_history(rows[-1])  # rewrites history.csv without rows of rounds after the checkpoint
        best = payload["best"]
        best_tensors = best.get("arrays") if best.get("arrays") is not None else payload["arrays"]
        evaluator.restore(best, arrays_from_tensors(best_tensors), payload.get("timings", []))
        if evaluator.central_dp is not None:
            evaluator.central_dp.load_state_dict(payload.get("strategy", {}).get("central_dp"))
        logger.info("resuming %s from %s: round %d of %d done", run.path, resumed.path.name, done, fed.num_rounds)
    guard = RoundGuard(recorder, round_offset=done, timeout_s=fed.round_timeout_s,
                       min_valid_replies=fed.min_valid_replies, update_norm_factor=fed.update_norm_factor,
                       max_update_norm=fed.max_update_norm, max_num_examples=fed.max_num_examples,
                       num_examples_growth=fed.num_examples_growth,
                       # central DP: whether a reply is kept must not depend on other sites' data (sensitivity)
                       num_examples_peer_ratio=(float("inf") if cfg.privacy.mode == "central"
                                                else fed.num_examples_peer_ratio))
    if resumed is not None:
        guard.load_state_dict(resumed.payload.get("guard"))
    guard.instrument(strategy)
    evaluator.guard = guard
    grid = BoundedWaitGrid(grid, fed.min_available_clients, fed.node_wait_s)
    completed = [done]  # last round whose checkpoint was written

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        best = evaluator.best
        store.save({
            "round": int(server_round),
            "num_rounds": int(fed.num_rounds),
            "config_hash": config_hash(cfg),
            "state_key": state_key,
            "run_uid": run_uid,
            "arrays": tensors_from_arrays(arrays),
            "strategy": _strategy_state(cfg, strategy, recorder, server_round),
            "best": {
                "round": int(best.round),
                "val_balanced_accuracy": float(best.val_balanced_accuracy),
                "test_metrics": plain(best.test_metrics),
                "arrays": None if best.round in (server_round, -1) else evaluator.best_arrays,
            },
            "history": plain(run.history),
            "recorder": recorder.to_payload(),
            "timings": plain(evaluator.timings),
            "failed_streak": int(guard.failed_streak),
            "guard": plain(guard.state_dict()),
            "rng": get_rng_state(),
            "wall_seconds": wall_before + time.perf_counter() - wall_start,
            "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        })

    def evaluate_fn(loop_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = guard.true_round(loop_round)
        if resumed is not None and loop_round == 0:
            set_rng_state(resumed.payload["rng"])  # the state the uninterrupted run had when round k+1 began
            return None
        try:
            result = evaluator(server_round, arrays)
        except (ValueError, RuntimeError) as exc:  # e.g. NaN probabilities of a finite but exploded model
            raise FederationAborted(
                f"server evaluation of round {server_round} failed ({type(exc).__name__}: {exc}); the global model of "
                f"round {completed[0]} is the last good one ({store.path_for(completed[0])}); continue with "
                f"`fopro-kd simulate --resume {run.path}`",
                server_round=completed[0], failed_rounds=list(guard.failed_rounds) + [server_round],
                run_dir=str(run.path),
            ) from exc
        if persists_round(cfg, server_round):  # with the clients' states (federation.state_persist_every)
            checkpoint(server_round, arrays)
            completed[0] = server_round
        if guard.failed_streak >= fed.max_failed_rounds:
            raise FederationAborted(
                f"stopping after round {server_round}: {guard.failed_streak} consecutive round(s) without enough valid "
                f"replies (federation.max_failed_rounds={fed.max_failed_rounds}, min_valid_replies="
                f"{fed.min_valid_replies}); state saved in {store.path_for(completed[0])}; fix the failing hospitals "
                f"and continue with `fopro-kd simulate --resume {run.path}`",
                server_round=completed[0], failed_rounds=list(guard.failed_rounds), run_dir=str(run.path),
            )
        if guard.budget_stop is not None and server_round < fed.num_rounds:
            raise FederationFinished(guard.budget_stop, server_round=server_round)
        return result

    remaining = fed.num_rounds - done
    logger.info("federation: %s, %d rounds (%d to run), %d clients, run directory %s", fed.strategy,
                fed.num_rounds, remaining, fed.num_clients, run.path)
    initial = (_initial_arrays(cfg, splits.train.num_classes) if resumed is None
               else arrays_from_tensors(resumed.payload["arrays"]))
    try:
        if remaining > 0:
            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=remaining,
                timeout=fed.round_timeout_s,
                train_config=ConfigRecord({"num-rounds": int(fed.num_rounds), STATE_KEY: state_key}),
                evaluate_fn=evaluate_fn,
            )
    except FederationAborted as exc:
        metrics = _final_metrics(cfg, evaluator, recorder, wall_before + time.perf_counter() - wall_start)
        run.write_json("aborted.json", {"reason": str(exc), "round": exc.server_round,
                                        "failed_rounds": exc.failed_rounds, "partial_metrics": metrics})
        logger.error("federation aborted: %s", exc)
        raise
    except NodesUnavailable as exc:  # a dead hospital: stop instead of waiting forever (resumable)
        aborted = FederationAborted(
            f"stopping after round {completed[0]}: {exc}; state saved in {store.path_for(completed[0])}; when the "
            f"hospitals are back, continue with `fopro-kd simulate --resume {run.path}` (or run config "
            f"'{RUN_CONFIG_RESUME_DIR_KEY}')",
            server_round=completed[0], failed_rounds=list(guard.failed_rounds), run_dir=str(run.path),
        )
        metrics = _final_metrics(cfg, evaluator, recorder, wall_before + time.perf_counter() - wall_start)
        run.write_json("aborted.json", {"reason": str(aborted), "round": completed[0], "check": "nodes-unavailable",
                                        "connected": exc.connected, "required": exc.required,
                                        "waited_s": exc.waited_s, "failed_rounds": aborted.failed_rounds,
                                        "partial_metrics": metrics})
        logger.error("federation aborted: %s", aborted)
        raise aborted from exc
    except FederationFinished as exc:  # e.g. every hospital has spent its privacy budget: a clean end
        stopped = {"round": exc.server_round, "reason": str(exc)}
        logger.warning("federation ended after round %d of %d: %s", exc.server_round, fed.num_rounds, exc)
    else:
        stopped = None
    evaluator.test_selected()  # test_every_round false: the selected model's test scores, computed once
    metrics = _final_metrics(cfg, evaluator, recorder, wall_before + time.perf_counter() - wall_start)
    metrics["resumed_from_round"] = done if resumed is not None else None
    metrics["stopped_early"] = stopped
    evaluator.save_test_predictions()
    run.write_json("metrics.json", metrics)
    _write_plots(run, metrics, evaluator, recorder)
    try_write_run_report(run.path)
    logger.info("federation finished: best round %d, test bACC %s", metrics["best_round"],
                metrics.get("balanced_accuracy"))
    return metrics


def make_server_app(
    cfg: Config, out_dir: str | Path, parallel_slots: int | None = None, *, resume: bool = False
) -> ServerApp:
    """A ServerApp bound to ``cfg`` writing to ``out_dir`` (simulation and tests); ``resume`` continues it."""
    server_app = ServerApp()
    out = Path(out_dir).resolve()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out, parallel_slots, resume=resume)

    return server_app


def _absolute_dir(key: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise ConfigError(
            f"run config '{key}' must be an absolute path (the app runs from an installed copy), got {raw!r}"
        )
    return path.resolve()


def _out_dir_from_run_config(cfg: Config, context: Context) -> Path:
    raw = str(context.run_config.get(RUN_CONFIG_OUT_DIR_KEY, "") or "")
    if not raw:
        return default_run_dir(cfg, "federated").resolve()
    return _absolute_dir(RUN_CONFIG_OUT_DIR_KEY, raw)


def run_dirs_from_run_config(cfg: Config, context: Context) -> tuple[Path, bool]:
    """``(run directory, resume?)`` from the run config keys ``out-dir`` and ``resume-dir``."""
    resume_raw = str(context.run_config.get(RUN_CONFIG_RESUME_DIR_KEY, "") or "")
    if not resume_raw:
        return _out_dir_from_run_config(cfg, context), False
    resume_dir = _absolute_dir(RUN_CONFIG_RESUME_DIR_KEY, resume_raw)
    out_raw = str(context.run_config.get(RUN_CONFIG_OUT_DIR_KEY, "") or "")
    if out_raw and _absolute_dir(RUN_CONFIG_OUT_DIR_KEY, out_raw) != resume_dir:
        raise ConfigError(
            f"run config '{RUN_CONFIG_RESUME_DIR_KEY}' ({resume_dir}) continues that run directory; "
            f"'{RUN_CONFIG_OUT_DIR_KEY}' ({out_raw}) must be empty or the same path"
        )
    return resume_dir, True


app = ServerApp()
"""The ServerApp of ``flwr run`` (``[tool.flwr.app.components] serverapp``)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the config from the run config and run (or, with ``resume-dir``, continue) the federation."""
    cfg = config_from_run_config(context.run_config)
    torch.set_num_threads(max(1, cfg.train.num_threads or torch.get_num_threads()))
    out, resume = run_dirs_from_run_config(cfg, context)
    run_federation(grid, cfg, out, resume=resume)
