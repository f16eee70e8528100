"""SAM's own task before LISA's: each target's mask from a few points inside it.

The official recipe starts from SAM's released weights, trained on SA-1B with point and box prompts, so
its mask decoder already turns a prompt into one object's mask. A SAM trained from random weights inside
LISA (the demo) has to learn that from the [SEG] prompts alone: its mask loss then stays on a plateau
(every object alike, dice about 0.32) for 750 to 1750 optimizer steps, depending on the seed, before
the prompts start to select the target. `sam_point_steps` steps of this task first end the plateau
sooner (models/demo/RESULTS.md has the curves).

Each target mask of a batch is prompted by 1 to POINTS_MAX positive points (SAM's foreground clicks)
drawn uniformly from its pixels, one count per image, and decoded into one mask (multimask_output
False, as LISA decodes); the loss is LISA's BCE and DICE terms (training.losses). Only SAM's weights
train; the language model and CLIP are untouched.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from lisa_core.preprocess import postprocess_masks
from training.collate import LisaBatch
from training.losses import LossWeights, dice_per_mask, sigmoid_bce_per_mask

POINTS_MAX = 3


def sample_points(mask: torch.Tensor, count: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """`count` (x, y) points drawn from the pixels of a (H, W) mask, in SAM's input frame (`scale`:
    resized size over original size, (height, width)): (count, 2) float."""
    rows, columns = torch.nonzero(mask > 0.5, as_tuple=True)
    picks = torch.randint(len(rows), (count,), generator=generator)
    return torch.stack([columns[picks].float() * scale[1], rows[picks].float() * scale[0]], dim=-1)


def point_prompt_loss(
    sam: Sam, batch: LisaBatch, weights: LossWeights, generator: torch.Generator, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted total, mean BCE, mean DICE) over the batch's non-empty target masks."""
    image_embeddings = sam.image_encoder(batch.sam_pixels)
    dense_pe = sam.prompt_encoder.get_dense_pe()
    bce, dice = [], []
    for index, masks in enumerate(batch.gt_masks):
        masks = masks[masks.flatten(1).sum(1) > 0].to(image_embeddings.device)
        if len(masks) == 0:
            continue
        (height, width), resized = batch.original_sizes[index], batch.resized_sizes[index]
        scale = (resized[0] / height, resized[1] / width)
        count = int(torch.randint(1, POINTS_MAX + 1, (1,), generator=generator))
        points = torch.stack([sample_points(mask, count, scale, generator) for mask in masks])
        labels = torch.ones(points.shape[:2], dtype=torch.long)
        sparse, dense = sam.prompt_encoder(
            points=(points.to(image_embeddings.device), labels.to(image_embeddings.device)), boxes=None, masks=None
        )
        low_res, _ = sam.mask_decoder(
            image_embeddings=image_embeddings[index : index + 1],
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = postprocess_masks(low_res, resized, (height, width), size=image_size)
        bce.append(sigmoid_bce_per_mask(logits, masks))
        dice.append(dice_per_mask(logits, masks))
    if not bce:
        zero = image_embeddings.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    bce_mean, dice_mean = torch.cat(bce).mean(), torch.cat(dice).mean()
    return weights.bce * bce_mean + weights.dice * dice_mean, bce_mean.detach(), dice_mean.detach()
