"""The one local training loop: CE / BSM / EKD / FoPro-KD (with prompt training), per site.

Used unchanged by the single-site run (``fopro-kd train``) and by every federated
client, so a federation trains exactly what a centralised run trains. State that must
survive between federated rounds (optimizers, the prompt and its probe, the RNG) is
exposed through :meth:`LocalTrainer.state_dict` and never contains the student weights,
which travel separately.

With ``privacy.mode: local`` the trainer owns a :class:`~fopro_kd.privacy.local_dp.DPContext`
and hands it explicit parts (:class:`~fopro_kd.privacy.local_dp.DPParts`: student, optimizers,
prompt, probe, prior ...), never itself; what DP changes in the trainer comes back through
two narrow answers (``DPContext.akd_mode`` after construction, ``DPContext.loss_class_counts``
after each ``batch_loader``) that the trainer applies to its own fields.

:class:`~fopro_kd.training.results.EpochResult` and
:func:`~fopro_kd.training.results.class_rep_prior` live in :mod:`fopro_kd.training.results`
(the DP code and the federated client need them without the trainer).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import Tensor, nn

from fopro_kd.config import Config, feature_cache_problem
from fopro_kd.data.batches import BatchLoader
from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.transforms import BatchAugment, resize_batch, to_float_on
from fopro_kd.losses import build_classification_loss, build_ekd_loss, representation_loss
from fopro_kd.models.student import EKDStudent
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.privacy.local_dp import DPContext, DPParts
from fopro_kd.prompt import FourierPrompt, prompt_input
from fopro_kd.prompt_objectives import ObjectiveContext, build_prompt_objective
from fopro_kd.training.feature_cache import (
    FeatureStore,
    TeacherFeatureCache,
    apply_flip_view,
    cache_key,
    cached_features,
    check_cache_size,
    settings_key,
    store_file,
)
from fopro_kd.training.precision import autocast_context
from fopro_kd.training.results import EpochResult
from fopro_kd.training.teacher_view import prompted_student_input, teacher_features, teacher_targets
from fopro_kd.run_plan import resolve_run_plan

__all__ = ["LocalTrainer", "make_optimizer", "predict"]


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float, momentum: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {name!r}")


class LocalTrainer:
    """Trains one student on one site's data with the configured method.

    Parameters
    ----------
    cfg : the run configuration (``train``, ``augment``, ``prompt``, ``akd`` sections).
    student : the model being trained (its weights are the only thing a federation shares).
    teacher : the frozen public teacher, or None for ``ce`` / ``bsm``.
    prompt : the Fourier prompt for ``fopro-kd``, else None.
    class_counts : training images per class *at this site*; sets the balanced-softmax prior.
    device : where to train.
    """

    def __init__(
        self,
        cfg: Config,
        student: EKDStudent,
        teacher: FrozenTeacher | None,
        prompt: FourierPrompt | None,
        class_counts: np.ndarray,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.plan = resolve_run_plan(cfg)
        """What the config resolves to (method traits, effective loss and AKD mode, sizes, DP flags)."""
        self.method = self.plan.method
        if self.plan.uses_teacher and teacher is None:
            raise ValueError(f"train.method {self.method!r} needs a teacher")
        if self.plan.uses_prompt and prompt is None:
            raise ValueError(f"train.method {self.method!r} needs a prompt (FourierPrompt)")
        self.device = device
        self.student = student.to(device)
        self.teacher = teacher.to(device) if teacher is not None and self.plan.uses_teacher else None
        self.prompt = prompt.to(device) if prompt is not None and self.plan.uses_prompt else None
        self.class_counts = np.asarray(class_counts, dtype=np.int64)
        self.num_classes = len(self.class_counts)
        self.student_size = self.plan.student_input_size
        loss_name = self.plan.classification_loss
        self.classification = build_classification_loss(loss_name, self.class_counts, cfg.train)
        self.ekd = build_ekd_loss(self.classification, self.class_counts, cfg.train) if self.teacher is not None else None
        self.augment = BatchAugment(cfg.augment)
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        self.optimizer = make_optimizer(
            [p for p in self.student.parameters() if p.requires_grad],
            cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum,
        )
        self.akd_mode = self.plan.akd_mode  # "off" unless fopro-kd (then a prompt is given); DP may turn it off below
        self.probe: nn.Linear | None = None
        self.prompt_optimizer: torch.optim.Optimizer | None = None
        if self.akd_mode != "off":
            params = list(self.prompt.parameters())
            if self.akd_mode == "discriminative":
                self.probe = nn.Linear(self.teacher.feature_dim, self.num_classes).to(device)
                params += list(self.probe.parameters())
            self.prompt_optimizer = torch.optim.Adam(params, lr=cfg.prompt.lr)
            prior = self.class_counts / max(1, self.class_counts.sum())
            self._log_prior = torch.log(torch.as_tensor(prior, dtype=torch.float32) + 1e-12).to(device)
        self.objective: nn.Module | None = None  # built at the first train() call (it may need the data)
        self.objective_excluded: Tensor | None = None
        self.feature_cache: TeacherFeatureCache | None = None
        self.two_stage = self.prompt is not None and cfg.prompt.schedule == "two_stage"
        self.explore_override: bool | None = None
        """Set by a federated-prompt client: the server says whether this round explores (federated_prompt.py)."""
        self._pending_objective_rng: dict | None = None
        """A loaded objective draw state waiting for the objective to be built (:meth:`load_state_dict`)."""
        self.epochs_done = 0
        self.dp: DPContext | None = None  # privacy.mode local: DP-SGD state (fopro_kd/privacy/local_dp.py, docs/privacy.md)
        if self.plan.local_dp:
            self.dp = DPContext(DPParts(
                cfg=cfg, student=self.student, device=device, optimizer=self.optimizer, class_counts=self.class_counts,
                loss_name=loss_name, teacher=self.teacher, prompt=self.prompt, probe=self.probe,
                prompt_optimizer=self.prompt_optimizer, akd_mode=self.akd_mode,
                log_prior=getattr(self, "_log_prior", None),
            ))
            if self.dp.akd_mode == "off":  # privacy.prompt frozen: the prompt stays the identity, no AKD
                self.akd_mode = "off"
                self.prompt_optimizer = None
                self.probe = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Client-side state that persists between rounds (never the student weights)."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epochs_done": self.epochs_done,
        }
        if self.prompt is not None:
            state["prompt"] = self.prompt.state_dict()
        if self.prompt_optimizer is not None:
            state["prompt_optimizer"] = self.prompt_optimizer.state_dict()
        if self.probe is not None:
            state["probe"] = self.probe.state_dict()
        if self.dp is not None:
            state["privacy"] = self.dp.state_dict()
        draws = getattr(self.objective, "generator", None)  # e.g. the prototype objective's support draws
        if isinstance(draws, np.random.Generator):
            state["objective_rng"] = draws.bit_generator.state
        elif self._pending_objective_rng is not None:  # loaded, objective not built yet: keep it for the next save
            state["objective_rng"] = self._pending_objective_rng
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epochs_done = int(state["epochs_done"])
        if self.prompt is not None and "prompt" in state:
            self.prompt.load_state_dict(state["prompt"])
        if self.prompt_optimizer is not None and "prompt_optimizer" in state:
            self.prompt_optimizer.load_state_dict(state["prompt_optimizer"])
        if self.probe is not None and "probe" in state:
            self.probe.load_state_dict(state["probe"])
        if self.dp is not None:
            self.dp.load_state_dict(state.get("privacy"))
        self._pending_objective_rng = state.get("objective_rng")
        self._restore_objective_rng()

    def _restore_objective_rng(self) -> None:
        """Continue the prompt objective's draw stream where the saved run left it (once it exists)."""
        draws = getattr(self.objective, "generator", None)
        if self._pending_objective_rng is not None and isinstance(draws, np.random.Generator):
            draws.bit_generator.state = self._pending_objective_rng
            self._pending_objective_rng = None

    # ------------------------------------------------------------------ training
    @property
    def exploring(self) -> bool:
        """``prompt.schedule: two_stage`` and still in its exploration stage (the prompt trains online)."""
        if self.explore_override is not None:
            return self.two_stage and self.explore_override
        return self.two_stage and self.epochs_done < self.cfg.prompt.explore_epochs

    def enable_feature_cache(self, data: ImageSet) -> None:
        """Compute the (prompted) teacher's targets once per image and view (feature_cache.py).

        With ``two_stage`` this is where the prompt is frozen: it never trains again in this
        trainer, so every later target is exactly the cached one.
        """
        problem = feature_cache_problem(self.cfg)
        if problem is not None:
            raise ValueError(f"train.cache_teacher_features cannot be used: {problem}")
        if self.prompt is not None:
            self.prompt.requires_grad_(False)
            self.prompt.eval()
        view_set = "clean" if not self.cfg.augment.enabled or self.cfg.augment.teacher_view == "clean" else "flips"
        pre_size = self.student_size if self.cfg.augment.teacher_view == "student" else None
        check_cache_size(len(data), view_set, self.teacher.feature_dim, self.cfg.train.cache_dtype,
                         self.cfg.train.max_cache_gb)  # also on a memo hit: the bound is this run's
        t = self.cfg.teacher
        # everything a target depends on besides the image and the weights (named in the store's file name):
        # the teacher's build (its padding kwargs change features) and its numerics (layout, BatchNorm
        # folding: float rounding)
        teacher_settings = (t.arch, t.source, t.file, t.input_size, t.mean, t.std,
                            tuple(sorted(t.model_kwargs.items())), self.teacher.numerics)
        settings = (teacher_settings, self.prompt, view_set, self.cfg.prompt.domain, self.cfg.train.cache_dtype,
                    str(self.device), pre_size)
        key = cache_key(settings[0], settings[1], data, *settings[2:])
        directory = self.cfg.train.feature_cache_dir

        def build(images: ImageSet) -> TeacherFeatureCache:
            return TeacherFeatureCache(
                self.teacher, images, self.cfg.train.eval_batch_size, self.device, prompt=self.prompt,
                domain=self.cfg.prompt.domain, view_set=view_set, dtype=self.cfg.train.cache_dtype,
                max_gb=self.cfg.train.max_cache_gb, pre_size=pre_size)

        def store() -> tuple[FeatureStore, ImageSet]:  # the disk tier, per image (train.feature_cache_dir)
            store_key = settings_key(*settings)
            return FeatureStore(store_file(directory, store_key, self.teacher.weights_desc), store_key, view_set,
                                build), data

        self.feature_cache = cached_features(key, lambda: build(data), max_bytes=self.cfg.train.max_cache_gb * 1e9,
                                             store=None if directory is None else store)

    def train(
        self,
        data: ImageSet,
        epochs: int = 1,
        max_steps: int | None = None,
        total_epochs: int | None = None,
        proximal_mu: float = 0.0,
        global_params: dict[str, Tensor] | None = None,
        track_class_rep: bool = False,
        progress: bool = False,
    ) -> EpochResult:
        """Train for ``epochs`` passes (or ``max_steps`` batches) over ``data``.

        ``total_epochs`` is the run's planned length, for schedules (LDAM-DRW, AKD warm-up);
        ``proximal_mu`` > 0 adds FedProx's μ/2‖w − w_global‖² with ``global_params``.
        """
        if len(data) == 0:
            raise ValueError("cannot train on an empty dataset")
        if self.feature_cache is not None and self.feature_cache.num_images != len(data):
            raise ValueError("the teacher feature cache was built for another dataset")
        if self.akd_mode != "off" and self.objective is None:
            self._build_objective(data)
        total_epochs = total_epochs or (self.epochs_done + epochs)
        sums: dict[str, float] = {}
        result = EpochResult()
        if track_class_rep:
            result.class_rep_sum = np.zeros(self.num_classes, dtype=np.float64)
            result.class_seen = np.zeros(self.num_classes, dtype=np.int64)
        anchor = None
        if proximal_mu > 0:
            if global_params is None:
                raise ValueError("proximal_mu > 0 needs global_params")
            trainable = {name for name, p in self.student.named_parameters() if p.requires_grad}
            # frozen parameters never move from the global value: no proximal term to compute every step
            anchor = {k: v.detach().to(self.device) for k, v in global_params.items() if k in trainable}
        if self.dp is not None:  # Poisson sampling, budget check, class-count release, DP optimizers
            loader = self.dp.batch_loader(data, epochs, max_steps)
            if self.dp.loss_class_counts is not None:
                self._use_class_prior(self.dp.loss_class_counts)
        else:
            loader = BatchLoader(data, self.cfg.train.batch_size, shuffle=True, seed=int(self.cfg.seed), drop_last=False)
        bar = _progress(epochs * len(loader), progress, "train")
        for _ in range(epochs):
            wants_cache = self.cfg.train.cache_teacher_features or self.two_stage
            if wants_cache and self.teacher is not None and self.feature_cache is None and not self.exploring:
                self.enable_feature_cache(data)  # two_stage: exploration is over, the prompt freezes here
            loader.set_epoch(self.epochs_done)
            (self.ekd or self.classification).set_epoch(self.epochs_done, total_epochs)  # EKD forwards it
            prompt_active = (self.akd_mode != "off" and self.epochs_done >= self.cfg.akd.warmup_epochs
                             and self.feature_cache is None)
            for images, labels, indices in loader:
                train_prompt = prompt_active and result.num_steps % self.cfg.akd.prompt_every == 0
                if self.dp is not None:  # no BatchNorm in DP mode; an empty Poisson batch still makes a (noise) step
                    if labels.shape[0] == 0:
                        terms = self.dp.empty_step(train_prompt, anchor, proximal_mu)
                    else:
                        terms = self._step(images, labels, indices, train_prompt, anchor, proximal_mu, result)
                    self.dp.account_batch(train_prompt)
                elif labels.shape[0] < 2:
                    continue  # BatchNorm cannot train on one image; a lone remainder image waits for the next epoch
                else:
                    terms = self._step(images, labels, indices, train_prompt, anchor, proximal_mu, result)
                n = int(labels.shape[0])
                result.num_examples += n
                result.num_steps += 1
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value * n
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['loss']:.3f}")
                if max_steps is not None and result.num_steps >= max_steps:
                    break
            self.epochs_done += 1
            if max_steps is not None and result.num_steps >= max_steps:
                break
        if bar is not None:
            bar.close()
        result.losses = {k: v / max(1, result.num_examples) for k, v in sums.items()}
        if self.dp is not None:
            self.dp.finish(result, data, track_class_rep)  # per-class statistics never leave raw
        return result

    def _use_class_prior(self, counts: np.ndarray) -> None:
        """Rebuild the class-prior losses (and the probe's prior) from ``counts``.

        DP mode calls this with the class counts released by the Gaussian mechanism: private
        counts would make every example's gradient depend on the others.
        """
        self.classification = build_classification_loss(self.plan.classification_loss, counts, self.cfg.train)
        if self.teacher is not None:
            self.ekd = build_ekd_loss(self.classification, counts, self.cfg.train)
        if self.probe is not None:
            prior = counts / counts.sum()
            self._log_prior = torch.log(torch.as_tensor(prior, dtype=torch.float32) + 1e-12).to(self.device)

    def _views(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Student input, teacher input (``augment.teacher_view``) and each image's flip view."""
        x = to_float_on(images, self.device)
        x_aug, views = self.augment.with_flip_views(x, self.generator)
        teacher_view = self.cfg.augment.teacher_view
        if teacher_view == "augmented":
            teacher_in = x_aug
        elif teacher_view == "flips":
            teacher_in = apply_flip_view(x, views)
        elif teacher_view == "student":
            teacher_in = resize_batch(x_aug, self.student_size)  # the teacher resizes it up to its own size
        else:
            teacher_in = x
            views = torch.zeros_like(views)
        student_in = resize_batch(x_aug, self.student_size)
        if self.device.type == "cuda":
            student_in = student_in.contiguous(memory_format=torch.channels_last)
        return student_in, teacher_in, views

    def _step(self, images, labels, indices, train_prompt, anchor, proximal_mu, result) -> dict[str, float]:
        self.student.train()
        y = labels.to(self.device)
        student_in, teacher_in, views = self._views(images)
        terms: dict[str, float] = {}
        targets = None
        if self.teacher is not None:
            if train_prompt:
                if self.dp is not None:
                    targets, prompt_terms = self.dp.prompt_steps(student_in, teacher_in, y)
                else:
                    targets, prompt_terms = self._prompt_steps(student_in, teacher_in, y, indices)
                terms.update(prompt_terms)
            elif self.feature_cache is not None:
                targets = self.feature_cache.lookup(indices, views).to(self.device)
            else:
                with autocast_context(self.device):
                    targets = teacher_targets(self.teacher, teacher_in, self.prompt, self.cfg.prompt.domain)
            targets = targets.float()
            if self.prompt is not None and self.cfg.akd.student_input == "prompted":  # both networks see x̃
                with torch.no_grad():
                    student_in = prompted_student_input(self.teacher, teacher_in, self.prompt, self.student_size)
                if self.device.type == "cuda":
                    student_in = student_in.contiguous(memory_format=torch.channels_last)
        for _ in range(self.cfg.akd.k_s if train_prompt else 1):
            # DP: fp32 student pass, so per-sample norms (clipping = the sensitivity bound) are exact
            with autocast_context(self.device) if self.dp is None else contextlib.nullcontext():
                if self.ekd is not None:
                    out = self.student.forward_train(student_in)
                    loss, ekd_terms = self.ekd(out.logits, out.aux_logits, out.projection, targets, y)
                    terms.update(ekd_terms)
                    if result.class_rep_sum is not None:
                        rep = representation_loss(out.projection.detach().float(), targets).double().cpu().numpy()
                        np.add.at(result.class_rep_sum, y.cpu().numpy(), rep)
                        np.add.at(result.class_seen, y.cpu().numpy(), 1)
                else:
                    logits = self.student(student_in)
                    loss = self.classification(logits, y)
                    terms["loss"] = float(loss.detach())
                if anchor is not None:
                    prox = sum(((p - anchor[name]) ** 2).sum() for name, p in self.student.named_parameters() if name in anchor)
                    loss = loss + 0.5 * proximal_mu * prox
                    terms["loss_prox"] = float(prox.detach())
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite training loss {float(loss)} (terms {terms})")
            if self.dp is not None:  # per-sample clipping + noise replace clip_grad_norm_
                self.dp.student_step(loss, anchor, proximal_mu)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
        return terms

    def _build_objective(self, data: ImageSet) -> None:
        """The registered ``akd.mode`` objective (fopro_kd/prompt_objectives.py) for this site's data."""
        assert self.teacher is not None and self.prompt is not None
        domain = self.cfg.prompt.domain
        teacher, prompt = self.teacher, self.prompt
        ctx = ObjectiveContext(
            teacher=teacher, feature_dim=teacher.feature_dim, class_counts=self.class_counts, data=data,
            features_of=lambda x01: teacher_features(teacher, x01, prompt, domain), device=self.device,
            seed=int(self.cfg.seed), support_per_class=self.cfg.akd.support_per_class,
            support_per_step=self.cfg.akd.support_per_step, temperature=self.cfg.akd.temperature,
            probe=self.probe, log_prior=getattr(self, "_log_prior", None),
        )
        self.objective = build_prompt_objective(self.akd_mode, ctx)
        self._restore_objective_rng()
        excluded = getattr(self.objective, "excluded", None)
        self.objective_excluded = torch.as_tensor(excluded()) if excluded is not None else None

    def _prompt_steps(
        self, student_in: Tensor, teacher_in: Tensor, y: Tensor, indices: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Update the prompt (k_g steps of its ``akd.mode`` objective) and return the teacher targets it produced.

        The features of the last prompt step are reused (detached) as the student's
        targets, which saves one teacher forward per step; they come from the prompt
        just before its last update.
        """
        assert self.prompt is not None and self.prompt_optimizer is not None and self.teacher is not None
        assert self.objective is not None
        domain = self.cfg.prompt.domain
        terms: dict[str, float] = {}
        projection = None
        needs_student = getattr(self.objective, "needs_student", False)
        # akd.student_input prompted: the student is scored on x̃ itself, so the prompt's gradient also flows
        # through S(r(x̃)) (adversarial KD: one input for both networks); otherwise on its own view, fixed
        student_on_x_tilde = needs_student and self.cfg.akd.student_input == "prompted"
        if needs_student and not student_on_x_tilde:
            with torch.no_grad():
                projection = self.student.forward_train(student_in).projection.float()
        keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
        if self.objective_excluded is not None:
            keep = ~torch.isin(indices.cpu(), self.objective_excluded).to(y.device)
        records = getattr(self.objective, "records_teacher_forward", False)
        feats = None
        for _ in range(self.cfg.akd.k_g):
            with autocast_context(self.device):
                if records:
                    self.objective.start_recording()
                try:
                    feats = teacher_features(self.teacher, teacher_in, self.prompt, domain).float()
                finally:
                    if records:
                        self.objective.stop_recording()
                if student_on_x_tilde:  # the student's own gradients are cleared before its step
                    x_tilde = prompted_student_input(self.teacher, teacher_in, self.prompt, self.student_size)
                    projection = self.student.forward_train(x_tilde).projection.float()
                # R on the tensor the prompt is applied to (the generator's M depends on it)
                reg = self.prompt.regularizer(prompt_input(self.teacher, teacher_in, domain))
                loss, objective_terms = self.objective(feats, y, keep, projection)
                objective = loss + reg
                terms.update(objective_terms)
            self.prompt_optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.prompt_optimizer.step()
        terms["prompt_reg"] = float(reg.detach())
        return feats.detach(), terms


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def predict(student: EKDStudent, data: ImageSet, batch_size: int, device: torch.device, input_size: int) -> np.ndarray:
    """Class probabilities of the main head on un-augmented images, shape (N, C)."""
    student.eval()
    probs = []
    for start in range(0, len(data), batch_size):
        x = resize_batch(to_float_on(data.images[start : start + batch_size], device), input_size)
        with autocast_context(device):
            logits = student(x)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    if not probs:
        return np.zeros((0, student.num_classes), dtype=np.float64)
    return torch.cat(probs).double().numpy()
