"""What a LISA query returns: the answer text and one target per [SEG] token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class Target:
    """One segmented object, decoded by SAM from one [SEG] embedding.

    `prompt_embedding` is the [SEG] hidden state after the projection (the SAM prompt token, shape
    (prompt_dim,)). Re-applying it to a new frame with SAM alone is how tracking works.
    """

    mask: np.ndarray  # bool, (H, W) of the input image
    confidence: float  # SAM's IoU prediction for this mask
    prompt_embedding: torch.Tensor
    centroid: Optional[tuple[float, float]]  # (x = column, y = row); None for an empty mask
    box: Optional[tuple[int, int, int, int]]  # (x_min, y_min, x_max, y_max), inclusive; None if empty
    area: int  # pixels in the mask

    @classmethod
    def from_mask(cls, mask: np.ndarray, confidence: float, prompt_embedding: torch.Tensor) -> "Target":
        mask = np.asarray(mask, dtype=bool)
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            return cls(mask, float(confidence), prompt_embedding, None, None, 0)
        centroid = (float(cols.mean()), float(rows.mean()))
        box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
        return cls(mask, float(confidence), prompt_embedding, centroid, box, int(rows.size))


@dataclass
class SegmentationResult:
    """The outcome of one query on one image."""

    query: str
    answer: str  # decoded answer, special tokens other than [SEG] removed
    targets: list[Target]
    image_size: tuple[int, int]  # (H, W)
    output_ids: list[int] = field(default_factory=list)  # generated token ids, prompt excluded
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def union_mask(self) -> np.ndarray:
        """All targets together, bool (H, W)."""
        union = np.zeros(self.image_size, dtype=bool)
        for target in self.targets:
            union |= target.mask
        return union
