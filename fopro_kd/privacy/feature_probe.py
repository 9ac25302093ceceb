"""The cheap frozen-feature path: DP-SGD on a linear probe over cached backbone features.

Why: with a public, frozen backbone (``student.init: teacher`` / ``imagenet``,
``student.freeze_backbone: true``), no augmentation and method ``bsm``, the only thing DP-SGD
trains is the main head ``W h + b`` on the backbone feature ``h = φ(x)``, and ``h`` is a fixed
function of the image. Computing ``φ(x)`` once per training image (as the teacher feature cache,
``fopro_kd/training/feature_cache.py``, does for the teacher) turns a DP epoch into a few
matrix products, so the regime in which DP-SGD works — large expected batches, many epochs
(Tramèr & Boneh, ICLR 2021; De et al., 2022) — becomes affordable on 2 CPU cores.

What is private and what is not (docs/privacy.md §6.3):

* the features are computed with the *public* frozen backbone in eval mode (public BatchNorm
  statistics): every ``h_i`` depends on image *i* only, so the cache is not a release and a
  per-example loss on it still has per-example sensitivity;
* ``privacy.feature_norm: l2`` divides each ``h_i`` by its own norm: per-example and
  data-independent (no mean or variance estimated on private data). It also bounds every
  per-sample gradient of the head: ``‖∇_W‖ = ‖p − e_y‖·‖ĥ‖ ≤ √2``, ``‖∇_b‖ ≤ √2``;
* DP-SGD: Poisson sampling with expected batch ``train.batch_size`` (q = 1/⌈N/B⌉, as the
  trainer), per-sample clipping at ``privacy.max_grad_norm`` and Gaussian noise by Opacus'
  ``GradSampleModule`` + ``DPOptimizer``; a logical batch is processed in physical chunks of at
  most ``privacy.max_physical_batch_size`` (clipped sums accumulated, noise added once,
  one accountant event per logical batch);
* the balanced-softmax prior uses class counts released once by the Gaussian mechanism
  (σ = ``privacy.statistics_noise_multiplier``, sensitivity 1), floored at 1, accounted in the
  same history, as in :class:`~fopro_kd.privacy.local_dp.DPContext`;
* the noise and the sampling use a secret seed unless ``privacy.noise_seed`` is set (tests).

The same code with ``private=False`` is the non-private probe of the same recipe (same
features, normalisation, epochs, batch and learning rate; shuffled batches, no clipping or
noise, true class counts). Measurement entry point: ``python -m fopro_kd.privacy.feature_probe``.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from fopro_kd.losses import build_classification_loss
from fopro_kd.privacy.accounting import (
    derive_noise_multiplier,
    epsilon_of_history,
    make_accountant,
    normalise_history,
    sample_rate_for,
)
from fopro_kd.privacy.sampling import physical_chunks
from fopro_kd.run_plan import resolve_run_plan, student_input_size
from fopro_kd.seeding import dp_stream_seeds

if TYPE_CHECKING:  # pragma: no cover
    from fopro_kd.config import Config
    from fopro_kd.data.dataset import ImageSet
    from fopro_kd.models.student import EKDStudent

logger = logging.getLogger("fopro_kd.privacy")

__all__ = ["FeatureProbe", "ProbeResult", "dp_class_prototypes", "extract_features", "feature_probe_problem",
           "normalise_features"]


def feature_probe_problem(cfg: Config) -> str | None:
    """Why the frozen-feature path would not train what the image path trains (None: it would)."""
    if not cfg.student.freeze_backbone:
        return "student.freeze_backbone must be true (the backbone's features must be a fixed function of the image)"
    if cfg.student.init not in ("teacher", "imagenet"):
        return f"student.init must be 'teacher' or 'imagenet' (public weights), got {cfg.student.init!r}"
    if cfg.augment.enabled:
        return "augment.enabled must be false (an augmented view is not a fixed function of the image)"
    if resolve_run_plan(cfg).uses_teacher:
        return f"train.method must be 'bsm' or 'ce' (a linear probe; got {cfg.train.method!r})"
    return None


@torch.no_grad()
def extract_features(student: EKDStudent, data: ImageSet, batch_size: int, device: torch.device,
                     input_size: int) -> Tensor:
    """``φ(x)`` of every image of ``data`` (N, d), float32 on the CPU; the frozen backbone in eval mode."""
    from fopro_kd.data.transforms import resize_batch, to_float_on

    student.eval()
    out = []
    for start in range(0, len(data), batch_size):
        x = resize_batch(to_float_on(data.images[start : start + batch_size], device), input_size)
        out.append(student.features(x).float().cpu())
    if not out:
        return torch.zeros(0, student.feature_dim)
    return torch.cat(out)


def normalise_features(h: Tensor, mode: str) -> Tensor:
    """``none`` or ``l2`` (each row divided by its own norm; a zero row stays zero): per-example, data-independent."""
    if mode == "none":
        return h.float()
    if mode == "l2":
        return h.float() / h.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"privacy.feature_norm must be 'none' or 'l2', got {mode!r}")


@dataclass
class ProbeResult:
    """One ``train()`` call: the head, per-epoch records, and what it spent."""

    weight: Tensor
    bias: Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    logical_steps: int = 0
    physical_batches: int = 0
    lr: float = 0.0


class FeatureProbe:
    """A linear head on cached features of one site, trained non-privately or by DP-SGD.

    The accountant lives in the instance, so successive :meth:`train` calls (federated rounds)
    compose; σ is derived once from the plan (``planned_epochs`` in all, plus the one class-count
    release), as :meth:`~fopro_kd.privacy.local_dp.DPContext.noise_multiplier_for` does.

    Parameters
    ----------
    cfg : run configuration (``train.batch_size`` = expected logical batch, ``train.lr``,
        ``train.momentum``, ``train.weight_decay``, ``train.loss``, the ``privacy`` section).
    features, labels : the site's cached (already normalised) features (N, d) and labels (N,).
    num_classes : C.
    private : DP-SGD (True) or the non-private probe of the same recipe (False).
    planned_epochs : epochs the budget must cover (default ``train.epochs``).
    """

    def __init__(self, cfg: Config, features: Tensor, labels: Tensor, num_classes: int, private: bool,
                 planned_epochs: int | None = None) -> None:
        from fopro_kd.privacy.local_dp import check_recipe, recipe_lr

        self.cfg = cfg
        self.features = features.float()
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.private = bool(private)
        n = int(self.features.shape[0])
        if self.labels.shape != (n,):
            raise ValueError(f"features ({n} rows) and labels {tuple(self.labels.shape)} do not match")
        p = cfg.privacy
        if self.private:
            check_recipe(cfg, n)
            if p.target_epsilon is None and p.noise_multiplier is None:
                raise ValueError("the DP feature probe needs privacy.target_epsilon or privacy.noise_multiplier")
        self.lr = recipe_lr(cfg)
        self.sample_rate, self.steps_per_epoch = sample_rate_for(n, cfg.train.batch_size)
        self.planned_epochs = int(planned_epochs or cfg.train.epochs)
        self.delta = float(p.delta)
        self.mechanism = p.accountant
        self.accountant = make_accountant(self.mechanism)
        if p.noise_seed is None:
            seed = secrets.randbits(62)
        else:
            seed = int(p.noise_seed)
            if self.private:
                logger.warning("privacy.noise_seed is set: DP noise and sampling are reproducible, the guarantee is void")
        seeds = dp_stream_seeds(seed)
        self.sample_generator = torch.Generator().manual_seed(seeds.sample)
        self.noise_generator = torch.Generator().manual_seed(seeds.noise)
        self.stats_generator = np.random.default_rng(seeds.statistics)
        self.shuffle_generator = torch.Generator().manual_seed(int(cfg.seed))
        counts = np.bincount(self.labels.numpy(), minlength=self.num_classes).astype(np.float64)
        self.noise_multiplier = 0.0
        if self.private:
            sigma_stat = float(p.statistics_noise_multiplier)
            noisy = counts + self.stats_generator.normal(0.0, sigma_stat, size=counts.shape)  # sensitivity 1
            self.accountant.step(noise_multiplier=sigma_stat, sample_rate=1.0)
            self.prior_counts = np.maximum(noisy, 1.0)  # post-processing
            self.released_counts = noisy
            if p.noise_multiplier is not None:
                self.noise_multiplier = float(p.noise_multiplier)
            else:
                self.noise_multiplier = derive_noise_multiplier(
                    float(p.target_epsilon), self.delta, self.sample_rate, self.planned_epochs * self.steps_per_epoch,
                    self.mechanism, extra_events=[(sigma_stat, 1.0, 1)],
                )
        else:
            self.prior_counts = np.maximum(counts, 1.0)
            self.released_counts = None
        self.loss = build_classification_loss(resolve_run_plan(cfg).classification_loss, self.prior_counts, cfg.train)

    def epsilon(self) -> float:
        """ε spent so far (class-count release + every logical DP-SGD step) at ``privacy.delta``."""
        return epsilon_of_history(self.accountant.history, self.delta, self.mechanism) if self.private else 0.0

    def planned_steps(self, epochs: int) -> int:
        return int(epochs) * self.steps_per_epoch

    def train(self, epochs: int, init: tuple[Tensor, Tensor] | None = None,
              evaluate: Any = None) -> ProbeResult:
        """``epochs`` epochs from ``init`` (weight, bias; default zeros, data-independent).

        ``evaluate(weight, bias) -> dict`` is called after every epoch (e.g. validation
        metrics); it sees only the released head, so it is post-processing.
        """
        d = int(self.features.shape[1])
        head = nn.Linear(d, self.num_classes)
        with torch.no_grad():
            if init is None:
                head.weight.zero_()
                head.bias.zero_()
            else:
                head.weight.copy_(init[0])
                head.bias.copy_(init[1])
        sgd = torch.optim.SGD(head.parameters(), lr=self.lr, momentum=float(self.cfg.train.momentum),
                              weight_decay=float(self.cfg.train.weight_decay))
        result = ProbeResult(head.weight.detach().clone(), head.bias.detach().clone(), lr=self.lr,
                             noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        if self.private:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from opacus import GradSampleModule
                from opacus.optimizers import DPOptimizer

                model = GradSampleModule(head, batch_first=True, loss_reduction="mean", strict=True)
                optimizer = DPOptimizer(sgd, noise_multiplier=self.noise_multiplier,
                                        max_grad_norm=float(self.cfg.privacy.max_grad_norm),
                                        expected_batch_size=len(self.labels) * self.sample_rate,
                                        generator=self.noise_generator)
        else:
            model, optimizer = head, sgd
        for _ in range(int(epochs)):
            start = time.perf_counter()
            loss_sum, seen = 0.0, 0
            for idx in self._batches():
                if self.private:
                    loss_sum += self._dp_step(model, optimizer, idx, result) * len(idx)
                    self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
                    result.logical_steps += 1
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = self.loss(model(self.features[idx]), self.labels[idx])
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * len(idx)
                    result.logical_steps += 1
                    result.physical_batches += 1
                seen += len(idx)
            row = {"loss": loss_sum / max(seen, 1), "epoch_seconds": time.perf_counter() - start}
            if self.private:
                row["dp_epsilon"] = self.epsilon()
            if evaluate is not None:
                row.update(evaluate(head.weight.detach(), head.bias.detach()))
            result.history.append(row)
        if self.private:
            model._close()
        result.weight = head.weight.detach().clone()
        result.bias = head.bias.detach().clone()
        result.epsilon = self.epsilon()
        return result

    def _batches(self):
        n = len(self.labels)
        if self.private:  # Poisson sampling with the secret generator: q per example per step
            for _ in range(self.steps_per_epoch):
                mask = torch.rand(n, generator=self.sample_generator) < self.sample_rate
                yield mask.nonzero(as_tuple=False).reshape(-1)
        else:
            perm = torch.randperm(n, generator=self.shuffle_generator)
            batch = int(self.cfg.train.batch_size)
            for start in range(0, n, batch):
                yield perm[start : start + batch]

    def _dp_step(self, model: nn.Module, optimizer, idx: Tensor, result: ProbeResult) -> float:
        """One logical DP-SGD step on the Poisson batch ``idx``, in physical chunks; the mean loss."""
        chunks = physical_chunks(int(idx.numel()), self.cfg.privacy.max_physical_batch_size)
        if idx.numel() == 0:  # empty Poisson batch: DP-SGD releases pure noise N(0, σ²C²) / (N q)
            std = self.noise_multiplier * float(self.cfg.privacy.max_grad_norm)
            for param in optimizer.params:
                noise = torch.normal(0.0, std, size=param.shape, generator=self.noise_generator)
                param.grad = noise / optimizer.expected_batch_size
                param.grad_sample = None
                param.summed_grad = None
            optimizer.original_optimizer.step()
            result.physical_batches += 1
            return 0.0
        total = 0.0
        for k, part in enumerate(chunks):
            sub = idx[part]
            optimizer.zero_grad(set_to_none=True)  # keeps the accumulated clipped sum between chunks
            loss = self.loss(model(self.features[sub]), self.labels[sub])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            if k < len(chunks) - 1:
                optimizer.signal_skip_step(do_skip=True)
            optimizer.step()
            total += float(loss.detach()) * int(sub.numel())
            result.physical_batches += 1
        return total / int(idx.numel())

    def accountant_history(self) -> list[list[float]]:
        return [[float(s), float(q), int(n)] for s, q, n in normalise_history(self.accountant.history)]


# --------------------------------------------------------------------------- second private mode: DP prototypes


def dp_class_prototypes(features: Tensor, labels: Tensor, num_classes: int, target_epsilon: float | None,
                        delta: float, generator: torch.Generator, mechanism: str = "rdp",
                        noise_multiplier: float | None = None) -> tuple[Tensor, float, float]:
    """Cosine class prototypes released once by the Gaussian mechanism: (prototypes (C, d), σ, ε).

    The released statistic is the matrix of per-class sums ``S_c = Σ_{i: y_i = c} ĥ_i`` of unit
    features ĥ (``privacy.feature_norm: l2`` is required). Adding or removing one example changes
    one row by one unit vector, so the L2 sensitivity of the whole matrix is exactly 1 and
    ``S + N(0, σ²)`` is (ε, δ)-DP with ε of the single event ``(σ, q = 1, 1 step)``. The
    prototypes ``S_c / ‖S_c‖`` and the nearest-prototype classifier are post-processing. No class
    count is needed (a cosine prototype ignores the class size), so nothing else is released.
    Why: one release instead of hundreds of DP-SGD steps; the cost of a pass over the cache.
    """
    norms = features.norm(dim=1)
    if features.numel() and not torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]), atol=1e-4):
        raise ValueError("DP prototypes need unit-norm features (privacy.feature_norm: l2): the sensitivity is 1 only then")
    sums = torch.zeros(num_classes, features.shape[1])
    sums.index_add_(0, labels.long(), features.float())
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("DP prototypes need privacy.target_epsilon or privacy.noise_multiplier")
        noise_multiplier = derive_noise_multiplier(float(target_epsilon), delta, 1.0, 1, mechanism)
    sigma = float(noise_multiplier)
    noisy = sums + torch.normal(0.0, sigma, size=sums.shape, generator=generator)
    eps = epsilon_of_history([(sigma, 1.0, 1)], delta, mechanism)
    return noisy / noisy.norm(dim=1, keepdim=True).clamp_min(1e-12), sigma, eps


def run_prototypes(cfg: Config, record: dict[str, Any], epsilon: float | None, seed: int) -> dict[str, Any]:
    """The DP prototype classifier on the whole training split (``epsilon`` None: exact prototypes)."""
    splits = record["splits"]
    if cfg.privacy.feature_norm != "l2":
        raise ValueError("DP prototypes need privacy.feature_norm: l2")
    train_f = normalise_features(record["train"], "l2")
    test_f = normalise_features(record["test"], "l2")
    counts = splits.train.class_counts()
    noise_seed = cfg.privacy.noise_seed
    generator = torch.Generator().manual_seed(secrets.randbits(62) if noise_seed is None else int(noise_seed) + seed)
    start = time.perf_counter()
    if epsilon is None:
        sums = torch.zeros(splits.train.num_classes, train_f.shape[1]).index_add_(0, splits.train.labels, train_f)
        protos, sigma, eps = sums / sums.norm(dim=1, keepdim=True), 0.0, 0.0
    else:
        protos, sigma, eps = dp_class_prototypes(train_f, splits.train.labels, splits.train.num_classes, epsilon,
                                                 float(cfg.privacy.delta), generator, cfg.privacy.accountant)
    seconds = time.perf_counter() - start
    scale = 10.0  # softmax temperature of the cosine scores: probabilities only, the argmax does not depend on it
    test = _metrics(cfg, protos * scale, torch.zeros(len(protos)), test_f, splits.test.labels, splits.class_names, counts)
    return {"epsilon_target": epsilon, "seed": seed, "epsilon": eps, "noise_multiplier": sigma,
            "test_balanced_accuracy": float(test["balanced_accuracy"]), "per_class_recall": test["per_class_recall"],
            "seconds": seconds}


# --------------------------------------------------------------------------- evaluation and measurement


@torch.no_grad()
def head_probabilities(weight: Tensor, bias: Tensor, features: Tensor) -> np.ndarray:
    """Class probabilities of the main head (plain softmax of ``W h + b``: the prior only enters the loss)."""
    return torch.softmax(features @ weight.T + bias, dim=1).double().numpy()


def _metrics(cfg: Config, weight: Tensor, bias: Tensor, feats: Tensor, labels: Tensor, class_names: list[str],
             train_counts: np.ndarray) -> dict[str, Any]:
    from fopro_kd.metrics import compute_metrics

    return compute_metrics(labels.numpy(), head_probabilities(weight, bias, feats), class_names, train_counts,
                           cfg.metrics)


def _setting_cfg(cfg: Config, epsilon: float | None, seed: int) -> Config:
    import copy

    out = copy.deepcopy(cfg)
    out.seed = int(seed)
    if epsilon is None:
        out.privacy.mode = "off"
    else:
        out.privacy.mode = "local"
        out.privacy.target_epsilon = float(epsilon)
        out.privacy.noise_multiplier = None
    return out


def cached_split_features(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Splits, the frozen student and the features of train/val/test (computed once, kept in ``out_dir``)."""
    from fopro_kd.data import build_splits
    from fopro_kd.seeding import configure_threads, seed_everything, select_device
    from fopro_kd.training.components import build_configured_student

    problem = feature_probe_problem(cfg)
    if problem is not None:
        raise ValueError(f"frozen-feature probe: {problem}")
    configure_threads(cfg.train.num_threads)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    splits = build_splits(cfg)
    cache = out_dir / "features.pt"
    size = student_input_size(cfg)
    record: dict[str, Any] = {"splits": splits}
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        if list(stored.get("train_ids", [])) != [str(i) for i in splits.train.ids]:
            raise ValueError(f"{cache} holds features of another split (different training image ids); delete it "
                             "or use another --out")
        record.update(stored)
        record["extract_seconds"] = stored.get("extract_seconds")
        return record
    # the student's architecture with its public weights; teacher_dim None: a bare linear probe
    student = build_configured_student(cfg, splits.train.num_classes, None).to(device)
    start = time.perf_counter()
    train = extract_features(student, splits.train, cfg.train.eval_batch_size, device, size)
    extract_seconds = time.perf_counter() - start
    stored = {
        "train": train,
        "val": extract_features(student, splits.val, cfg.train.eval_batch_size, device, size),
        "test": extract_features(student, splits.test, cfg.train.eval_batch_size, device, size),
        "extract_seconds": extract_seconds,
        "train_ids": [str(i) for i in splits.train.ids],
    }
    torch.save(stored, cache)
    record.update(stored)
    return record


def run_single_site(cfg: Config, record: dict[str, Any], epsilon: float | None, seed: int) -> dict[str, Any]:
    """One setting on the whole training split: train, report the last epoch on test (no selection)."""
    splits = record["splits"]
    setting = _setting_cfg(cfg, epsilon, seed)
    norm = cfg.privacy.feature_norm
    train_f = normalise_features(record["train"], norm)
    val_f, test_f = normalise_features(record["val"], norm), normalise_features(record["test"], norm)
    counts = splits.train.class_counts()
    torch.manual_seed(seed)
    probe = FeatureProbe(setting, train_f, splits.train.labels, splits.train.num_classes, private=epsilon is not None)

    def evaluate(w: Tensor, b: Tensor) -> dict[str, float]:
        m = _metrics(setting, w, b, val_f, splits.val.labels, splits.class_names, counts)
        return {"val_balanced_accuracy": float(m["balanced_accuracy"])}

    result = probe.train(setting.train.epochs, evaluate=evaluate)
    test = _metrics(setting, result.weight, result.bias, test_f, splits.test.labels, splits.class_names, counts)
    return {
        "epsilon_target": epsilon, "seed": seed, "epsilon": result.epsilon, "delta": setting.privacy.delta,
        "noise_multiplier": result.noise_multiplier, "sample_rate": result.sample_rate, "lr": result.lr,
        "logical_steps": result.logical_steps, "physical_batches": result.physical_batches,
        "test_balanced_accuracy": float(test["balanced_accuracy"]), "per_class_recall": test["per_class_recall"],
        "val_balanced_accuracy_last": result.history[-1]["val_balanced_accuracy"],
        "seconds_per_epoch": float(np.mean([r["epoch_seconds"] for r in result.history])),
        "history": result.history,
    }


def run_federated(cfg: Config, record: dict[str, Any], epsilon: float | None, seed: int) -> dict[str, Any]:
    """FedAvg of the linear head over ``federation.num_clients`` sites (the simulation's partition).

    Every site keeps its own accountant over all rounds (local DP, σ derived for
    ``num_rounds × local_epochs`` epochs); the server averages the heads with weights from the
    sites' *released* class counts (noised, floored at 1) under DP, true counts otherwise.
    Selection: none, the last round's model is reported on the server's balanced test split.
    """
    from fopro_kd.federation.sites import plan_sites

    splits = record["splits"]
    setting = _setting_cfg(cfg, epsilon, seed)
    norm = cfg.privacy.feature_norm
    train_f = normalise_features(record["train"], norm)
    test_f = normalise_features(record["test"], norm)
    counts = splits.train.class_counts()
    fed = setting.federation
    plans = plan_sites(setting, splits)
    sites = []
    for plan in plans:
        idx = torch.as_tensor(plan.train_indices, dtype=torch.long)
        sites.append(FeatureProbe(setting, train_f[idx], splits.train.labels[idx], splits.train.num_classes,
                                  private=epsilon is not None, planned_epochs=fed.num_rounds * fed.local_epochs))
    d = int(train_f.shape[1])
    weight, bias = torch.zeros(splits.train.num_classes, d), torch.zeros(splits.train.num_classes)
    history = []
    start = time.perf_counter()
    for rnd in range(fed.num_rounds):
        heads, weights = [], []
        for site in sites:
            res = site.train(fed.local_epochs, init=(weight, bias))
            heads.append((res.weight, res.bias))
            size = float(np.maximum(site.released_counts, 1.0).sum()) if site.private else float(len(site.labels))
            weights.append(size)
        total = sum(weights)
        weight = sum(w * h[0] for w, h in zip(weights, heads)) / total
        bias = sum(w * h[1] for w, h in zip(weights, heads)) / total
        history.append({"round": rnd + 1, "max_epsilon": max(s.epsilon() for s in sites)})
    seconds = time.perf_counter() - start
    test = _metrics(setting, weight, bias, test_f, splits.test.labels, splits.class_names, counts)
    return {
        "epsilon_target": epsilon, "seed": seed, "sites": [int(len(s.labels)) for s in sites],
        "site_epsilon": [s.epsilon() for s in sites], "site_noise_multiplier": [s.noise_multiplier for s in sites],
        "test_balanced_accuracy": float(test["balanced_accuracy"]), "per_class_recall": test["per_class_recall"],
        "seconds": seconds, "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fopro_kd.privacy.feature_probe --config … --out … --epsilons off,8,3 --seeds 0,1 [--federated]``."""
    from fopro_kd.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--epsilons", default="off,8,3", help="comma list; 'off' = the non-private probe")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--federated", action="store_true", help="FedAvg over federation.num_clients sites")
    parser.add_argument("--prototypes", action="store_true", help="the DP class-prototype classifier (one release)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = cached_split_features(cfg, out)
    # the probe's tensors are small: on shared cores a thread pool mostly waits (measured 10x slower with 2)
    torch.set_num_threads(1)
    logger.info("features: train %s, extraction %.1f s", tuple(record["train"].shape), record.get("extract_seconds") or -1)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for eps_text in args.epsilons.split(","):
            eps = None if eps_text.strip() in ("off", "none") else float(eps_text)
            run = run_federated if args.federated else run_prototypes if args.prototypes else run_single_site
            row = run(cfg, record, eps, seed)
            row["extract_seconds"] = record.get("extract_seconds")
            rows.append(row)
            recall = " ".join(f"{k}={v:.2f}" for k, v in row["per_class_recall"].items())
            logger.info("eps %s seed %d: test bACC %.4f, eps spent %s; recall %s", eps_text, seed,
                        row["test_balanced_accuracy"], row.get("epsilon", row.get("site_epsilon")), recall)
            name = "federated.json" if args.federated else "prototypes.json" if args.prototypes else "results.json"
            (out / name).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
