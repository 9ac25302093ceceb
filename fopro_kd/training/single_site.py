"""Single-site training ("EKD with one client"): epochs, model selection on val, report on test.

Orchestration only; the loop itself is :class:`~fopro_kd.training.trainer.LocalTrainer`.
The best epoch is chosen on the balanced *validation* split and reported once on the
*test* split (the original code swapped them, method.md §9.2).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fopro_kd.checkpoint import load_checkpoint, save_checkpoint
from fopro_kd.config import Config
from fopro_kd.data import build_splits
from fopro_kd.data.dataset import DatasetSplits, ImageSet
from fopro_kd.metrics import compute_metrics, format_summary
from fopro_kd.models.student import EKDStudent
from fopro_kd.plots import plot_history, plot_per_class_recall, plot_prompt_mask
from fopro_kd.run_dir import RunDir
from fopro_kd.seeding import configure_threads, seed_everything, select_device
from fopro_kd.stats import LAST_PREDICTIONS_FILE, PREDICTIONS_FILE, save_predictions
from fopro_kd.training.components import build_configured_student, build_models, shared_teacher
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.prompt import FourierPrompt, mask_statistics, prompt_input
from fopro_kd.training.resume import ResumeState, drop_resume_state, load_resume_state, save_resume_state
from fopro_kd.training.teacher_view import teacher_shift
from fopro_kd.training.trainer import LocalTrainer, predict
from fopro_kd.run_plan import student_input_size

logger = logging.getLogger("fopro_kd.training")

STUDENT_FORMAT = "fopro-kd-student/1"


def evaluate_student(
    student: EKDStudent, data: ImageSet, train_counts: np.ndarray, cfg: Config, device: torch.device
) -> dict[str, Any]:
    probs = predict(student, data, cfg.train.eval_batch_size, device, student_input_size(cfg))
    return compute_metrics(data.labels.numpy(), probs, data.class_names, train_counts, cfg.metrics)


def evaluate_and_save_predictions(
    student: EKDStudent, data: ImageSet, train_counts: np.ndarray, cfg: Config, device: torch.device,
    path: str | Path,
) -> dict[str, Any]:
    """:func:`evaluate_student` that also writes the image ids, labels and class probabilities to ``path``.

    The saved predictions are what the paired statistics (:mod:`fopro_kd.stats`, the benchmark
    script, ``fopro-kd report``) resample: two runs on the same test images can then be compared
    image by image instead of only by their summary scores.
    """
    probs = predict(student, data, cfg.train.eval_batch_size, device, student_input_size(cfg))
    labels = data.labels.numpy()
    save_predictions(path, data.ids, labels, probs, data.class_names)
    return compute_metrics(labels, probs, data.class_names, train_counts, cfg.metrics)


def student_checkpoint(
    student: EKDStudent, cfg: Config, class_names: list[str], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "format": STUDENT_FORMAT,
        "arch": cfg.student.arch,
        "num_classes": student.num_classes,
        "teacher_dim": student.teacher_dim,
        "class_names": list(class_names),
        "state_dict": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        "config": cfg.to_dict(),
        **(extra or {}),
    }


def load_student(path: str | Path, cfg: Config) -> tuple[EKDStudent, dict[str, Any]]:
    """Rebuild a student from a checkpoint; the architecture must match ``cfg.student``."""
    payload = load_checkpoint(path, expected_format=STUDENT_FORMAT)
    if payload["arch"] != cfg.student.arch:
        raise ValueError(
            f"checkpoint {path} holds a {payload['arch']!r} student but the config says student.arch "
            f"{cfg.student.arch!r}"
        )
    student = build_configured_student(cfg, int(payload["num_classes"]), payload.get("teacher_dim"), load_weights=False)
    student.load_state_dict(payload["state_dict"])
    return student, payload


def _write_outputs(
    run: RunDir, metrics: dict[str, Any], prompt_mask: np.ndarray | None, splits: DatasetSplits
) -> None:
    run.write_json("metrics.json", metrics)
    plot_per_class_recall(
        metrics["per_class_recall"], dict(zip(splits.class_names, map(int, splits.train.class_counts()))),
        run.plot_path("per_class_recall.png"),
    )
    plot_history(run.history, ["val_balanced_accuracy", "loss"], run.plot_path("history.png"))
    if prompt_mask is not None:
        plot_prompt_mask(prompt_mask, run.plot_path("prompt_mask.png"), title="learned FPG amplitude multiplier")


def prompt_diagnostics(prompt: FourierPrompt, teacher: FrozenTeacher, x01: torch.Tensor, domain: str) -> dict[str, float]:
    """``prompt_mask_{min,max,dev}`` and ``teacher_shift`` on ``x01`` (history.csv columns): a prompt
    that helps must move, and these say whether and how far it did."""
    stats = mask_statistics(prompt, prompt_input(teacher, x01, domain) if prompt.param == "generator" else None)
    return {
        "prompt_mask_min": stats["min"], "prompt_mask_max": stats["max"], "prompt_mask_dev": stats["dev"],
        "teacher_shift": teacher_shift(teacher, x01, prompt, domain),
    }


def train_single_site(
    cfg: Config,
    out_dir: str | Path,
    progress: bool = True,
    splits: DatasetSplits | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Train, select on val, report on test; write everything under ``out_dir``.

    ``resume``: continue a run of the same config stopped in ``out_dir`` after its last
    complete epoch (:mod:`fopro_kd.training.resume`); without a resume state it starts fresh.
    """
    seed_everything(cfg.seed)
    configure_threads(cfg.train.num_threads)
    device = select_device(cfg.device)
    run = RunDir(out_dir)
    run.save_config(cfg)
    splits = splits or build_splits(cfg)
    run.write_json("data_summary.json", {"name": splits.name, "counts": splits.summary(), "info": splits.info})
    train_counts = splits.train.class_counts()
    teacher = shared_teacher(cfg)
    # Re-seed after the teacher: building it may draw from the global RNG (timm's random init
    # before a checkpoint loads, or the demo teacher's pretraining on a cache miss), and the
    # student's initial weights must not depend on how the teacher was obtained.
    seed_everything(cfg.seed)
    student, prompt = build_models(cfg, splits.train.num_classes, teacher)
    trainer = LocalTrainer(cfg, student, teacher, prompt, train_counts, device)
    best: dict[str, Any] = {"score": -1.0, "epoch": -1, "state": None, "prompt": None}
    # a fixed, un-augmented validation batch on which the prompt's effect is measured every epoch
    probe_batch = splits.val.images[: min(64, len(splits.val))].float().div(255).to(device) if prompt is not None else None
    first_epoch = 0
    # DP runs do not resume: what a stopped epoch drew would have to be charged by a ledger (federations have one)
    keeps_resume_state = cfg.train.save_resume_state and trainer.dp is None
    if resume and trainer.dp is not None:
        logger.warning("privacy.mode %r: a stopped DP run is not resumed (its stopped epoch's noise draws would go "
                       "uncharged); training from the first epoch", cfg.privacy.mode)
        resume = False
    stopped = load_resume_state(run, cfg) if resume else None
    if stopped is not None:  # everything the first epochs changed, and the random state they left
        student.load_state_dict(stopped.student)
        trainer.load_state_dict(stopped.trainer)
        best, run.history, first_epoch = stopped.best, stopped.history, stopped.epochs_done
        torch.set_rng_state(stopped.torch_rng)
        logger.info("resuming %s after epoch %d of %d", run.path, first_epoch, cfg.train.epochs)
    elif resume:
        logger.info("nothing to resume in %s: training from the first epoch", run.path)
    for epoch in range(first_epoch, cfg.train.epochs):
        start = time.perf_counter()
        result = trainer.train(splits.train, epochs=1, total_epochs=cfg.train.epochs, progress=progress)
        train_seconds = time.perf_counter() - start
        val = evaluate_student(student, splits.val, train_counts, cfg, device)
        row = {
            "epoch": epoch + 1,
            **result.losses,
            "val_balanced_accuracy": val["balanced_accuracy"],
            "val_few_shot": val["few_shot"],
            "epoch_seconds": train_seconds,
            "images_per_second": result.num_examples / max(train_seconds, 1e-9),
        }
        if prompt is not None and probe_batch is not None and len(probe_batch):
            row.update(prompt_diagnostics(prompt, teacher, probe_batch, cfg.prompt.domain))
        if trainer.dp is not None:  # ε spent so far (whole run: the accountant composes the epochs)
            row["dp_epsilon"] = trainer.dp.metrics()["dp-epsilon"]
        run.append_history(row)
        logger.info("epoch %d/%d  loss %.4f  val bACC %.4f  (%.1f s)", epoch + 1, cfg.train.epochs,
                    result.losses.get("loss", float("nan")), val["balanced_accuracy"], train_seconds)
        if val["balanced_accuracy"] > best["score"]:
            best = {
                "score": val["balanced_accuracy"], "epoch": epoch + 1,
                "state": copy.deepcopy(student.state_dict()),
                "prompt": None if prompt is None else copy.deepcopy(prompt.state_dict()),
            }
            save_checkpoint(
                run.resolve("best.pt"),
                student_checkpoint(student, cfg, splits.class_names,
                                   {"epoch": epoch + 1, "val_balanced_accuracy": float(val["balanced_accuracy"]),
                                    "prompt_state": best["prompt"]}),
            )
        if keeps_resume_state and epoch + 1 < cfg.train.epochs:
            save_resume_state(run, cfg, ResumeState(
                epochs_done=epoch + 1, student=student.state_dict(), trainer=trainer.state_dict(), best=best,
                history=run.history, torch_rng=torch.get_rng_state()))
    # the last epoch's test score too: model selection on a small validation split is itself an
    # ablation (docs/results.md); the selected checkpoint stays the reported one. Its predictions are kept
    # so that runs can also be compared at a fixed budget, without the selection's noise (--model last)
    last_epoch = evaluate_and_save_predictions(student, splits.test, train_counts, cfg, device,
                                               run.resolve(LAST_PREDICTIONS_FILE))
    student.load_state_dict(best["state"])
    if prompt is not None and best["prompt"] is not None:
        prompt.load_state_dict(best["prompt"])
    metrics = evaluate_and_save_predictions(student, splits.test, train_counts, cfg, device,
                                            run.resolve(PREDICTIONS_FILE))
    metrics.update({
        "method": cfg.train.method,
        "best_epoch": best["epoch"],
        "val_balanced_accuracy": best["score"],
        "teacher": None if teacher is None else teacher.weights_desc,
        "mean_epoch_seconds": float(np.mean([r["epoch_seconds"] for r in run.history])),
        "last_epoch": {key: last_epoch[key] for key in ("balanced_accuracy", "per_class_recall")},
    })
    if trainer.dp is not None:
        # every epoch's DP-SGD counts, also those after the selected one: selecting the best
        # checkpoint on the validation split looked at all of them
        metrics["privacy"] = {**trainer.dp.metrics(), "accountant": cfg.privacy.accountant}
    prompt_mask = None
    if prompt is not None:
        sample = None if cfg.prompt.param == "free" else teacher.resize(
            splits.train.images[: cfg.train.batch_size].float().div(255).to(device))
        with torch.no_grad():
            prompt_mask = prompt.multiplier(sample).detach().float().cpu().numpy()
    _write_outputs(run, metrics, prompt_mask, splits)
    drop_resume_state(run)  # finished: metrics.json is the record now
    logger.info("test results (best val epoch %d):\n%s", best["epoch"], format_summary(metrics))
    from fopro_kd.run_report import try_write_run_report  # report.html: a view of the files written above

    try_write_run_report(run.path)
    return metrics


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, split: str = "test") -> dict[str, Any]:
    """Re-score a saved student on the config's ``split`` (data rebuilt from the config)."""
    device = select_device(cfg.device)
    student, payload = load_student(checkpoint, cfg)
    student.to(device)
    splits = build_splits(cfg)
    if list(payload["class_names"]) != list(splits.class_names):
        raise ValueError(
            f"checkpoint {checkpoint} was trained on classes {payload['class_names']}, "
            f"but the config's data has {splits.class_names}"
        )
    data = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    return evaluate_student(student, data, splits.train.class_counts(), cfg, device)
