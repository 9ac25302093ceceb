"""Local (sample-level) DP for :class:`~fopro_kd.training.trainer.LocalTrainer` (``privacy.mode: local``).

The trainer keeps its one training loop; in DP mode it asks a :class:`DPContext` for

* the batches: Poisson sampling (:class:`~fopro_kd.privacy.sampling.PoissonBatchLoader`) with a
  secret seed; empty batches make a noise-only step that the accountant counts;
* the student update: Opacus ``GradSampleModule`` hooks on the (GroupNorm) student give
  per-sample gradients of the EKD loss (main + auxiliary + projector heads, all in the loss);
  ``DPOptimizer`` clips each to ``privacy.max_grad_norm`` and adds N(0, σ²C²) (replacing
  ``train.grad_clip``); FedProx' proximal gradient (data-independent) is added after the noise;
* the prompt update: ``privacy.prompt: frozen`` (default) keeps the Fourier prompt at the
  identity and turns AKD off; ``dp`` trains the prompt (and the discriminative probe) by DP-SGD
  with per-sample gradients from ``torch.func`` (vmap over prompt -> frozen teacher -> objective)
  under the same accountant;
* the accounting: one accountant event per batch. With r Gaussian releases of sensitivity C
  from one batch (k_s student steps, plus k_g prompt steps when the prompt is trained), the
  batch is one Gaussian mechanism with multiplier σ/√r (docs/privacy.md), recorded as
  ``(σ/√r, q)``;
* the class prior of the balanced-softmax (and the probe) loss: private class counts would make
  every example's gradient depend on the others, so the loss uses class counts released once
  through the Gaussian mechanism (accounted, kept in the DP state, reused every round);
* FedMAS statistics: never raw (see :meth:`DPContext.finish` and :meth:`DPContext.private_class_rep_prior`).

The frozen teacher is never wrapped: it stays a separate module in eval mode, called under
``no_grad`` for the student's targets.

The trainer hands this module the parts it needs (:class:`DPParts`) and never itself, so the
two do not import each other. What DP decides for the trainer comes back as plain answers the
trainer applies to its own fields: :attr:`DPContext.akd_mode` (``off`` with a frozen prompt: drop
the prompt optimizer and the probe) and :attr:`DPContext.loss_class_counts` (the released counts
its class-prior losses must be rebuilt from, after each :meth:`DPContext.batch_loader`).
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fopro_kd.config import Config
from fopro_kd.data.dataset import ImageSet
from fopro_kd.losses import representation_loss
from fopro_kd.privacy.accounting import (
    PrivacyBudgetExhausted,
    budget_reason,
    derive_noise_multiplier,
    epsilon_of_history,
    make_accountant,
    normalise_history,
    sample_rate_for,
)
from fopro_kd.privacy.sampling import PoissonBatchLoader
from fopro_kd.privacy.statistics import (
    REP_LOSS_BOUND,
    class_means_from_release,
    privatize_statistics,
    statistics_policy,
    statistics_releases_per_round,
)
from fopro_kd.privacy.surgery import private_compatibility_problems
from fopro_kd.prompt import prompt_input
from fopro_kd.run_plan import resolve_run_plan
from fopro_kd.seeding import dp_stream_seeds
from fopro_kd.training.results import EpochResult, class_rep_prior
from fopro_kd.training.teacher_view import teacher_features

logger = logging.getLogger("fopro_kd.privacy")

__all__ = ["DP_STATE_FORMAT", "DPContext", "DPParts", "check_recipe", "planned_statistics_events", "planned_steps_per_round",
           "recipe_lr"]

DP_STATE_FORMAT = "fopro-kd-dp-state/1"


def planned_steps_per_round(cfg: Config, num_train: int) -> int:
    """DP-SGD steps (batches) of one round: ``federation.local_steps`` or local epochs × ⌈N / B⌉."""
    _, steps_per_epoch = sample_rate_for(num_train, cfg.train.batch_size)
    if cfg.federation.local_steps is not None:
        return int(cfg.federation.local_steps)
    return int(cfg.federation.local_epochs) * steps_per_epoch


def recipe_lr(cfg: Config) -> float:
    """Learning rate of DP-SGD under the recipe's rule (``privacy.lr_rule``).

    ``fixed``: ``train.lr``. ``linear``: ``train.lr × B / privacy.lr_reference_batch`` with B the
    expected (logical) batch ``train.batch_size``. Why linear: DP-SGD's update is
    ``lr · (Σ_i clip(g_i) + N(0, σ²C²)) / B``; at a fixed ε a larger B lowers the noise per
    example, but the averaged clipped gradient keeps its size, so with a fixed lr a larger batch
    only makes fewer steps per epoch. Scaling lr with B keeps the distance moved per epoch
    (Goyal et al., 2017, "Accurate, large minibatch SGD"); it depends on the config only.
    """
    lr = float(cfg.train.lr)
    if cfg.privacy.lr_rule == "linear":
        lr *= float(cfg.train.batch_size) / float(cfg.privacy.lr_reference_batch)
    return lr


def check_recipe(cfg: Config, num_train: int) -> None:
    """One clear error, before anything is trained or spent, for a DP recipe that does not fit the data.

    Raises
    ------
    ValueError
        The expected Poisson batch ``train.batch_size`` exceeds the N training examples of the
        site (q would be 1: no amplification by subsampling, and Opacus' ⌈N/B⌉ rule would silently
        shrink the batch), or ``privacy.max_physical_batch_size`` is below 1.
    """
    p = cfg.privacy
    if num_train < 1:
        raise ValueError("DP-SGD: the site has no training examples")
    batch = int(cfg.train.batch_size)
    if (p.max_physical_batch_size is not None or p.lr_rule != "fixed") and batch > num_train:
        raise ValueError(
            f"DP recipe: the expected Poisson batch train.batch_size = {batch} is larger than the {num_train} training "
            f"examples of this site; set train.batch_size <= {num_train} (q = B / N must be < 1 for amplification)"
        )
    if p.max_physical_batch_size is not None and p.max_physical_batch_size < 1:
        raise ValueError(f"privacy.max_physical_batch_size must be >= 1, got {p.max_physical_batch_size!r}")


def planned_rounds(cfg: Config) -> int:
    return int(cfg.privacy.planned_rounds or cfg.federation.num_rounds)


def planned_statistics_events(cfg: Config, rounds: int | None = None) -> list[tuple[float, float, int]]:
    """Statistics releases reserved in the budget: the class counts once, plus FedMAS' two per round.

    The class-count histogram is released once per hospital for the whole federation (it sets
    the loss prior and, with ``statistics: noised``, is what the hospital may share). With
    ``federation.strategy: fedmas`` and ``statistics: noised`` each round releases the per-class
    prior (before training) and state (after training).
    """
    sigma = float(cfg.privacy.statistics_noise_multiplier)
    count = 1
    per_round = statistics_releases_per_round(cfg.federation.strategy, statistics_policy(cfg))
    count += per_round * (planned_rounds(cfg) if rounds is None else int(rounds))
    return [(sigma, 1.0, count)]


class _PromptObjective(nn.Module):
    """The prompt objective of one example, for per-sample gradients with ``torch.func``.

    The teacher is held outside the module tree (never wrapped, never a functional parameter).
    """

    def __init__(self, prompt: nn.Module, probe: nn.Module | None, teacher: nn.Module, mode: str, domain: str,
                 log_prior: Tensor | None) -> None:
        super().__init__()
        self.prompt = prompt
        self.probe = probe
        object.__setattr__(self, "_teacher", teacher)
        object.__setattr__(self, "_log_prior", log_prior)
        self.mode = mode
        self.domain = domain

    def forward(self, x: Tensor, y: Tensor, u: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        teacher = self._teacher
        feats = teacher_features(teacher, x, self.prompt, self.domain).float()
        reg = self.prompt.regularizer(prompt_input(teacher, x, self.domain))  # R on the tensor the prompt is applied to
        if self.mode == "minmax":
            stat = representation_loss(u, feats).mean()
            objective = -stat + reg
        else:
            logits = self.probe(feats) + self._log_prior
            stat = nn.functional.cross_entropy(logits, y)
            objective = stat + reg
        return objective, (feats.detach(), stat.detach(), reg.detach())


@dataclass
class DPParts:
    """What DP-SGD needs from a :class:`~fopro_kd.training.trainer.LocalTrainer`, given explicitly.

    The modules and optimizers are the trainer's own objects (DP wraps the optimizers, hooks the
    student and may freeze and reset the prompt); the DP code keeps no reference to the trainer.

    Attributes
    ----------
    cfg : the run configuration.
    student : the (GroupNorm) student being trained.
    device : where it trains.
    optimizer : the student's optimizer (wrapped by Opacus' ``DPOptimizer``; its lr is set by
        ``privacy.lr_rule``).
    class_counts : the site's raw class counts (released once, never used raw).
    loss_name : the classification loss in use (``ce`` for ``train.method: ce``).
    teacher, prompt, probe, prompt_optimizer : the frozen teacher, the Fourier prompt, the
        discriminative probe and the prompt's optimizer, or None.
    akd_mode : the trainer's AKD mode before DP (``off`` without a prompt).
    log_prior : the probe's log class prior, or None.
    """

    cfg: Config
    student: nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    class_counts: np.ndarray
    loss_name: str
    teacher: nn.Module | None = None
    prompt: nn.Module | None = None
    probe: nn.Module | None = None
    prompt_optimizer: torch.optim.Optimizer | None = None
    akd_mode: str = "off"
    log_prior: Tensor | None = None


class DPContext:
    """DP-SGD state of one local trainer: accountant, secret generators, DP optimizers.

    Created by the trainer from its :class:`DPParts` when ``cfg.privacy.mode == "local"``. Its :meth:`state_dict` (also
    available as :meth:`accountant_state`) is plain JSON and is part of ``trainer.state_dict()``
    under ``"privacy"``; restoring it makes ε compose over rounds. In the federation the client
    then loads the history from the append-only privacy ledger over it
    (:mod:`fopro_kd.privacy.ledger`): the model state may be an older or a fresh one, the ledger
    never is.
    """

    def __init__(self, parts: DPParts) -> None:
        cfg = parts.cfg
        p = cfg.privacy
        if not resolve_run_plan(cfg).local_dp:
            raise ValueError(f"DPContext is for privacy.mode 'local', got {p.mode!r}")
        problems = private_compatibility_problems(parts.student)
        if problems:
            raise ValueError(
                "privacy.mode 'local' needs the DP student (GroupNorm, no in-place ops): build it with "
                "fopro_kd.training.components.build_dp_student or build_models; problems: " + "; ".join(problems[:5])
            )
        self.cfg = cfg
        self.student = parts.student
        self.device = parts.device
        self.teacher = parts.teacher
        self.prompt = parts.prompt
        self.class_counts = np.asarray(parts.class_counts)
        self.num_classes = len(self.class_counts)
        self.loss_name = parts.loss_name
        self.delta = float(p.delta)
        self.target_epsilon = None if p.target_epsilon is None else float(p.target_epsilon)
        self.max_grad_norm = float(p.max_grad_norm)
        self.mechanism = p.accountant
        self.accountant = make_accountant(self.mechanism)
        if p.noise_seed is None:
            seed = secrets.randbits(62)
        else:
            seed = int(p.noise_seed)
            logger.warning("privacy.noise_seed is set: DP noise and sampling are reproducible, the guarantee is void")
        seeds = dp_stream_seeds(seed)
        self.sample_generator = torch.Generator().manual_seed(seeds.sample)
        self.noise_generator = torch.Generator(device=parts.device).manual_seed(seeds.noise)
        self.stats_generator = np.random.default_rng(seeds.statistics)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from opacus import GradSampleModule

            self.grad_sample_module = GradSampleModule(parts.student, batch_first=True, loss_reduction="mean", strict=True)
        if cfg.train.grad_clip > 0:
            logger.info("privacy.mode local: per-sample clipping at %.3g replaces train.grad_clip", self.max_grad_norm)

        self.prompt_dp = False
        self.akd_mode = parts.akd_mode
        """The AKD mode training runs with: ``off`` when ``privacy.prompt: frozen`` (the trainer then
        drops its prompt optimizer and probe)."""
        self.probe = parts.probe
        self._prompt_optimizer = parts.prompt_optimizer
        if parts.prompt is not None:
            if p.prompt == "dp" and parts.akd_mode != "off":
                self.prompt_dp = True
                self._objective = _PromptObjective(
                    parts.prompt, parts.probe, parts.teacher, parts.akd_mode, cfg.prompt.domain, parts.log_prior
                )
            else:
                if parts.akd_mode != "off":
                    logger.warning(
                        "privacy.prompt is 'frozen': akd.mode %r is forced off (the Fourier prompt is trained on private "
                        "images; it stays the identity and costs no budget). Use privacy.prompt: dp to train it under DP.",
                        parts.akd_mode,
                    )
                self.akd_mode = "off"
                self.probe = None
                self._prompt_optimizer = None
                for param in parts.prompt.parameters():
                    param.requires_grad_(False)
                self._reset_prompt_to_identity()
        self.k_s = int(cfg.akd.k_s) if self.prompt_dp else 1
        self.k_g = int(cfg.akd.k_g) if self.prompt_dp else 0
        self.released_counts: np.ndarray | None = None
        self.loss_class_counts: np.ndarray | None = None
        """Set by :meth:`batch_loader`: the released class counts (each at least 1) the trainer's
        class-prior losses must use, or None when its loss has no class prior."""
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self._student_optimizer = parts.optimizer
        self.optimizer = None
        self.prompt_optimizer = None
        self._params_by_name = dict(parts.student.named_parameters())
        self._loader: PoissonBatchLoader | None = None
        if p.lr_rule != "fixed":  # the recipe's learning-rate rule (recipe_lr): config-only, so every round agrees
            lr = recipe_lr(cfg)
            for group in parts.optimizer.param_groups:
                group["lr"] = lr
            logger.info("privacy.lr_rule %s: DP-SGD learning rate %.4g (train.lr %.4g, expected batch %d)",
                        p.lr_rule, lr, cfg.train.lr, cfg.train.batch_size)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable DP state: accountant history and mechanism, released class counts."""
        return {
            "format": DP_STATE_FORMAT,
            "mechanism": self.mechanism,
            "history": [[float(s), float(q), int(n)] for s, q, n in normalise_history(self.accountant.history)],
            "class_counts": None if self.released_counts is None else [float(v) for v in self.released_counts],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.accountant = make_accountant(self.mechanism, {"history": state.get("history", []),
                                                           "mechanism": state.get("mechanism", self.mechanism)})
        counts = state.get("class_counts")
        self.released_counts = None if counts is None else np.asarray(counts, dtype=np.float64)
        if self.released_counts is not None and self.released_counts.size != self.num_classes:
            raise ValueError("stored DP class counts do not match the number of classes")
        if self.prompt is not None and not self.prompt_dp:
            self._reset_prompt_to_identity()

    accountant_state = state_dict
    load_accountant_state = load_state_dict

    # ------------------------------------------------------------------ reporting
    def epsilon(self) -> float:
        """ε spent so far (all rounds, DP-SGD and statistics releases) at ``privacy.delta``."""
        return epsilon_of_history(self.accountant.history, self.delta, self.mechanism)

    def metrics(self) -> dict[str, float]:
        """Per-round metrics for the server: ``dp-epsilon`` (spent so far), ``dp-delta``, σ, q, steps."""
        steps = sum(n for s, q, n in normalise_history(self.accountant.history) if q < 1.0)
        return {
            "dp-epsilon": float(self.epsilon()),
            "dp-delta": self.delta,
            "dp-target-epsilon": float(self.target_epsilon) if self.target_epsilon is not None else -1.0,
            "dp-noise-multiplier": float(self.noise_multiplier or 0.0),
            "dp-sample-rate": float(self.sample_rate or 0.0),
            "dp-steps": float(steps),
        }

    # ------------------------------------------------------------------ planning
    def releases_per_batch(self, prompt_active: bool) -> int:
        """Gaussian releases from one batch: k_s student + k_g prompt steps while the prompt trains, else 1."""
        if prompt_active and self.prompt_dp:
            return self.k_s + self.k_g
        return 1

    def noise_multiplier_for(self, num_train: int) -> float:
        """σ of every Gaussian release (student and prompt): given, or derived from the budget.

        Derived: the per-batch multiplier σ/√r (r = the most releases per batch) is the smallest
        that keeps ε of ``planned_rounds`` × steps per round plus the reserved statistics
        releases within ``target_epsilon``; it depends only on the config and N, so every round
        derives the same value.
        """
        p = self.cfg.privacy
        if p.noise_multiplier is not None:
            return float(p.noise_multiplier)
        q, _ = sample_rate_for(num_train, self.cfg.train.batch_size)
        total = planned_rounds(self.cfg) * planned_steps_per_round(self.cfg, num_train)
        sigma_batch = derive_noise_multiplier(
            self.target_epsilon, self.delta, q, total, self.mechanism, extra_events=planned_statistics_events(self.cfg)
        )
        return sigma_batch * math.sqrt(self.releases_per_batch(True))

    def round_plan(self, num_train: int, epochs: int, max_steps: int | None) -> dict[str, Any]:
        q, steps_per_epoch = sample_rate_for(num_train, self.cfg.train.batch_size)
        steps = epochs * steps_per_epoch
        if max_steps is not None:
            steps = min(steps, int(max_steps))
        sigma = self.noise_multiplier_for(num_train)
        pending = [] if self.released_counts is not None else [self._statistics_event()]
        return {"sample_rate": q, "steps_per_epoch": steps_per_epoch, "steps": steps, "noise_multiplier": sigma,
                "batch_noise_multiplier": sigma / math.sqrt(self.releases_per_batch(True)), "extra_events": pending}

    def check_budget(self, num_train: int, epochs: int, max_steps: int | None = None,
                     extra_events: list[tuple[float, float, int]] | None = None) -> str | None:
        """The reason this round must not run (names ε and the target), or None if it fits the budget."""
        plan = self.round_plan(num_train, epochs, max_steps)
        return budget_reason(
            self.state_dict(), plan["steps"], plan["sample_rate"], plan["batch_noise_multiplier"], self.delta,
            self.target_epsilon, extra_events=plan["extra_events"] + list(extra_events or []), mechanism=self.mechanism,
        )

    # ------------------------------------------------------------------ training hooks (called by LocalTrainer)
    def batch_loader(self, data: ImageSet, epochs: int, max_steps: int | None) -> PoissonBatchLoader:
        """Start a ``train()`` call: budget check, class-prior release, DP optimizers, Poisson loader.

        Afterwards :attr:`loss_class_counts` holds the released counts the trainer's class-prior
        losses must be rebuilt from (None: its loss has no class prior).

        Raises
        ------
        PrivacyBudgetExhausted
            The round would exceed ``privacy.target_epsilon``; nothing has been spent.
        """
        check_recipe(self.cfg, len(data))
        reason = self.check_budget(len(data), epochs, max_steps)
        if reason is not None:
            raise PrivacyBudgetExhausted(reason)
        plan = self.round_plan(len(data), epochs, max_steps)
        self.noise_multiplier = float(plan["noise_multiplier"])
        self.sample_rate = float(plan["sample_rate"])
        self.expected_batch_size = len(data) * self.sample_rate
        self._use_private_class_prior()
        from opacus.optimizers import DPOptimizer

        self.optimizer = DPOptimizer(
            self._student_optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, generator=self.noise_generator,
        )
        if self.prompt_dp:
            self.prompt_optimizer = DPOptimizer(
                self._prompt_optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                expected_batch_size=self.expected_batch_size, generator=self.noise_generator,
            )
        logger.info("DP-SGD: N=%d, q=%.4g, sigma=%.4g, C=%.3g, up to %d steps; epsilon so far %.4f (target %s)",
                    len(data), self.sample_rate, self.noise_multiplier, self.max_grad_norm, plan["steps"],
                    self.epsilon(), self.target_epsilon)
        self._loader = PoissonBatchLoader(data, self.sample_rate, plan["steps_per_epoch"], self.sample_generator,
                                          max_physical_batch_size=self.cfg.privacy.max_physical_batch_size)
        return self._loader

    @property
    def in_last_chunk(self) -> bool:
        """True unless the trainer is inside a logical Poisson batch that has more physical chunks to come."""
        return self._loader is None or self._loader.last_chunk

    def student_step(self, loss: Tensor, anchor: Mapping[str, Tensor] | None, proximal_mu: float) -> None:
        """Per-sample clipped, noised update of the student (replaces backward + clip + step).

        Inside a logical batch that is split into physical chunks, every chunk but the last only
        clips and accumulates (Opacus' ``signal_skip_step``, as its ``BatchMemoryManager``);
        the last adds the noise once, scales by the expected logical batch and steps. The loss is
        the chunk's mean, which ``GradSampleModule`` (``loss_reduction="mean"``) turns back into
        per-sample gradients, so the sum over chunks is the logical batch's sum.
        """
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)  # keeps the accumulated sum while the previous chunk was skipped
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        if not self.in_last_chunk:
            opt.signal_skip_step(do_skip=True)
        if opt.pre_step():
            self._add_proximal(anchor, proximal_mu)
            opt.original_optimizer.step()

    def empty_step(self, prompt_active: bool, anchor: Mapping[str, Tensor] | None, proximal_mu: float) -> dict[str, float]:
        """An empty Poisson batch: DP-SGD releases pure noise (sum over no examples + N(0, σ²C²))."""
        for _ in range(self.k_s if prompt_active and self.prompt_dp else 1):
            self._noise_only(self.optimizer)
            self._add_proximal(anchor, proximal_mu)
            self.optimizer.original_optimizer.step()
        if prompt_active and self.prompt_dp:
            for _ in range(self.k_g):
                self._noise_only(self.prompt_optimizer)
                self.prompt_optimizer.original_optimizer.step()
        return {"loss": 0.0}

    def account_batch(self, prompt_active: bool) -> None:
        """One accountant event for the batch: σ/√r at the sample rate q (logical batches only, not chunks)."""
        if not self.in_last_chunk:
            return
        r = self.releases_per_batch(prompt_active)
        self.accountant.step(noise_multiplier=self.noise_multiplier / math.sqrt(r), sample_rate=self.sample_rate)

    def prompt_steps(self, student_in: Tensor, teacher_in: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """DP version of ``LocalTrainer._prompt_steps``: same objective, per-sample clipped and noised."""
        objective = self._objective
        n = int(y.shape[0])
        if self.akd_mode == "minmax":
            with torch.no_grad():
                u = self.student.forward_train(student_in).projection.float()
        else:
            u = torch.zeros(n, 1, device=y.device)
        named = {k: v for k, v in objective.named_parameters() if v.requires_grad}
        feats = stat = reg = None
        for _ in range(self.k_g):
            params = {k: v.detach() for k, v in named.items()}

            def one(params, x, yi, ui):
                return torch.func.functional_call(objective, params, (x.unsqueeze(0), yi.unsqueeze(0), ui.unsqueeze(0)))

            grads, (feats, stat, reg) = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0, 0, 0))(
                params, teacher_in, y, u
            )
            opt = self.prompt_optimizer
            opt.zero_grad(set_to_none=True)
            for key, param in named.items():
                param.grad_sample = grads[key].to(param.dtype)
            opt.step()
        terms = {"prompt_reg": float(reg.mean())}
        terms["prompt_discrepancy" if self.akd_mode == "minmax" else "prompt_probe_loss"] = float(stat.mean())
        return feats.reshape(n, -1).detach(), terms

    def finish(self, result: EpochResult, data: ImageSet, track_class_rep: bool) -> None:
        """End of ``train()``: FedMAS' per-class state never leaves raw.

        ``noised``: one non-dropping pass with the trained student (each example counted once,
        so the sensitivity is bounded; the Poisson batches of training are not), released by
        the Gaussian mechanism; ``result.class_rep_sum`` / ``class_seen`` then hold noisy sums
        and counts. ``withheld``: both are None (send no robust factor).
        """
        if not track_class_rep:
            return
        if statistics_policy(self.cfg) == "withheld":
            result.class_rep_sum = None
            result.class_seen = None
            return
        means, counts = self.private_class_rep_prior(data)
        known = np.isfinite(means)
        result.class_rep_sum = np.where(known, means * counts, 0.0)
        result.class_seen = np.where(known, counts, 0.0)  # -> NaN state for classes without a reliable count

    # ------------------------------------------------------------------ statistics
    def _statistics_event(self) -> tuple[float, float, int]:
        return (float(self.cfg.privacy.statistics_noise_multiplier), 1.0, 1)

    def release_statistics(self, values: np.ndarray, clip: float) -> np.ndarray:
        """Gaussian mechanism on ``values`` (L2 sensitivity ≤ ``clip``), accounted as ``(σ_stat, 1, 1)``.

        Raises PrivacyBudgetExhausted (and releases nothing) if it would exceed the target.
        """
        sigma = float(self.cfg.privacy.statistics_noise_multiplier)
        reason = budget_reason(self.state_dict(), 0, 1.0, sigma, self.delta, self.target_epsilon,
                               extra_events=[self._statistics_event()], mechanism=self.mechanism)
        if reason is not None:
            raise PrivacyBudgetExhausted(reason)
        noisy = privatize_statistics(values, clip, sigma, self.stats_generator)
        self.accountant.step(noise_multiplier=sigma, sample_rate=1.0)
        return noisy

    def released_class_counts(self) -> np.ndarray:
        """The hospital's class counts as released once by the Gaussian mechanism (float, may be < 0).

        The first call releases (and accounts) them; later calls and later rounds reuse the
        same values (post-processing costs nothing). This is what a DP client may share.
        """
        if self.released_counts is None:
            self.released_counts = self.release_statistics(self.class_counts.astype(np.float64), 1.0)
        return self.released_counts.copy()

    def shared_class_counts(self) -> list[float] | None:
        """Class counts the client may send: the released ones (``noised``) or None (``withheld``)."""
        if statistics_policy(self.cfg) == "withheld":
            return None
        return [float(v) for v in self.released_class_counts()]

    @torch.no_grad()
    def private_class_rep_prior(self, data: ImageSet, student: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
        """FedMAS per-class mean ℓ_rep, released by the Gaussian mechanism: (means, noisy counts).

        Replaces ``class_rep_prior`` in DP mode (step 1 with the received global student, and
        step 2 with the trained one). One un-augmented pass, every example once; the vector
        ``[Σ_i∈c ℓ_rep,i, n_c · 4]`` changes by at most √2·4 in L2 when one example is added or
        removed (ℓ_rep ∈ [0, 4]). Classes with a noisy count below 1 get NaN.
        """
        if self.teacher is None:
            raise ValueError("FedMAS statistics need a teacher (train.method ekd or fopro-kd)")
        student = student if student is not None else self.student
        means = class_rep_prior(student, self.teacher, self.prompt, data, self.cfg, self.device)
        counts = np.bincount(data.labels.cpu().numpy(), minlength=self.num_classes).astype(np.float64)
        vector = np.concatenate([means * counts, counts * REP_LOSS_BOUND])
        noisy = self.release_statistics(vector, math.sqrt(2.0) * REP_LOSS_BOUND)
        return class_means_from_release(noisy, self.num_classes, REP_LOSS_BOUND)

    # ------------------------------------------------------------------ internals
    def _use_private_class_prior(self) -> None:
        """Class priors from the released (noisy) counts: :attr:`loss_class_counts` and the DP prompt objective's."""
        if self.loss_name == "ce" and self.probe is None:
            self.loss_class_counts = None
            return  # no class prior anywhere in the loss
        counts = np.maximum(self.released_class_counts(), 1.0)  # post-processing: every class at least 1
        self.loss_class_counts = counts
        if self.probe is not None and self.prompt_dp:
            prior = counts / counts.sum()
            log_prior = torch.log(torch.as_tensor(prior, dtype=torch.float32) + 1e-12).to(self.device)
            object.__setattr__(self._objective, "_log_prior", log_prior)

    def _noise_only(self, opt) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for param in opt.params:
            noise = torch.normal(0.0, std, size=param.shape, device=param.device, generator=self.noise_generator)
            param.grad = (noise / self.expected_batch_size).to(param.dtype)
            param.grad_sample = None
            param.summed_grad = None

    def _add_proximal(self, anchor: Mapping[str, Tensor] | None, proximal_mu: float) -> None:
        """FedProx' μ(w − w_global): data-independent, added after the noise (post-processing)."""
        if anchor is None or proximal_mu <= 0:
            return
        for name, param in self._params_by_name.items():
            if name in anchor and param.grad is not None:
                param.grad.add_(proximal_mu * (param.detach() - anchor[name]))

    def _reset_prompt_to_identity(self) -> None:
        prompt = self.prompt
        with torch.no_grad():
            if getattr(prompt, "m", None) is not None:
                prompt.m.zero_()
            generator = getattr(prompt, "generator", None)
            if generator is not None:
                last = generator.net[-1]
                last.weight.zero_()
                last.bias.zero_()
