"""Server-side scoring and model selection: one history row per round, the best-validation round kept.

The selected round's weights go to ``best.pt``; the test split is for reporting only, never for
selection (method.md §9.2); with ``federation.test_every_round: false`` it is scored once, for the
selected model, at the end.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord

from fopro_kd.checkpoint import save_checkpoint
from fopro_kd.config import Config
from fopro_kd.data.dataset import DatasetSplits
from fopro_kd.round_schedule import evaluates_round
from fopro_kd.run_dir import RunDir
from fopro_kd.run_plan import resolve_run_plan
from fopro_kd.seeding import select_device
from fopro_kd.stats import LAST_PREDICTIONS_FILE, PREDICTIONS_FILE
from fopro_kd.training.single_site import (
    evaluate_and_save_predictions,
    evaluate_student,
    student_checkpoint,
)
from fopro_kd.federation.evaluation import build_global_student, site_metrics_from_counts
from server.history import RoundLog, RoundRecorder
from server.rounds import (
    RoundGuard,
)
from server.strategies.central_dp import CentralDP

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["Selection", "ServerEvaluator"]


@dataclass
class Selection:
    """Best round so far on the validation split."""

    round: int = -1
    val_balanced_accuracy: float = -1.0
    test_metrics: dict[str, Any] = field(default_factory=dict)


TIMING_COLUMNS: tuple[str, ...] = ("round_seconds", "server_eval_seconds", "client_train_seconds_max",
                                   "client_train_seconds_sum", "outside_training_share")
"""The history.csv columns that time a round (wall clock), in :meth:`ServerEvaluator._timing`'s order:
the only columns in which two runs of one seed may differ."""

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
        self._complete_site_scores(server_round - 1)
        entry = self.recorder.rounds.get(server_round) if server_round > 0 else None
        if not evaluates_round(self.cfg, server_round):  # federation.evaluate_every: the clients' figures only
            self.run.append_history(self._row(server_round, None, None, entry, 0.0, started))
            self._last_end = time.perf_counter()
            return None
        self.student.load_state_dict(arrays.to_torch_state_dict())
        val = evaluate_student(self.student, self.splits.val, self.train_counts, self.cfg, self.device)
        test = None
        if server_round == self.cfg.federation.num_rounds:
            # the last round's model, for comparisons at a fixed budget without the selection (--model last);
            # a federation that ended early (a spent privacy budget) has no last round and no such file
            last = evaluate_and_save_predictions(self.student, self.splits.test, self.train_counts, self.cfg,
                                                 self.device, self.run.resolve(LAST_PREDICTIONS_FILE))
            test = last if self.cfg.federation.test_every_round else None
        elif self.cfg.federation.test_every_round:
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
        timing = dict(zip(TIMING_COLUMNS, (round_seconds, eval_seconds, max(train) if train else 0.0,
                                           float(sum(train)), outside)))
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
        local_dp = resolve_run_plan(self.cfg).local_dp
        names = self.splits.class_names
        recalls = {} if test is None else test["per_class_recall"]
        row.update({f"recall/{name}": recalls.get(name) for name in (recalls or names)})
        if entry is not None:
            by_site = self.recorder.by_site
            row.update({f"weight/{site}": w for site, w in by_site(entry.weights).items()})
            row.update({f"bytes/{site}": b for site, b in by_site(entry.bytes_up).items()})
            row.update(self._site_columns(server_round, entry))
            row["clients_aggregated"] = len(entry.weights)
            row["clients_rejected"] = len(entry.rejections) + len(entry.missing)  # error and missing replies included
            row["clients_failed"] = len(self.recorder.failures(entry))  # error replies + no reply before the timeout
            if self.guard is not None:  # robust aggregation (docs/reliability.md): bound used, aggregate discarded
                row["update_norm_bound"] = self.guard.norm_bounds.get(server_round)
                row["aggregate_rejected"] = self.guard.aggregate_rejections.get(server_round, "")
            if local_dp:
                row["clients_declined"] = len(entry.budget_declines)  # out of privacy budget: no model sent
        if local_dp and server_round > 0:
            row.update({f"epsilon/{site}": eps for site, eps in self.recorder.epsilon_so_far(server_round).items()})
        if self.central_dp is not None:
            row["central-epsilon"] = self.central_dp.epsilon()
            row["central-noise-std"] = self.central_dp.last_noise_std if server_round > 0 else 0.0
        row.update(self._timing(entry, eval_seconds, started))
        return row

    def _site_columns(self, server_round: int, entry: RoundLog) -> dict[str, Any]:
        """``site_bacc/<site>`` of the round's federated evaluation (counts of the wrong length ignored)."""
        columns = {}
        for site, (correct, total) in self.recorder.by_site(entry.site_eval).items():
            if len(correct) != len(self.splits.class_names):
                logger.warning("round %d: %s sent %d per-class counts for %d classes; ignored", server_round,
                               site, len(correct), len(self.splits.class_names))
                continue
            columns[f"site_bacc/{site}"] = self._site_metrics(correct, total)["balanced_accuracy"]
        return columns

    def _per_site(self, entry: RoundLog | None) -> dict[str, dict[str, Any]]:
        if entry is None:
            return {}
        return {site: self._site_metrics(c, t) for site, (c, t) in self.recorder.by_site(entry.site_eval).items()
                if len(c) == len(self.splits.class_names)}

    def _complete_site_scores(self, scored_round: int) -> None:
        """``federation.evaluate_in_train``: round k's site scores came with round k + 1's train replies.

        They complete round k's history row (written before they existed) and, when round k is
        the selected one, its per-site report. Nothing to do without late scores.
        """
        entry = self.recorder.rounds.get(scored_round) if scored_round > 0 else None
        if entry is None or not entry.site_eval:
            return
        row = next((r for r in reversed(self.run.history) if r.get("round") == scored_round), None)
        columns = self._site_columns(scored_round, entry)
        if row is not None and any(row.get(k) != v for k, v in columns.items()):
            row.update(columns)
            self.run.write_history()
        if self.best.round == scored_round:
            self.best.test_metrics["per_site"] = self._per_site(entry)

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
        self.best.test_metrics["per_site"] = self._per_site(entry)
        self._save_best(server_round, score)
