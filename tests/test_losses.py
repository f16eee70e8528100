"""The LISA loss against values worked out by hand."""

import math

import pytest
import torch

from training.losses import (
    LossWeights,
    dice_per_mask,
    iou_prediction_loss,
    lisa_loss,
    mask_ious,
    mask_losses,
    sigmoid_bce_per_mask,
)


def _bce(logit: float, target: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_bce_is_the_mean_over_pixels_of_each_mask():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = (_bce(0, 1) + _bce(2, 0) + _bce(-1, 0) + _bce(3, 1)) / 4
    assert sigmoid_bce_per_mask(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_dice_uses_the_official_scale_and_eps():
    # logit 0 -> p = 0.5 on all 4 pixels; target has 2 positive pixels.
    logits = torch.zeros(1, 2, 2)
    targets = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    numerator = 2 * (0.5 + 0.5) / 1000
    denominator = (4 * 0.5) / 1000 + 2 / 1000
    expected = 1 - (numerator + 1e-6) / (denominator + 1e-6)
    assert dice_per_mask(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.5, abs=1e-3)


def test_dice_of_an_empty_prediction_on_an_empty_mask_is_almost_zero():
    logits = torch.full((1, 3, 3), -30.0)
    targets = torch.zeros(1, 3, 3)
    # sigmoid(-30) * 9 / 1000 is ~8e-16: eps dominates both terms.
    assert dice_per_mask(logits, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_perfect_confident_prediction_has_near_zero_mask_losses():
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    logits = (targets * 2 - 1) * 40
    bce, dice, count = mask_losses([logits], [targets])
    assert count == 1
    assert bce.item() < 1e-12
    assert dice.item() < 1e-6


def test_masks_are_averaged_over_every_mask_of_the_batch_not_per_sample():
    # Sample 0 has two masks, sample 1 has one mask of another size (masks at original resolution).
    s0_logits = torch.tensor([[[0.0, 0.0]], [[2.0, -2.0]]])  # (2, 1, 2)
    s0_targets = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    s1_logits = torch.tensor([[[1.0], [1.0], [1.0]]])  # (1, 3, 1)
    s1_targets = torch.tensor([[[1.0], [1.0], [0.0]]])
    bce, dice, count = mask_losses([s0_logits, s1_logits], [s0_targets, s1_targets])
    per_mask_bce = [
        (_bce(0, 1) + _bce(0, 0)) / 2,
        (_bce(2, 1) + _bce(-2, 0)) / 2,
        (2 * _bce(1, 1) + _bce(1, 0)) / 3,
    ]
    assert count == 3
    assert bce.item() == pytest.approx(sum(per_mask_bce) / 3, rel=1e-6)

    def dice_by_hand(probs, target):
        num = 2 * sum(p * t for p, t in zip(probs, target)) / 1000
        den = sum(probs) / 1000 + sum(target) / 1000
        return 1 - (num + 1e-6) / (den + 1e-6)

    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    per_mask_dice = [
        dice_by_hand([0.5, 0.5], [1, 0]),
        dice_by_hand([s(2), s(-2)], [1, 0]),
        dice_by_hand([s(1)] * 3, [1, 1, 0]),
    ]
    assert dice.item() == pytest.approx(sum(per_mask_dice) / 3, rel=1e-5)


def test_total_is_weighted_one_ce_two_bce_half_dice():
    ce = torch.tensor(1.25)
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    bce, dice, _ = mask_losses([logits], [targets])
    loss = lisa_loss(ce, [logits], [targets])
    assert loss.ce.item() == pytest.approx(1.25)
    assert loss.bce.item() == pytest.approx(2.0 * bce.item())
    assert loss.dice.item() == pytest.approx(0.5 * dice.item())
    assert loss.total.item() == pytest.approx(1.25 + 2.0 * bce.item() + 0.5 * dice.item())
    custom = lisa_loss(ce, [logits], [targets], LossWeights(ce=0.0, bce=1.0, dice=0.0))
    assert custom.total.item() == pytest.approx(bce.item())


def test_batch_without_masks_adds_nothing_and_gradients_flow_through_masks():
    ce = torch.tensor(0.7, requires_grad=True)
    loss = lisa_loss(ce, [torch.zeros(0, 4, 4)], [torch.zeros(0, 4, 4)])
    assert loss.total.item() == pytest.approx(0.7)
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    lisa_loss(ce, [logits], [torch.ones(1, 2, 2)]).total.backward()
    assert logits.grad is not None and torch.all(logits.grad < 0)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match="sample 0"):
        mask_losses([torch.zeros(1, 2, 2)], [torch.zeros(1, 3, 3)])


def test_iou_term_is_the_squared_error_to_each_masks_iou():
    logits = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])  # top row; nothing
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    assert mask_ious(logits, targets).tolist() == [0.5, 0.0]
    assert mask_ious(torch.full((1, 2, 2), -1.0), torch.zeros(1, 2, 2)).tolist() == [1.0]  # nothing to find
    predicted = torch.tensor([0.9, 0.2], requires_grad=True)
    expected = ((0.9 - 0.5) ** 2 + (0.2 - 0.0) ** 2) / 2
    assert iou_prediction_loss([predicted], [logits], [targets]).item() == pytest.approx(expected)
    ce = torch.tensor(0.0)
    loss = lisa_loss(ce, [logits], [targets], LossWeights(iou=3.0), [predicted])
    assert loss.iou.item() == pytest.approx(3.0 * expected)
    assert loss.total.item() == pytest.approx(loss.bce.item() + loss.dice.item() + 3.0 * expected)
    loss.total.backward()
    assert predicted.grad.tolist() == pytest.approx([3.0 * 2 * 0.4 / 2, 3.0 * 2 * 0.2 / 2])
    # The official recipe (weight 0) adds nothing and needs no predictions.
    assert lisa_loss(ce, [logits], [targets]).iou.item() == 0.0
    with pytest.raises(ValueError, match="no IoU predictions"):
        lisa_loss(ce, [logits], [targets], LossWeights(iou=1.0))
