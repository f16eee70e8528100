"""ReasonSeg metrics: per-query IoU ignoring label 255, gIoU (mean IoU) and cIoU (sum I / sum U).

An empty prediction on an empty ground truth (union 0) counts as IoU 1, as in the official evaluation.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from lisa_core.errors import InputError

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def intersection_and_union(pred: ArrayLike, gt: ArrayLike, ignore_index: int = 255) -> tuple[int, int]:
    """Foreground intersection and union of one binary prediction with its ground truth.

    `pred`: (H, W) bool or 0/1 values. `gt`: (H, W) with 1 = target, 0 = background and `ignore_index`
    for pixels that count for neither. Arrays may be numpy or torch.
    """
    pred = _as_numpy(pred)
    gt = _as_numpy(gt)
    if pred.shape != gt.shape:
        raise InputError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    valid = gt != ignore_index
    pred_fg = (pred != 0) & valid
    gt_fg = (gt == 1) & valid
    intersection = int(np.count_nonzero(pred_fg & gt_fg))
    union = int(np.count_nonzero(pred_fg | gt_fg))
    return intersection, union


def iou_from_counts(intersection: int, union: int) -> float:
    """IoU from counts; 1.0 when the union is empty (nothing predicted, nothing to find)."""
    return 1.0 if union == 0 else intersection / union


class SegmentationMeter:
    """Accumulates per-query counts; `giou` is the mean of per-query IoUs, `ciou` is sum I / sum U."""

    def __init__(self, ignore_index: int = 255):
        self.ignore_index = ignore_index
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def update(self, pred: ArrayLike, gt: ArrayLike) -> float:
        """Add one query's prediction and ground truth; returns its IoU."""
        intersection, union = intersection_and_union(pred, gt, self.ignore_index)
        return self.add(intersection, union)

    def add(self, intersection: int, union: int) -> float:
        """Add counts computed elsewhere (e.g. gathered from other processes); returns the IoU."""
        if intersection < 0 or union < intersection:
            raise InputError(f"invalid counts: intersection {intersection}, union {union}")
        self.intersections.append(int(intersection))
        self.unions.append(int(union))
        return iou_from_counts(intersection, union)

    def __len__(self) -> int:
        return len(self.unions)

    @property
    def giou(self) -> float:
        if not self.unions:
            raise InputError("no queries recorded: gIoU is undefined")
        return float(np.mean([iou_from_counts(i, u) for i, u in zip(self.intersections, self.unions)]))

    @property
    def ciou(self) -> float:
        if not self.unions:
            raise InputError("no queries recorded: cIoU is undefined")
        return iou_from_counts(sum(self.intersections), sum(self.unions))

    def summary(self) -> dict[str, float]:
        return {"gIoU": self.giou, "cIoU": self.ciou, "queries": len(self)}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, group = np.unique(values, return_inverse=True)
    return (np.bincount(group, ranks) / np.bincount(group))[group]


def spearman_correlation(x: ArrayLike, y: ArrayLike) -> Optional[float]:
    """Spearman's rank correlation (ties get their average rank); None when either side is constant."""
    x, y = _as_numpy(x).astype(float).ravel(), _as_numpy(y).astype(float).ravel()
    if x.shape != y.shape:
        raise InputError(f"{x.size} values against {y.size}: rank correlation needs pairs")
    if x.size < 2:
        return None
    rank_x, rank_y = _average_ranks(x), _average_ranks(y)
    if rank_x.std() == 0 or rank_y.std() == 0:
        return None
    return float(np.corrcoef(rank_x, rank_y)[0, 1])
