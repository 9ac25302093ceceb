"""Golden-value tests of the classification losses, the representation loss and EKD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fopro_kd.config import TrainConfig
from fopro_kd.losses import (
    LOSSES,
    EKDLoss,
    build_classification_loss,
    class_balanced_weights,
    list_losses,
    register_loss,
    representation_loss,
)

CFG = TrainConfig()


def test_registry_lists_the_five_config_names() -> None:
    assert list_losses() == ["bsm", "ce", "focal", "ldam", "logit_adjust"]
    assert set(LOSSES) == set(list_losses())


def test_register_loss_rejects_duplicate_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_loss("bsm")(type("Other", (LOSSES["ce"],), {}))


def test_unknown_loss_name_lists_valid_options() -> None:
    with pytest.raises(ValueError) as info:
        build_classification_loss("balanced_softmax", [1, 2], CFG)
    message = str(info.value)
    assert "balanced_softmax" in message
    for name in list_losses():
        assert name in message


def test_invalid_class_counts_raise() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        build_classification_loss("bsm", [0, 0], CFG)
    with pytest.raises(ValueError, match=">= 0"):
        build_classification_loss("bsm", [3, -1], CFG)


def test_logits_with_wrong_number_of_classes_raise() -> None:
    loss = build_classification_loss("ce", [1, 2, 3], CFG)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_bsm_golden_values() -> None:
    # counts [1, 1, 2] -> pi = [0.25, 0.25, 0.5].
    # z = [ln 2, 0, 0], y = 0: pi_0 e^{z_0} = 0.5; denominator 0.5 + 0.25 + 0.5 = 1.25;
    #   loss = -ln(0.5 / 1.25) = -ln 0.4 = 0.916290731874155
    # z = [0, 0, 0], y = 2: loss = -ln(0.5 / 1) = ln 2 = 0.693147180559945
    loss = build_classification_loss("bsm", [1, 1, 2], CFG)
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    per_sample = loss.per_sample(logits, targets)
    assert per_sample.tolist() == pytest.approx([0.916290731874155, 0.693147180559945], abs=1e-9)
    assert loss(logits, targets).item() == pytest.approx((0.916290731874155 + 0.693147180559945) / 2, abs=1e-9)
    expected = F.cross_entropy(logits + torch.log(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)), targets)
    assert loss(logits, targets).item() == pytest.approx(expected.item(), abs=1e-9)


def test_bsm_with_uniform_priors_equals_ce() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 2])
    bsm = build_classification_loss("bsm", [7, 7, 7, 7], CFG)
    assert torch.allclose(bsm.per_sample(logits, targets), F.cross_entropy(logits, targets, reduction="none"), atol=1e-6)


def test_bsm_absent_class_gives_finite_loss_and_gradient() -> None:
    loss = build_classification_loss("bsm", [10, 0, 5], CFG)
    logits = torch.zeros(3, 3, requires_grad=True)
    value = loss(logits, torch.tensor([0, 1, 2]))  # even a sample of the absent class
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()


def test_logit_adjust_tau_one_equals_bsm_and_tau_zero_equals_ce() -> None:
    torch.manual_seed(1)
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    counts = [50, 5, 1]
    bsm = build_classification_loss("bsm", counts, CFG)
    la1 = build_classification_loss("logit_adjust", counts, TrainConfig(logit_adjust_tau=1.0))
    la0 = build_classification_loss("logit_adjust", counts, TrainConfig(logit_adjust_tau=0.0))
    assert torch.allclose(la1.per_sample(logits, targets), bsm.per_sample(logits, targets), atol=1e-6)
    assert torch.allclose(la0.per_sample(logits, targets), F.cross_entropy(logits, targets, reduction="none"), atol=1e-6)


def test_focal_gamma_zero_equals_ce_and_gamma_two_golden() -> None:
    torch.manual_seed(2)
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    focal0 = build_classification_loss("focal", [1, 1, 1], TrainConfig(focal_gamma=0.0))
    assert torch.allclose(focal0.per_sample(logits, targets), F.cross_entropy(logits, targets, reduction="none"), atol=1e-6)
    # z = [0, 0], y = 0: p = 0.5, loss = (1 - 0.5)^2 * ln 2 = 0.25 * 0.693147 = 0.173286795139986
    focal2 = build_classification_loss("focal", [1, 1], TrainConfig(focal_gamma=2.0))
    assert focal2(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(0.173286795139986, abs=1e-6)


def test_ldam_margins_for_given_counts() -> None:
    # n = [16, 1, 0, 81] -> n^{-1/4} = [1/2, 1, -, 1/3]; scaled so max = 0.5:
    # [0.25, 0.5, 0.5 (absent class: max margin), 0.5/3]
    loss = build_classification_loss("ldam", [16, 1, 0, 81], TrainConfig(ldam_max_margin=0.5))
    assert loss.margins.tolist() == pytest.approx([0.25, 0.5, 0.5, 0.5 / 3], abs=1e-7)


def test_ldam_golden_value() -> None:
    # n = [1, 16] -> margins [0.5, 0.25]; z = [0, 0], y = 0, s = 2:
    # s * (z - 0.5 e_0) = [-1, 0]; CE = -ln(e^{-1} / (e^{-1} + 1)) = ln(1 + e) = 1.313261687518223
    loss = build_classification_loss("ldam", [1, 16], TrainConfig(ldam_scale=2.0, ldam_max_margin=0.5))
    assert loss(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(1.313261687518223, abs=1e-6)


def test_ldam_drw_switches_at_the_configured_epoch() -> None:
    counts = [100, 10, 1]
    cfg = TrainConfig(drw_start_fraction=0.8, ldam_scale=1.0)
    loss = build_classification_loss("ldam", counts, cfg)
    logits, targets = torch.zeros(3, 3), torch.tensor([0, 1, 2])
    unweighted = loss.per_sample(logits, targets)
    loss.set_epoch(7, 10)  # floor(0.8 * 10) = 8 -> still plain LDAM
    assert loss.class_weights.tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(loss.per_sample(logits, targets), unweighted)
    loss.set_epoch(8, 10)
    expected = class_balanced_weights(counts, 0.9999)
    assert loss.class_weights.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert torch.allclose(loss.per_sample(logits, targets), unweighted * torch.tensor(expected, dtype=torch.float32))
    loss.set_epoch(3, 10)  # going back (e.g. a restarted schedule) switches weights off again
    assert loss.class_weights.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["ce", "bsm", "logit_adjust", "focal"])
def test_set_epoch_is_a_no_op_for_other_losses(name: str) -> None:
    loss = build_classification_loss(name, [5, 1], CFG)
    logits, targets = torch.tensor([[0.3, -0.2]]), torch.tensor([1])
    before = loss(logits, targets)
    loss.set_epoch(9, 10)
    assert loss(logits, targets).item() == before.item()


def test_class_balanced_weights_golden_values() -> None:
    # beta = 0.5, n = [1, 2, 0]: (1 - b)/(1 - b^n) = [0.5/0.5, 0.5/0.75] = [1, 2/3];
    # rescaled to sum to 2 present classes: [1.2, 0.8]; absent class -> 0.
    assert class_balanced_weights([1, 2, 0], 0.5).tolist() == pytest.approx([1.2, 0.8, 0.0])
    # beta = 0 -> uniform over present classes
    assert class_balanced_weights([5, 0, 50], 0.0).tolist() == pytest.approx([1.0, 0.0, 1.0])
    # beta -> 1 tends to inverse frequency: n = [1, 3] -> [1, 1/3] rescaled = [1.5, 0.5]
    assert class_balanced_weights([1, 3], 0.999999).tolist() == pytest.approx([1.5, 0.5], rel=1e-4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        class_balanced_weights([1, 2], 1.0)


def test_representation_loss_geometry() -> None:
    u = torch.tensor([[1.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[2.0, 4.0], [0.0, 5.0], [-1.0, 0.0], [0.0, 1.0]])
    # parallel -> 0, orthogonal -> 2, opposite -> 4, zero vector -> finite (= |t_bar|^2 = 1)
    assert representation_loss(u, t).tolist() == pytest.approx([0.0, 2.0, 4.0, 1.0], abs=1e-6)


def test_representation_loss_is_scale_invariant_and_equals_two_minus_two_cos() -> None:
    torch.manual_seed(3)
    u, t = torch.randn(4, 8), torch.randn(4, 8)
    base = representation_loss(u, t)
    assert torch.allclose(representation_loss(7.5 * u, 0.01 * t), base, atol=1e-5)
    assert torch.allclose(base, 2 - 2 * F.cosine_similarity(u, t, dim=1), atol=1e-5)


def test_representation_loss_shape_mismatch_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        representation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def _ekd_batch(seed: int = 4) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    return torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 6), torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])


def test_ekd_total_is_cls_plus_aux_plus_lambda_rep() -> None:
    logits, aux, proj, teacher, targets = _ekd_batch()
    bsm = build_classification_loss("bsm", [10, 3, 1], CFG)
    ekd = EKDLoss(bsm, lambda_rep=3.0)
    loss, terms = ekd(logits, aux, proj, teacher, targets)
    cls = bsm(logits, targets)
    aux_loss = bsm(aux, targets)
    rep = representation_loss(proj, teacher).mean()
    assert loss.item() == pytest.approx((cls + aux_loss + 3.0 * rep).item(), abs=1e-6)
    assert terms["loss_cls"] == pytest.approx(cls.item(), abs=1e-6)
    assert terms["loss_aux"] == pytest.approx(aux_loss.item(), abs=1e-6)
    assert terms["loss_rep"] == pytest.approx(rep.item(), abs=1e-6)
    assert terms["loss"] == pytest.approx(terms["loss_cls"] + terms["loss_aux"] + 3.0 * terms["loss_rep"], abs=1e-6)
    assert all(type(v) is float for v in terms.values())


def test_ekd_per_sample_means_equal_forward() -> None:
    logits, aux, proj, teacher, targets = _ekd_batch(5)
    ekd = EKDLoss(build_classification_loss("ldam", [10, 3, 1], CFG), lambda_rep=2.0)
    loss, terms = ekd(logits, aux, proj, teacher, targets)
    per_sample = ekd.per_sample(logits, aux, proj, teacher, targets)
    assert per_sample.shape == (5,)
    assert per_sample.mean().item() == pytest.approx(loss.item(), abs=1e-5)
    assert ekd.per_sample_rep(proj, teacher).mean().item() == pytest.approx(terms["loss_rep"], abs=1e-6)


def test_ekd_lambda_zero_allows_missing_teacher_and_nonzero_requires_it() -> None:
    logits, aux, _, _, targets = _ekd_batch()
    ce = build_classification_loss("ce", [1, 1, 1], CFG)
    loss, terms = EKDLoss(ce, lambda_rep=0.0)(logits, aux, None, None, targets)
    assert terms["loss_rep"] == 0.0
    assert loss.item() == pytest.approx(terms["loss_cls"] + terms["loss_aux"], abs=1e-6)
    with pytest.raises(ValueError, match="lambda_rep=3.0"):
        EKDLoss(ce, lambda_rep=3.0)(logits, aux, None, None, targets)
    with pytest.raises(ValueError, match="lambda_rep"):
        EKDLoss(ce, lambda_rep=-1.0)


@pytest.mark.parametrize("name", list_losses())
def test_every_registered_loss_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(6)
    loss = build_classification_loss(name, [40, 8, 0, 2], CFG)
    logits = torch.randn(7, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 0, 0, 1])
    loss.set_epoch(9, 10)
    value = loss(logits, targets)
    per_sample = loss.per_sample(logits, targets)
    assert value.ndim == 0 and per_sample.shape == (7,)
    assert value.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_losses())
def test_every_registered_loss_works_in_float64_and_inside_ekd(name: str) -> None:
    torch.manual_seed(7)
    ekd = EKDLoss(build_classification_loss(name, np.array([3, 9]), CFG), lambda_rep=3.0)
    proj = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss, _ = ekd(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64),
                  proj, torch.randn(4, 5), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    assert loss.dtype == torch.float64 and torch.isfinite(proj.grad).all()


def test_class_balanced_rep_weights_follow_the_schedule_and_favour_rare_classes() -> None:
    """rep_weighting class_balanced: ℓ_rep_i · w[y_i] from rep_weighting_start on; before, and with
    ``none``, exactly the published EKD. The rare class's images weigh more than the common one's."""
    from dataclasses import replace

    from fopro_kd.losses import build_ekd_loss

    counts = [500, 40, 4]
    logits, aux, proj, teacher, _ = _ekd_batch(6)
    targets = torch.tensor([0, 1, 2, 2, 0])
    bsm = build_classification_loss("bsm", counts, CFG)
    plain = build_ekd_loss(bsm, counts, CFG)
    assert plain.rep_class_weights is None
    cfg = replace(CFG, rep_weighting="class_balanced", rep_weighting_beta=0.999, rep_weighting_start=0.5)
    weighted = build_ekd_loss(bsm, counts, cfg)
    w = class_balanced_weights(counts, 0.999)
    assert w[2] > w[1] > w[0] and w.sum() == pytest.approx(3.0)
    rep = representation_loss(proj, teacher)
    weighted.set_epoch(1, 4)  # epoch 1 < 0.5 * 4: not yet
    before = weighted.per_sample(logits, aux, proj, teacher, targets)
    assert torch.equal(before, plain.per_sample(logits, aux, proj, teacher, targets))
    weighted.set_epoch(2, 4)  # from epoch 2 on
    after = weighted.per_sample(logits, aux, proj, teacher, targets)
    expected = before - CFG.lambda_rep * rep + CFG.lambda_rep * rep * torch.as_tensor(w, dtype=torch.float32)[targets]
    assert torch.allclose(after, expected, atol=1e-6)
    assert (after - before)[targets == 2].min() > 0 > (after - before)[targets == 0].max()  # rare up, common down
    with pytest.raises(ValueError, match="rep_weighting_start"):
        EKDLoss(bsm, 3.0, w, rep_weighting_start=1.5)


def test_rep_weighting_settings_are_checked_at_load() -> None:
    from fopro_kd.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="train.rep_weighting_beta"):
        config_from_dict({"train": {"rep_weighting": "class_balanced", "rep_weighting_beta": 1.0}})
    with pytest.raises(ConfigError, match="train.rep_weighting_start"):
        config_from_dict({"train": {"rep_weighting_start": -0.1}})
    with pytest.raises(ConfigError, match="rep_weighting"):
        config_from_dict({"train": {"rep_weighting": "inverse"}})
