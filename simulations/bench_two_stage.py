"""``bench two_stage``: a two-stage FoPro-KD distillation epoch against a BSM epoch, same run.

The claim of ``prompt.schedule: two_stage`` is that, once the prompt is frozen and
T(FPG(v(x))) is cached per image and teacher view, an epoch costs about a BSM epoch. Measured
here on HAM10000's shapes (7 classes with HAM's counts, student ResNet-18 at 64 px from 128 px
images, the MobileNetV2 teacher at 128 px, real weights from ../shared when present; images are
random: speed does not depend on their content), with flips as the augmentation (the recipe in
which the cache is exact):

* ``bsm``: the student alone;
* ``fopro-kd two-stage (cached)``: the distillation stage, targets looked up in the cache;
* ``fopro-kd joint (online)``: the joint schedule, prompt trained on every batch (discriminative);
* ``ekd (online)``: the teacher forward every batch, no prompt.

Step times are medians of interleaved calls; the one-time costs of the two-stage schedule (the
cache build per image and view, reported per HAM10000 training set of 9.6k images) are measured
once. Target (issue "Evidence that can rank methods"): two-stage epoch / BSM epoch <= 1.2.

The teacher's build: the one-time teacher passes (the cache build, and the exploration stage's
backward through the teacher to the prompt) dominate a two-stage run's wall time on CPU, so the
same weights are timed as three builds, interleaved: the plain layout, channels-last, and
channels-last with the BatchNorms folded into the convolutions (what training uses unless the
prompt objective reads the BatchNorm layers): a no-grad feature pass and a pass with the input
gradient, with each build's largest feature difference from the plain one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from fopro_kd.config import Config, config_from_dict
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.training.components import build_models
from fopro_kd.training.trainer import LocalTrainer
from simulations.bench_common import format_table, measure_interleaved, paired_ratio, sync, target
from simulations.bench_step import HAM_COUNTS, random_imageset, teacher_section

logger = logging.getLogger("fopro_kd.bench")

HAM_TRAIN_IMAGES = 9600
FLIPS_ONLY = {"enabled": True, "affine_scale": [1.0, 1.0], "affine_translate": 0.0, "rotation_degrees": 0.0,
              "color_jitter": [0.0, 0.0, 0.0, 0.0], "teacher_view": "flips"}


def variant_config(variant: str, image_size: int, student_size: int, teacher_size: int, batch: int) -> Config:
    train: dict[str, Any] = {"batch_size": batch, "loss": "bsm", "epochs": 8}
    prompt: dict[str, Any] = {}
    akd: dict[str, Any] = {"mode": "off"}
    if variant == "bsm":
        train["method"] = "bsm"
    elif variant == "ekd (online)":
        train["method"] = "ekd"
    elif variant == "fopro-kd joint (online)":
        train["method"] = "fopro-kd"
        akd["mode"] = "discriminative"
    elif variant == "fopro-kd two-stage (cached)":
        train["method"] = "fopro-kd"
        prompt = {"schedule": "two_stage", "explore_epochs": 0, "param": "radial"}
    else:  # pragma: no cover - programming error
        raise ValueError(variant)
    return config_from_dict({
        "seed": 0,
        "data": {"kind": "synthetic", "image_size": image_size, "num_classes": len(HAM_COUNTS)},
        "student": {"arch": "resnet18", "init": "random", "input_size": student_size},
        "teacher": teacher_section("mobilenetv2_100", teacher_size),
        "augment": FLIPS_ONLY, "akd": akd, "prompt": prompt, "train": train,
    })


VARIANTS = ("bsm", "fopro-kd two-stage (cached)", "ekd (online)", "fopro-kd joint (online)")
LAYOUTS = ("channels_last", "contiguous")


TEACHER_BUILDS = {  # name: (channels_last, fold_batchnorm); the last is what training uses for most objectives
    "contiguous": (False, False),
    "channels_last": (True, False),
    "folded": (True, True),
}


def teacher_numerics_section(teacher: FrozenTeacher, batch: int, warmup: int, repeats: int,
                             device: torch.device) -> dict[str, Any]:
    """Images/s of the teacher's no-grad and input-gradient passes for each of :data:`TEACHER_BUILDS`, same
    weights, interleaved; speedups against the plain contiguous build, and each build's largest feature
    difference from it. ``teacher``: built unfolded (the others are rebuilt from copies of its model)."""
    import copy

    if teacher.batchnorm_folded:
        raise ValueError("teacher_numerics_section needs the unfolded teacher")
    teachers = {
        name: FrozenTeacher(copy.deepcopy(teacher.model), input_size=teacher.input_size,
                            mean=teacher.mean.flatten().tolist(), std=teacher.std.flatten().tolist(),
                            channels_last=cl, fold_batchnorm=fold).to(device)
        for name, (cl, fold) in TEACHER_BUILDS.items()
    }
    x = torch.rand(batch, 3, teacher.input_size, teacher.input_size, generator=torch.Generator().manual_seed(5))
    x = x.to(device)

    def no_grad(t: FrozenTeacher) -> None:
        with torch.no_grad():
            t(x)

    def input_grad(t: FrozenTeacher) -> None:
        xi = x.clone().requires_grad_(True)
        t(xi).sum().backward()

    candidates = {f"{name} {kind}": (lambda t=t, f=f: f(t)) for name, t in teachers.items()
                  for kind, f in (("no-grad", no_grad), ("input-grad", input_grad))}
    timed = measure_interleaved(candidates, warmup, repeats, device)
    with torch.no_grad():
        base = teachers["contiguous"](x)
        diffs = {name: float((t(x) - base).abs().max()) for name, t in teachers.items()}
    rows = []
    for kind in ("no-grad", "input-grad"):
        row: dict[str, Any] = {"pass": kind}
        for name in TEACHER_BUILDS:
            row[f"{name}_images_s"] = batch / timed[f"{name} {kind}"]["median_s"]
        for name in list(TEACHER_BUILDS)[1:]:
            row[f"{name}_speedup"] = paired_ratio(timed, f"contiguous {kind}", f"{name} {kind}")
            row[f"{name}_speedup_cpu"] = paired_ratio(timed, f"contiguous {kind}", f"{name} {kind}", cpu=True)
        rows.append(row)
    return {"rows": rows, "max_abs_feature_diff": diffs, "batch": batch,
            "folded_batchnorms": teachers["folded"].batchnorm_folded}


def build_teacher_unfolded(teacher_size: int) -> FrozenTeacher:
    """The benchmark's teacher as timm builds it (BatchNorms in place), for the builds comparison."""
    from fopro_kd.models.teacher import build_teacher

    cfg = variant_config("bsm", teacher_size, teacher_size, teacher_size, 2)
    torch.manual_seed(0)
    return build_teacher(cfg.teacher)


def run(opts: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(opts["device"])
    if opts["quick"]:
        image_size, student_size, teacher_size, batch, steps, warmup, repeats = 32, 32, 32, 4, 2, 1, 2
    else:
        image_size, student_size, teacher_size, batch, steps, warmup, repeats = 128, 64, 128, 32, 4, 1, 5
    warmup = opts.get("warmup") or warmup
    repeats = opts.get("repeats") or repeats
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    data = random_imageset(steps * batch, image_size, seed=11)
    teacher = None
    trainers: dict[str, LocalTrainer] = {}
    cache_build_s = None
    for variant in VARIANTS:
        cfg = variant_config(variant, image_size, student_size, teacher_size, batch)
        torch.manual_seed(0)
        if teacher is None and cfg.train.method != "bsm":
            from fopro_kd.models.teacher import build_teacher
            from fopro_kd.run_plan import resolve_run_plan

            teacher = build_teacher(cfg.teacher, fold_batchnorm=resolve_run_plan(cfg).teacher_folds_batchnorm)
        t = teacher if cfg.train.method != "bsm" else None
        student, prompt = build_models(cfg, len(HAM_COUNTS), t)
        trainer = LocalTrainer(cfg, student, t, prompt, np.asarray(HAM_COUNTS), device)
        if variant.startswith("fopro-kd two-stage"):
            sync(device)
            start = time.perf_counter()
            trainer.enable_feature_cache(data)
            sync(device)
            cache_build_s = time.perf_counter() - start
        trainers[variant] = trainer
    timed = measure_interleaved(
        {name: (lambda tr=tr: tr.train(data, epochs=1, max_steps=steps)) for name, tr in trainers.items()},
        warmup, repeats, device,
    )
    rows = []
    for name in VARIANTS:
        step_s = timed[name]["median_s"] / steps
        rows.append({
            "variant": name, "step_s": step_s, "images_s": batch / step_s,
            "epoch_s_ham": step_s * HAM_TRAIN_IMAGES / batch,
            "vs_bsm": paired_ratio(timed, name, "bsm"), "vs_bsm_cpu": paired_ratio(timed, name, "bsm", cpu=True),
        })
    per_image_view = cache_build_s / (len(data) * trainers["fopro-kd two-stage (cached)"].feature_cache.num_views)
    peak_load = max(load_start, (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0))
    use_cpu = device.type == "cpu" and peak_load > (os.cpu_count() or 1)
    sfx = "_cpu" if use_cpu else ""
    unfolded = teacher if not teacher.batchnorm_folded else build_teacher_unfolded(teacher_size)
    layout = teacher_numerics_section(unfolded, batch * 2, warmup, repeats, device)
    two = next(r for r in rows if r["variant"].startswith("fopro-kd two-stage"))
    joint = next(r for r in rows if r["variant"].startswith("fopro-kd joint"))
    return {
        "what": (f"step time of LocalTrainer.train, student resnet18 @ {student_size} px from {image_size} px images, "
                 f"teacher mobilenetv2_100 @ {teacher_size} px, batch {batch}, flips only; medians of {repeats} "
                 f"interleaved calls of {steps} steps after {warmup} warm-up; epoch_s_ham = step time x "
                 f"{HAM_TRAIN_IMAGES}/{batch}"),
        "rows": rows,
        "cache_build_s_per_image_view": per_image_view,
        "cache_build_s_ham": per_image_view * HAM_TRAIN_IMAGES * 4,
        "cache_bytes_ham_float32": HAM_TRAIN_IMAGES * 4 * 1280 * 4,
        "teacher_numerics": layout,
        "targets_basis": "process CPU time (under load)" if use_cpu else "wall clock",
        "targets": [
            target("two-stage FoPro-KD distillation epoch / BSM epoch", two["vs_bsm" + sfx], 1.2, "<=", "x",
                   note=f"wall {two['vs_bsm']:.3f}, CPU {two['vs_bsm_cpu']:.3f}; joint online FoPro-KD: "
                        f"{joint['vs_bsm' + sfx]:.2f}x"),
        ],
    }


def render(result: dict[str, Any]) -> str:
    return "\n".join([
        result["what"], f"targets judged on {result['targets_basis']}", "",
        format_table(result["rows"], ["variant", "images_s", "epoch_s_ham", "vs_bsm", "vs_bsm_cpu"]), "",
        f"one-time cost of the cache: {result['cache_build_s_per_image_view'] * 1e3:.2f} ms per image and view "
        f"= {result['cache_build_s_ham']:.0f} s for HAM10000's training set x 4 flip views "
        f"({result['cache_bytes_ham_float32'] / 1e6:.0f} MB float32, half in float16)", "",
        f"teacher builds (same weights, batch {result['teacher_numerics']['batch']}; speedup = contiguous time / "
        f"build's time; largest feature difference from contiguous: "
        + ", ".join(f"{k} {v:.1e}" for k, v in result["teacher_numerics"]["max_abs_feature_diff"].items()) + "):",
        format_table(result["teacher_numerics"]["rows"],
                     ["pass", *[f"{n}_images_s" for n in TEACHER_BUILDS], "channels_last_speedup", "folded_speedup",
                      "folded_speedup_cpu"]),
    ])
