"""``akd.student_input: prompted``: the student trains on the teacher's prompted input x̃ (adversarial KD)."""

from __future__ import annotations

import pytest
import torch

from fopro_kd.config import ConfigError, config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.data.transforms import resize_batch, to_float
from fopro_kd.losses import representation_loss
from fopro_kd.models.student import build_student
from fopro_kd.models.teacher import build_teacher
from fopro_kd.prompt import build_prompt
from fopro_kd.training.teacher_view import prompted_student_input, teacher_targets
from fopro_kd.training.trainer import LocalTrainer

SIZE, STUDENT = 32, 16


def cfg_of(student_input: str):
    return config_from_dict({
        "data": {"image_size": SIZE, "num_classes": 3},
        "student": {"arch": "test_resnet", "input_size": STUDENT},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": SIZE},
        "augment": {"enabled": False},
        "prompt": {"param": "radial", "radial_bands": 4},
        "train": {"batch_size": 16, "epochs": 1, "method": "fopro-kd", "lr": 3e-3, "lambda_rep": 3.0},
        "akd": {"mode": "off", "student_input": student_input},
    })


def strong_prompt(cfg):
    """A fixed, clearly non-identity mask: the lowest rings x1.5, the highest x0.5 (eps 0.5, tanh(±4) ≈ ±1)."""
    prompt = build_prompt(cfg.prompt, SIZE)
    with torch.no_grad():
        m = next(prompt.parameters())
        m.copy_(torch.tensor([4.0, 4.0, -4.0, -4.0]).expand_as(m))
    prompt.requires_grad_(False)
    return prompt


def trained(student_input: str, data, teacher, steps: int = 60):
    cfg = cfg_of(student_input)
    torch.manual_seed(0)
    student = build_student(cfg.student, 3, teacher.feature_dim)
    trainer = LocalTrainer(cfg, student, teacher, strong_prompt(cfg), data.class_counts(), torch.device("cpu"))
    trainer.train(data, epochs=1, max_steps=steps)
    return trainer


@pytest.fixture(scope="module")
def data():
    return make_synthetic_imageset([24, 16, 8], SIZE, seed=0)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(cfg_of("own").teacher)


def test_the_student_sees_the_prompted_image(data, teacher) -> None:
    cfg = cfg_of("prompted")
    torch.manual_seed(0)
    student = build_student(cfg.student, 3, teacher.feature_dim)
    prompt = strong_prompt(cfg)
    trainer = LocalTrainer(cfg, student, teacher, prompt, data.class_counts(), torch.device("cpu"))
    seen = []
    real_features = student.features
    student.features = lambda x01: (seen.append(x01.detach().clone()), real_features(x01))[1]
    x = to_float(data.images[:8])
    trainer._step(data.images[:8], data.labels[:8], torch.arange(8), False, None, 0.0, trainer_result())
    expected = resize_batch(prompt(teacher.resize(x)), STUDENT)
    assert torch.allclose(seen[0], expected, atol=1e-6)
    assert not torch.allclose(seen[0], resize_batch(x, STUDENT), atol=1e-3), "x̃ differs from the plain image"
    assert torch.equal(prompted_student_input(teacher, x, prompt, STUDENT), expected)


def trainer_result():
    from fopro_kd.training.results import EpochResult

    return EpochResult()


def test_training_on_the_prompted_image_fits_the_prompted_targets_better(data, teacher) -> None:
    """Direction: the student trained on x̃ matches T(x̃) on x̃ better than one trained on x (same seed, steps)."""
    own, prompted = trained("own", data, teacher), trained("prompted", data, teacher)
    x = to_float(data.images)
    x_tilde = prompted_student_input(teacher, x, prompted.prompt, STUDENT)
    targets = teacher_targets(teacher, x, prompted.prompt, "raw").float()

    def rep_on_x_tilde(trainer) -> float:
        trainer.student.eval()
        with torch.no_grad():
            return float(representation_loss(trainer.student.forward_train(x_tilde).projection.float(), targets).mean())

    assert rep_on_x_tilde(prompted) < rep_on_x_tilde(own)


@pytest.mark.parametrize(("sections", "message"), [
    ({"train": {"method": "ekd"}}, "train.method 'fopro-kd'"),
    ({"train": {"method": "fopro-kd"}, "prompt": {"domain": "normalised"}}, "prompt.domain 'raw'"),
    ({"train": {"method": "fopro-kd"}, "privacy": {"mode": "local", "target_epsilon": 8.0}}, "privacy.mode 'off'"),
])
def test_prompted_student_input_is_refused_where_it_cannot_hold(sections, message) -> None:
    with pytest.raises(ConfigError, match=r"'akd.student_input' prompted needs .*" + message):
        config_from_dict({**sections, "akd": {"student_input": "prompted"}})


def test_minmax_on_the_prompted_input_ascends_the_discrepancy_the_student_sees(data, teacher) -> None:
    """advkd: the prompt's gradient is that of −ℓ_rep(S(r(x̃)), T(x̃)) + R, through both networks' input x̃."""
    cfg = config_from_dict({**cfg_of("prompted").to_dict(), "akd": {"mode": "minmax", "student_input": "prompted"}})
    torch.manual_seed(0)
    student = build_student(cfg.student, 3, teacher.feature_dim).eval()  # fixed BatchNorm statistics
    prompt = build_prompt(cfg.prompt, SIZE)
    with torch.no_grad():  # away from the identity, where the gradient through S(r(x̃)) is not special
        next(prompt.parameters()).normal_(0, 0.5)
    trainer = LocalTrainer(cfg, student, teacher, prompt, data.class_counts(), torch.device("cpu"))
    trainer._build_objective(data)
    x, y = to_float(data.images[::2]), data.labels[::2]
    from fopro_kd.training.teacher_view import teacher_features

    x_tilde = resize_batch(prompt(teacher.resize(x)), STUDENT)
    reference = (-representation_loss(student.forward_train(x_tilde).projection.float(),
                                      teacher_features(teacher, x, prompt, "raw").float()).mean()
                 + prompt.regularizer(x))
    expected = torch.autograd.grad(reference, list(prompt.parameters()))
    weights = {k: v.clone() for k, v in student.named_parameters()}
    trainer._prompt_steps(resize_batch(x, STUDENT), x, y, torch.arange(len(y)))  # k_g = 1: one gradient
    for got, want in zip((p.grad for p in prompt.parameters()), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(v, weights[k]) for k, v in student.named_parameters()), "the prompt step moves no weight"
