"""LISA's training loss: 1.0 x text cross-entropy + 2.0 x per-pixel BCE + 0.5 x DICE (+ optionally SAM's IoU term).

The mask terms follow the official recipe:
- each predicted mask is compared with its ground truth at the image's original resolution;
- BCE is the sigmoid cross-entropy averaged over a mask's pixels;
- DICE is computed on the sigmoid probabilities with every term divided by `scale` (1000) and `eps`
  (1e-6) added to numerator and denominator, so an empty prediction on an empty mask costs 0;
- both are summed over masks and divided by the number of masks in the batch, so a sample with three
  [SEG] weighs three times a sample with one.

Targets are {0, 1}. The official training readers turn ReasonSeg's "ignore" label (255) into
background (`mask == 1`) before the loss; the loss itself ignores nothing. Label 255 is only ignored by
the metrics (lisa_core.metrics).

The IoU term (weight 0 in the official recipe, which never trains SAM's IoU-prediction head) is SAM's
own: the mean squared error between each mask's predicted IoU and the IoU of that mask (logits > 0)
with its ground truth, the target detached, averaged over the batch's masks. With it the published
confidence tracks mask quality.

The appearance term (weight 0 in the official recipe; training-only, not part of LISA) is a per-pixel
cross-entropy of class maps predicted from SAM's image embedding (training.model.AppearanceHead) against
per-pixel classes a synthetic scene knows (its shapes and its colours, training.data.synthetic): it
teaches SAM's encoder features that tell the objects apart, which SAM's released weights bring and a
SAM trained from random weights has to find through the mask loss alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from training.collate import IGNORE_INDEX

DICE_SCALE = 1000.0
DICE_EPS = 1e-6


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    iou: float = 0.0
    appearance: float = 0.0


def sigmoid_bce_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel sigmoid cross-entropy of each mask: (N, H, W) logits and targets -> (N,)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return per_pixel.flatten(1).mean(1)


def dice_per_mask(
    logits: torch.Tensor, targets: torch.Tensor, scale: float = DICE_SCALE, eps: float = DICE_EPS
) -> torch.Tensor:
    """1 - soft DICE of each mask: (N, H, W) logits and targets -> (N,)."""
    probs = logits.sigmoid().flatten(1) / scale
    targets = targets.flatten(1)
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + (targets / scale).sum(-1)
    return 1.0 - (numerator + eps) / (denominator + eps)


@dataclass
class LisaLoss:
    """The three weighted terms and their sum (`total` is what gets back-propagated)."""

    total: torch.Tensor
    ce: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    appearance: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        names = ("total", "ce", "bce", "dice", "iou", "appearance")
        return {name: float(getattr(self, name).detach()) for name in names}


def mask_losses(
    pred_logits: Sequence[torch.Tensor], gt_masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unweighted (BCE, DICE, number of masks) over a batch.

    `pred_logits[i]` and `gt_masks[i]` are (N_i, H_i, W_i) for sample i (N_i may be 0). Each term is
    summed over every mask of the batch and divided by the total number of masks.
    """
    if len(pred_logits) != len(gt_masks):
        raise ValueError(f"{len(pred_logits)} predicted mask sets but {len(gt_masks)} ground-truth sets")
    bce_sum, dice_sum, num_masks = None, None, 0
    for index, (logits, target) in enumerate(zip(pred_logits, gt_masks)):
        if logits.shape != target.shape:
            raise ValueError(
                f"sample {index}: predicted masks {tuple(logits.shape)} != ground truth {tuple(target.shape)}"
            )
        bce = sigmoid_bce_per_mask(logits.float(), target.float()).sum()
        dice = dice_per_mask(logits.float(), target.float()).sum()
        bce_sum = bce if bce_sum is None else bce_sum + bce
        dice_sum = dice if dice_sum is None else dice_sum + dice
        num_masks += int(target.shape[0])
    if bce_sum is None:
        zero = torch.zeros(())
        return zero, zero, 0
    denominator = max(num_masks, 1)
    return bce_sum / denominator, dice_sum / denominator, num_masks


def mask_ious(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of each mask (logits > 0) with its target: (N, H, W) -> (N,); an empty union counts 1."""
    predicted = logits.detach().flatten(1) > 0
    truth = targets.flatten(1) > 0.5
    intersection = (predicted & truth).sum(-1).float()
    union = (predicted | truth).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def iou_prediction_loss(
    iou_predictions: Sequence[torch.Tensor], pred_logits: Sequence[torch.Tensor], gt_masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean squared error of the IoU predictions (N_i,) to each mask's IoU, over every mask of the batch."""
    errors, num_masks = [], 0
    for predicted_iou, logits, target in zip(iou_predictions, pred_logits, gt_masks):
        if target.shape[0]:
            errors.append(((predicted_iou.float() - mask_ious(logits, target)) ** 2).sum())
            num_masks += int(target.shape[0])
    return torch.stack(errors).sum() / num_masks if errors else torch.zeros(())


def appearance_cross_entropy(
    logits: Sequence[torch.Tensor], labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-pixel cross-entropy of K class maps, summed over the maps.

    `logits[k]` is (B, C_k, h, w), upsampled (bilinear) to the labels' size; `labels` is (B, K, S, S)
    long. Each map's term is the mean over its labelled pixels (0 for a map with none).
    """
    if len(logits) != labels.shape[1]:
        raise ValueError(f"{len(logits)} predicted class maps but {labels.shape[1]} label maps")
    total = torch.zeros((), device=labels.device)
    for index, map_logits in enumerate(logits):
        upsampled = F.interpolate(map_logits.float(), labels.shape[-2:], mode="bilinear", align_corners=False)
        target = labels[:, index]
        summed = F.cross_entropy(upsampled, target, ignore_index=ignore_index, reduction="sum")
        total = total + summed / (target != ignore_index).sum().clamp(min=1)
    return total


def lisa_loss(
    ce_loss: torch.Tensor,
    pred_logits: Sequence[torch.Tensor],
    gt_masks: Sequence[torch.Tensor],
    weights: LossWeights = LossWeights(),
    iou_predictions: Optional[Sequence[torch.Tensor]] = None,
    appearance: Optional[torch.Tensor] = None,
) -> LisaLoss:
    """Combine the language model's cross-entropy with the mask terms, weighted as in the recipe.

    A batch without masks (every answer says the target is absent) contributes BCE = DICE = IoU = 0.
    `iou_predictions` (N_i,) per sample are needed when `weights.iou` is not 0, and `appearance` (the
    unweighted appearance_cross_entropy) when `weights.appearance` is not 0.
    """
    bce, dice, _ = mask_losses(pred_logits, gt_masks)
    bce = bce.to(ce_loss.device)
    dice = dice.to(ce_loss.device)
    if weights.iou:
        if iou_predictions is None:
            raise ValueError("weights.iou is set but no IoU predictions were given")
        iou = weights.iou * iou_prediction_loss(iou_predictions, pred_logits, gt_masks).to(ce_loss.device)
    else:
        iou = torch.zeros((), device=ce_loss.device)
    if weights.appearance:
        if appearance is None:
            raise ValueError("weights.appearance is set but no appearance loss was given")
        appearance = weights.appearance * appearance.to(ce_loss.device)
    else:
        appearance = torch.zeros((), device=ce_loss.device)
    ce = weights.ce * ce_loss
    bce = weights.bce * bce
    dice = weights.dice * dice
    return LisaLoss(
        total=ce + bce + dice + iou + appearance, ce=ce, bce=bce, dice=dice, iou=iou, appearance=appearance
    )
