"""What a LISA query returns (the answer text and one target per [SEG] token), what it is asked, and
the progress it reports while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from lisa_core.prompt import Turn

STAGE_ENCODING = "encoding"  # CLIP and the SAM image encoder
STAGE_GENERATING = "generating"  # the language model writes the answer
STAGE_DECODING_MASKS = "decoding_masks"  # SAM's mask decoder, one mask per [SEG]
STAGES = (STAGE_ENCODING, STAGE_GENERATING, STAGE_DECODING_MASKS)


@dataclass(frozen=True)
class Progress:
    """Where a query stands: reported once at "encoding", after every token at "generating", and once
    at "decoding_masks"."""

    stage: str  # one of STAGES
    text: str  # the answer so far, decoded as the final answer is
    tokens: int  # tokens generated so far


@dataclass
class SegmentRequest:
    """One query on one frame, for LisaPipeline.segment_many.

    `history` holds the conversation's earlier turns (lisa_core.prompt.Turn), oldest first; requests with
    the same `frame_key`, or the same image array, share one encoding of the frame.
    """

    image: np.ndarray
    query: str
    frame_key: Optional[Hashable] = None
    history: Sequence[Turn] = ()
    max_new_tokens: Optional[int] = None
    max_prompt_tokens: Optional[int] = None


@dataclass
class Target:
    """One segmented object, decoded by SAM from one [SEG] embedding.

    `prompt_embedding` is the [SEG] hidden state after the projection (the SAM prompt token, shape
    (prompt_dim,)). Re-applying it to a new frame with SAM alone is how tracking works.
    """

    mask: np.ndarray  # bool, (H, W) of the input image
    confidence: float  # SAM's IoU prediction for this mask, clamped to [0, 1]
    iou_prediction: float  # SAM's IoU prediction as the head gives it (can leave [0, 1])
    prompt_embedding: torch.Tensor
    centroid: Optional[tuple[float, float]]  # (x = column, y = row); None for an empty mask
    box: Optional[tuple[int, int, int, int]]  # (x_min, y_min, x_max, y_max), inclusive; None if empty
    area: int  # pixels in the mask

    @classmethod
    def from_mask(cls, mask: np.ndarray, iou_prediction: float, prompt_embedding: torch.Tensor) -> "Target":
        mask = np.asarray(mask, dtype=bool)
        iou_prediction = float(iou_prediction)
        confidence = min(max(iou_prediction, 0.0), 1.0)
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            return cls(mask, confidence, iou_prediction, prompt_embedding, None, None, 0)
        centroid = (float(cols.mean()), float(rows.mean()))
        box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
        return cls(mask, confidence, iou_prediction, prompt_embedding, centroid, box, int(rows.size))


@dataclass
class SegmentationResult:
    """The outcome of one query on one image."""

    query: str
    answer: str  # decoded answer, special tokens other than [SEG] removed
    targets: list[Target]
    image_size: tuple[int, int]  # (H, W)
    output_ids: list[int] = field(default_factory=list)  # generated token ids, prompt excluded
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    history_turns: int = 0  # earlier turns that were in the prompt
    turns_dropped: int = 0  # oldest earlier turns left out to fit the prompt budget

    def drop_unconfident(self, min_confidence: float) -> None:
        """Leaves out the targets whose confidence is below `min_confidence`; the answer keeps its [SEG]s."""
        self.targets = [target for target in self.targets if target.confidence >= min_confidence]

    @property
    def union_mask(self) -> np.ndarray:
        """All targets together, bool (H, W)."""
        union = np.zeros(self.image_size, dtype=bool)
        for target in self.targets:
            union |= target.mask
        return union
