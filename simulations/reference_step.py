"""A bare PyTorch reference of one local FoPro-KD training step (for ``simulations.bench step``).

Deliberately written without any fopro-kd code: plain timm models, plain ``nn.Linear``
heads, a hand-written balanced softmax and cosine representation loss, plain
``torch.optim.Adam`` and the Fourier prompt math inline. It does *the same math* as
:class:`fopro_kd.training.trainer.LocalTrainer` with augmentation off, so the ratio
"framework images/s / reference images/s" measures what the framework adds (Python
bookkeeping, checks, dispatch), not a different algorithm. The benchmark copies the
framework's weights into these modules, and checks that the first step's loss matches.

Methods (as ``train.method`` / ``akd.mode``):

* ``bsm``: student forward/backward with the balanced softmax on the main head;
* ``ekd``: teacher forward (no grad) on the clean image, then the EKD student step
  ``BSM(z) + BSM(a) + λ (2 − 2 cos(u, t))``;
* ``fopro-kd`` with ``akd="off"``: as ``ekd`` but the teacher sees the (fixed) prompted image;
* ``fopro-kd`` with ``akd="discriminative"``: one prompt step (teacher forward/backward
  through the prompt into a balanced linear probe, Adam on prompt + probe), then the EKD
  student step on the detached features of that prompt step;
* ``fopro-kd`` with ``akd="minmax"``: a no-grad student projection, one prompt step that
  ascends ``mean(2 − 2 cos(u, T(FPG(x))))`` (minus the regulariser), then the student step.

The student's state dict keys (``backbone.*``, ``classifier.*``, ``projector.*``,
``aux_classifier.*``) match the framework's ``EKDStudent``, so its weights load directly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReferenceStep"]

_EPS = 1e-12


class ReferenceStep:
    """One training step in plain PyTorch; call it with a uint8 batch and int64 labels.

    Parameters
    ----------
    method : ``bsm``, ``ekd`` or ``fopro-kd``.
    akd : ``off``, ``discriminative`` or ``minmax`` (fopro-kd only).
    student_arch, teacher_arch : timm architecture names.
    teacher_kwargs : extra ``timm.create_model`` arguments of the teacher (e.g. ``pad_type="same"``).
    num_classes, class_counts : the task; the counts set the balanced-softmax prior.
    student_size, teacher_size : square input sizes.
    student_mean/std, teacher_mean/std : each model normalises its own [0, 1] input.
    lr, prompt_lr, lambda_rep, grad_clip, eps, band, gamma : as the config fields of the same names.
    device : where to run; on CUDA the models run under bf16 autocast with a channels_last student input.
    """

    def __init__(
        self,
        *,
        method: str,
        akd: str = "off",
        student_arch: str = "resnet18",
        teacher_arch: str | None = "mobilenetv2_100",
        teacher_kwargs: dict | None = None,
        num_classes: int,
        class_counts: Sequence[int],
        student_size: int,
        teacher_size: int | None = None,
        student_mean: Sequence[float] = (0.485, 0.456, 0.406),
        student_std: Sequence[float] = (0.229, 0.224, 0.225),
        teacher_mean: Sequence[float] = (0.5, 0.5, 0.5),
        teacher_std: Sequence[float] = (0.5, 0.5, 0.5),
        lr: float = 3e-4,
        prompt_lr: float = 1e-3,
        lambda_rep: float = 3.0,
        grad_clip: float = 5.0,
        eps: float = 0.5,
        band: float = 1.0,
        gamma: float = 1e-3,
        device: torch.device | str = "cpu",
    ) -> None:
        if method not in ("bsm", "ekd", "fopro-kd"):
            raise ValueError(f"method must be bsm, ekd or fopro-kd, got {method!r}")
        self.method = method
        self.akd = akd if method == "fopro-kd" else "off"
        self.device = torch.device(device)
        self.student_size = int(student_size)
        self.lambda_rep = float(lambda_rep)
        self.grad_clip = float(grad_clip)
        self.eps = float(eps)
        self.gamma = float(gamma)
        dev = self.device

        # ---- student: plain timm backbone + plain heads (same key names as EKDStudent)
        backbone = timm.create_model(student_arch, pretrained=False, num_classes=0)
        d = backbone.num_features
        self.student = nn.ModuleDict({"backbone": backbone, "classifier": nn.Linear(d, num_classes)})
        self.teacher: nn.Module | None = None
        if method != "bsm":
            if teacher_arch is None or teacher_size is None:
                raise ValueError("ekd / fopro-kd need teacher_arch and teacher_size")
            teacher = timm.create_model(teacher_arch, pretrained=False, num_classes=0, **(teacher_kwargs or {}))
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.teacher = teacher.to(dev)
            t_dim = teacher.num_features
            self.student["projector"] = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, t_dim))
            self.student["aux_classifier"] = nn.Linear(t_dim, num_classes)
            self.teacher_size = int(teacher_size)
        self.student.to(dev)
        self.s_mean = torch.tensor(student_mean, device=dev).view(1, 3, 1, 1)
        self.s_std = torch.tensor(student_std, device=dev).view(1, 3, 1, 1)
        self.t_mean = torch.tensor(teacher_mean, device=dev).view(1, 3, 1, 1)
        self.t_std = torch.tensor(teacher_std, device=dev).view(1, 3, 1, 1)
        prior = np.asarray(class_counts, dtype=np.float64)
        self.log_prior = torch.log(torch.tensor(prior / prior.sum(), dtype=torch.float32) + _EPS).to(dev)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=lr)

        # ---- prompt: a free amplitude multiplier on the rfft2 half spectrum (fopro-kd only)
        self.prompt_m: nn.Parameter | None = None
        self.probe: nn.Linear | None = None
        self.prompt_optimizer: torch.optim.Optimizer | None = None
        if method == "fopro-kd":
            s = self.teacher_size
            w = s // 2 + 1
            self.prompt_m = nn.Parameter(torch.zeros(3, s, w, device=dev))
            radius = int(math.floor(band * s + 1e-9)) // 2
            k_h = torch.arange(s) - s // 2
            k_w = torch.arange(w)
            self.band_mask = ((k_h.abs()[:, None] <= radius) & (k_w[None, :] <= radius)).float().to(dev)
            self.mirror_rows = ((2 * (s // 2) - torch.arange(s)) % s).to(dev)
            self_conj = torch.zeros(w, dtype=torch.bool)
            self_conj[0] = True
            if s % 2 == 0:
                self_conj[-1] = True
            self.self_conj_cols = self_conj.to(dev)
            params: list[nn.Parameter] = [self.prompt_m]
            if self.akd == "discriminative":
                self.probe = nn.Linear(self.teacher.num_features, num_classes).to(dev)
                params += list(self.probe.parameters())
            if self.akd != "off":
                self.prompt_optimizer = torch.optim.Adam(params, lr=prompt_lr)

    # ------------------------------------------------------------------ weights
    def load_weights(
        self,
        student: dict[str, Tensor],
        teacher: dict[str, Tensor] | None = None,
        prompt_m: Tensor | None = None,
        probe: dict[str, Tensor] | None = None,
    ) -> None:
        """Copy weights (e.g. the framework's) so both sides compute on identical numbers."""
        self.student.load_state_dict(student)
        if teacher is not None and self.teacher is not None:
            self.teacher.load_state_dict(teacher)
        if prompt_m is not None and self.prompt_m is not None:
            with torch.no_grad():
                self.prompt_m.copy_(prompt_m)
        if probe is not None and self.probe is not None:
            self.probe.load_state_dict(probe)

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _multiplier(self) -> Tensor:
        """M = 1 + ε · band · sym(tanh m), sym(t)(k) = (t(k) + t(−k)) / 2 on the stored conjugate pairs."""
        t = torch.tanh(self.prompt_m)
        mirrored = torch.where(self.self_conj_cols, t.index_select(-2, self.mirror_rows), t)
        return 1.0 + self.eps * self.band_mask * (0.5 * (t + mirrored))

    def _prompt(self, x: Tensor, multiplier: Tensor) -> Tensor:
        """x̃ = irfft2(rfft2(x) · ifftshift_H(M)), in float32 outside autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            spectrum = torch.fft.rfft2(x, norm="ortho")
            spectrum = spectrum * torch.fft.ifftshift(multiplier, dim=(-2,))
            return torch.fft.irfft2(spectrum, s=x.shape[-2:], norm="ortho")

    def _teacher_in(self, x01: Tensor) -> Tensor:
        if x01.shape[-1] != self.teacher_size or x01.shape[-2] != self.teacher_size:
            x01 = F.interpolate(x01, size=(self.teacher_size, self.teacher_size), mode="bilinear", align_corners=False)
        return x01

    def _teacher(self, x01_resized: Tensor) -> Tensor:
        return self.teacher((x01_resized - self.t_mean) / self.t_std)

    def _bsm(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), y)

    @staticmethod
    def _cosine_rep(u: Tensor, t: Tensor) -> Tensor:
        """2 − 2 cos(u, t) per sample, written out."""
        u = u / u.norm(dim=1, keepdim=True).clamp_min(_EPS)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return (u - t).pow(2).sum(dim=1)

    def _student_heads(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        h = self.student["backbone"]((x - self.s_mean) / self.s_std)
        z = self.student["classifier"](h)
        if "projector" not in self.student:
            return z, None, None
        u = self.student["projector"](h)
        return z, self.student["aux_classifier"](u), u

    # ------------------------------------------------------------------ the step
    def __call__(self, images_uint8: Tensor, labels: Tensor) -> float:
        """One step on a uint8 (B, 3, H, W) batch; returns the student loss (a float)."""
        dev = self.device
        y = labels.to(dev)
        x = images_uint8.to(dev).float().div_(255.0)
        student_in = x
        if x.shape[-1] != self.student_size:
            student_in = F.interpolate(x, size=(self.student_size, self.student_size), mode="bilinear",
                                       align_corners=False, antialias=self.student_size < x.shape[-1])
        if dev.type == "cuda":
            student_in = student_in.contiguous(memory_format=torch.channels_last)
        self.student.train()

        targets = None
        if self.method == "ekd":
            with torch.no_grad(), self._autocast():
                targets = self._teacher(self._teacher_in(x)).float()
        elif self.method == "fopro-kd" and self.akd == "off":
            with torch.no_grad(), self._autocast():
                targets = self._teacher(self._prompt(self._teacher_in(x), self._multiplier())).float()
        elif self.method == "fopro-kd":
            projection = None
            if self.akd == "minmax":
                with torch.no_grad(), self._autocast():
                    projection = self._student_heads(student_in)[2].float()
            with self._autocast():
                multiplier = self._multiplier()
                feats = self._teacher(self._prompt(self._teacher_in(x), multiplier)).float()
                reg = self.gamma * (multiplier - 1.0).pow(2).mean()
                if self.akd == "minmax":
                    objective = -self._cosine_rep(projection, feats).mean() + reg
                else:
                    objective = F.cross_entropy(self.probe(feats) + self.log_prior, y) + reg
            self.prompt_optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.prompt_optimizer.step()
            targets = feats.detach()

        with self._autocast():
            z, a, u = self._student_heads(student_in)
            loss = self._bsm(z, y)
            if targets is not None:
                loss = loss + self._bsm(a, y) + self.lambda_rep * self._cosine_rep(u.float(), targets).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(loss.detach())
