"""lisa_core.metrics on hand-computed cases."""

import numpy as np
import pytest
import torch

from lisa_core.errors import InputError
from lisa_core.metrics import SegmentationMeter, intersection_and_union, iou_from_counts, spearman_correlation


def grid(rows):
    return np.array(rows, dtype=np.uint8)


def test_intersection_and_union_by_hand():
    pred = grid([[1, 1, 0], [0, 1, 0]])
    gt = grid([[1, 0, 0], [1, 1, 0]])
    # intersection: (0,0), (1,1) -> 2; union: (0,0), (0,1), (1,0), (1,1) -> 4
    assert intersection_and_union(pred, gt) == (2, 4)


def test_ignored_pixels_count_for_neither():
    pred = grid([[1, 1, 1], [0, 0, 1]])
    gt = grid([[1, 255, 0], [255, 0, 255]])
    # pixels (0,1), (1,0), (1,2) ignored; intersection (0,0); union (0,0), (0,2)
    assert intersection_and_union(pred, gt) == (1, 2)
    # with another ignore index, 255 is neither target nor ignored: union = all predicted pixels
    assert intersection_and_union(pred, gt, ignore_index=7) == (1, 4)


def test_empty_prediction_on_empty_ground_truth_is_iou_one():
    pred = np.zeros((4, 4), dtype=bool)
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[0, 0] = 255
    assert intersection_and_union(pred, gt) == (0, 0)
    assert iou_from_counts(0, 0) == 1.0
    meter = SegmentationMeter()
    assert meter.update(pred, gt) == 1.0


def test_false_positive_on_empty_ground_truth_is_iou_zero():
    pred = np.zeros((4, 4), dtype=bool)
    pred[1, 1] = True
    gt = np.zeros((4, 4), dtype=np.uint8)
    assert intersection_and_union(pred, gt) == (0, 1)
    assert SegmentationMeter().update(pred, gt) == 0.0


def test_accepts_torch_and_bool_predictions():
    pred = torch.tensor([[True, False], [True, True]])
    gt = torch.tensor([[1, 1], [0, 255]], dtype=torch.uint8)
    assert intersection_and_union(pred, gt) == (1, 3)


def test_shape_mismatch_is_refused():
    with pytest.raises(InputError, match="shape"):
        intersection_and_union(np.zeros((2, 3)), np.zeros((3, 2)))


def test_meter_giou_and_ciou_by_hand():
    meter = SegmentationMeter()
    # query 1: I=2, U=4 (IoU 0.5)
    meter.update(grid([[1, 1, 0], [0, 1, 0]]), grid([[1, 0, 0], [1, 1, 0]]))
    # query 2: I=0, U=0 (IoU 1)
    meter.update(np.zeros((2, 2), bool), np.zeros((2, 2), np.uint8))
    # query 3: I=1, U=6 (IoU 1/6): prediction 1 pixel inside a 6-pixel target
    pred = np.zeros((2, 3), bool)
    pred[0, 0] = True
    meter.update(pred, np.ones((2, 3), np.uint8))
    assert len(meter) == 3
    assert meter.giou == pytest.approx((0.5 + 1.0 + 1 / 6) / 3)
    assert meter.ciou == pytest.approx((2 + 0 + 1) / (4 + 0 + 6))
    assert meter.summary() == {"gIoU": meter.giou, "cIoU": meter.ciou, "queries": 3}


def test_meter_add_counts_and_validation():
    meter = SegmentationMeter()
    assert meter.add(3, 4) == 0.75
    assert meter.add(0, 0) == 1.0
    assert meter.giou == pytest.approx(0.875)
    assert meter.ciou == pytest.approx(0.75)
    with pytest.raises(InputError, match="invalid counts"):
        meter.add(5, 4)


def test_empty_meter_refuses_to_report():
    with pytest.raises(InputError, match="no queries"):
        SegmentationMeter().giou
    with pytest.raises(InputError, match="no queries"):
        SegmentationMeter().ciou


def test_spearman_by_hand():
    assert spearman_correlation([0.1, 0.4, 0.2, 0.9], [1, 3, 2, 4]) == pytest.approx(1.0)
    assert spearman_correlation([3, 2, 1], [0.2, 0.5, 0.9]) == pytest.approx(-1.0)
    # ties share their average rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4)
    x, y = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    by_hand = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert spearman_correlation([5, 7, 7, 9], [0.1, 0.3, 0.2, 0.8]) == pytest.approx(by_hand)
    assert spearman_correlation([1, 1, 1], [1, 2, 3]) is None and spearman_correlation([1], [2]) is None
    with pytest.raises(InputError, match="pairs"):
        spearman_correlation([1, 2], [1, 2, 3])
