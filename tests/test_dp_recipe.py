"""The DP training recipe (issue 11 §3, docs/privacy.md §6.3): physical chunks of a logical Poisson
batch, logical-step accounting, the recipe's input checks, and the frozen-feature DP probe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fopro_kd.config import Config, ConfigError, config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.metrics import compute_metrics
from fopro_kd.privacy.accounting import epsilon_of_history, normalise_history
from fopro_kd.privacy.feature_probe import FeatureProbe, head_probabilities, normalise_features
from fopro_kd.privacy.local_dp import recipe_lr
from fopro_kd.privacy.sampling import PoissonBatchLoader, physical_chunks
from fopro_kd.training.components import build_models
from fopro_kd.training.trainer import LocalTrainer

SIZE = 32


def trainer_cfg(**privacy) -> Config:
    return config_from_dict({
        "data": {"image_size": SIZE, "num_classes": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"source": "none"},
        "train": {"batch_size": 8, "epochs": 1, "method": "bsm", "optimizer": "sgd", "lr": 0.05, "momentum": 0.0},
        "augment": {"enabled": False},
        "federation": {"num_rounds": 1, "local_epochs": 1},
        "privacy": {"mode": "local", "noise_multiplier": 1.0, "noise_seed": 3, **privacy},
    })


def probe_cfg(**sections) -> Config:
    values = {
        "data": {"num_classes": 4},
        "train": {"method": "bsm", "batch_size": 200, "epochs": 6, "optimizer": "sgd", "lr": 0.5, "momentum": 0.9},
        "privacy": {"mode": "local", "target_epsilon": 3.0, "noise_seed": 1, "lr_rule": "linear",
                    "lr_reference_batch": 100, "max_physical_batch_size": 64},
    }
    for key, val in sections.items():
        values.setdefault(key, {}).update(val)
    return config_from_dict(values)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on 2 shared cores a 2-thread pool spends its time waiting for the other thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images():
    return make_synthetic_imageset([12, 8, 4], SIZE, seed=0)


def make_trainer(cfg: Config, data) -> LocalTrainer:
    torch.manual_seed(0)
    student, _ = build_models(cfg, 3, None)
    return LocalTrainer(cfg, student, None, None, data.class_counts(), torch.device("cpu"))


def blobs(n_per_class: list[int], dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An easy task: one Gaussian cluster per class around orthogonal directions."""
    gen = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for c, n in enumerate(n_per_class):
        centre = torch.zeros(dim)
        centre[c] = 3.0
        feats.append(centre + torch.randn(n, dim, generator=gen))
        labels.append(torch.full((n,), c, dtype=torch.long))
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------- physical chunks


def test_physical_chunks_cover_the_batch_and_an_empty_batch_is_one_chunk() -> None:
    assert physical_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert physical_chunks(10, None) == [slice(0, 10)]
    assert physical_chunks(0, 4) == [slice(0, 0)]
    loader = PoissonBatchLoader(make_synthetic_imageset([20, 20], 8, seed=0), 0.5, 4, torch.Generator().manual_seed(0),
                                max_physical_batch_size=3)
    sizes, last = [], []
    for _, labels, _ in loader:
        sizes.append(int(labels.shape[0]))
        last.append(loader.last_chunk)
    assert max(sizes) <= 3 and loader.logical_steps == 4 and sum(last) == 4  # one last chunk per logical batch


def test_trainer_chunked_batch_gives_the_logical_batch_update_and_counts_logical_steps(images) -> None:
    """Same noise seed: chunks of 3 give the clipped + noised update of the whole Poisson batch."""
    whole = make_trainer(trainer_cfg(), images)
    chunked = make_trainer(trainer_cfg(max_physical_batch_size=3), images)
    start = copy.deepcopy(whole.student.state_dict())
    r_whole = whole.train(images, epochs=2)
    r_chunked = chunked.train(images, epochs=2)
    assert r_chunked.num_steps > r_whole.num_steps  # the trainer saw more (physical) batches ...
    moved = False
    for key, value in whole.student.state_dict().items():
        assert torch.allclose(value, chunked.student.state_dict()[key], atol=1e-5), key
        moved |= not torch.equal(value, start[key])
    assert moved
    h_whole = whole.dp.state_dict()["history"]
    h_chunked = chunked.dp.state_dict()["history"]
    assert h_whole == h_chunked  # ... but the accountant counts the same logical steps
    steps = sum(n for _, q, n in normalise_history(h_chunked) if q < 1)
    assert steps == 2 * 3  # 2 epochs x ceil(24 / 8)


def test_feature_probe_chunks_match_one_physical_batch_and_account_logical_steps() -> None:
    feats, labels = blobs([150, 100, 50, 30])
    feats = normalise_features(feats, "l2")
    a = FeatureProbe(probe_cfg(privacy={"max_physical_batch_size": None}), feats, labels, 4, private=True)
    b = FeatureProbe(probe_cfg(privacy={"max_physical_batch_size": 7}), feats, labels, 4, private=True)
    ra, rb = a.train(2), b.train(2)
    assert torch.allclose(ra.weight, rb.weight, atol=1e-5) and torch.allclose(ra.bias, rb.bias, atol=1e-5)
    assert not torch.equal(ra.weight, torch.zeros_like(ra.weight))
    assert rb.physical_batches > 4 * rb.logical_steps
    assert rb.logical_steps == ra.logical_steps == 2 * b.steps_per_epoch
    dp_steps = [e for e in b.accountant_history() if e[1] < 1]
    assert sum(e[2] for e in dp_steps) == rb.logical_steps
    assert b.epsilon() == pytest.approx(epsilon_of_history(b.accountant_history(), 1e-5))


# --------------------------------------------------------------------------- recipe input checks


def test_bad_recipe_input_is_one_clear_error_before_training(images) -> None:
    trainer = make_trainer(trainer_cfg(max_physical_batch_size=4), images)
    big = copy.deepcopy(trainer.cfg)
    big.train.batch_size = 100
    trainer.cfg = big
    trainer.dp.cfg = big
    before = copy.deepcopy(trainer.student.state_dict())
    with pytest.raises(ValueError, match=r"train.batch_size = 100 is larger than the 24 training examples"):
        trainer.train(images, epochs=1)
    assert trainer.dp.state_dict()["history"] == []  # nothing released, not even the class counts
    assert all(torch.equal(v, before[k]) for k, v in trainer.student.state_dict().items())
    feats, labels = blobs([20, 20, 20, 20])
    with pytest.raises(ValueError, match=r"train.batch_size = 200 is larger than the 80"):
        FeatureProbe(probe_cfg(), feats, labels, 4, private=True)
    with pytest.raises(ConfigError, match="privacy.max_physical_batch_size"):
        probe_cfg(privacy={"max_physical_batch_size": 0})
    with pytest.raises(ConfigError, match="federation.local_steps"):
        probe_cfg(federation={"local_steps": 5})
    with pytest.raises(ConfigError, match="privacy.lr_reference_batch"):
        probe_cfg(privacy={"lr_reference_batch": 0})


def test_linear_lr_rule_scales_with_the_expected_batch(images) -> None:
    cfg = probe_cfg()
    assert recipe_lr(cfg) == pytest.approx(0.5 * 200 / 100)
    cfg.privacy.lr_rule = "fixed"
    assert recipe_lr(cfg) == pytest.approx(0.5)
    trainer = make_trainer(trainer_cfg(lr_rule="linear", lr_reference_batch=4), images)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 8 / 4)


# --------------------------------------------------------------------------- direction check


def test_dp_probe_with_the_recipe_learns_an_easy_long_tailed_task() -> None:
    """ε 3 on 4 long-tailed Gaussian classes: far above chance (0.25), every class recalled."""
    feats, labels = blobs([900, 400, 150, 80], seed=0)
    test_f, test_y = blobs([100, 100, 100, 100], seed=1)
    feats, test_f = normalise_features(feats, "l2"), normalise_features(test_f, "l2")
    cfg = probe_cfg(train={"batch_size": 256, "epochs": 20}, privacy={"noise_seed": None})
    probe = FeatureProbe(cfg, feats, labels, 4, private=True)
    assert probe.noise_multiplier > 0.5
    result = probe.train(cfg.train.epochs)
    assert result.epsilon <= 3.0 + 1e-6
    m = compute_metrics(test_y.numpy(), head_probabilities(result.weight, result.bias, test_f),
                        ["a", "b", "c", "d"], np.bincount(labels.numpy()))
    assert m["balanced_accuracy"] > 0.7
    assert min(m["per_class_recall"].values()) > 0.3


def test_dp_prototypes_have_sensitivity_one_and_learn_an_easy_task() -> None:
    """The released class sums move by at most 1 (Frobenius) when one example is removed; ε 3 learns blobs."""
    from fopro_kd.privacy.feature_probe import dp_class_prototypes

    feats, labels = blobs([900, 400, 150, 80], seed=0)
    feats = normalise_features(feats, "l2")
    sums = torch.zeros(4, feats.shape[1]).index_add_(0, labels, feats)
    for drop in (0, 1000, 1500):
        keep = torch.arange(len(labels)) != drop
        other = torch.zeros(4, feats.shape[1]).index_add_(0, labels[keep], feats[keep])
        assert float((sums - other).norm()) <= 1.0 + 1e-5
    protos, sigma, eps = dp_class_prototypes(feats, labels, 4, 3.0, 1e-5, torch.Generator().manual_seed(0))
    assert eps <= 3.0 + 1e-6 and sigma > 1.0
    test_f, test_y = blobs([100, 100, 100, 100], seed=1)
    m = compute_metrics(test_y.numpy(), head_probabilities(10 * protos, torch.zeros(4), normalise_features(test_f, "l2")),
                        ["a", "b", "c", "d"], np.bincount(labels.numpy()))
    assert m["balanced_accuracy"] > 0.7
    with pytest.raises(ValueError, match="unit-norm"):
        dp_class_prototypes(3 * feats, labels, 4, 3.0, 1e-5, torch.Generator().manual_seed(0))
