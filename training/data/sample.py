"""The sample type every reader returns, and the protocol a reader implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lisa_core.config import SEG_TOKEN
from lisa_core.errors import InputError

IGNORE_LABEL = 255
APPEARANCE_KEY = "appearance"  # meta: uint8 (K, H, W) per-pixel class maps, 0 background (see training.losses)

Turn = tuple[str, str]  # (question, answer)


@dataclass
class Sample:
    """One image with its conversations and the ground-truth mask of every [SEG] in the answers.

    - `image`: RGB uint8 (H, W, 3).
    - `conversations`: separate conversations about the same image, each a list of (question, answer)
      turns. Segmentation readers give up to 3 single-turn conversations (one per sampled query, as the
      official datasets do); VQA gives one multi-turn conversation. Questions carry no image
      placeholder: whoever builds the prompt puts the image before the first question of each
      conversation.
    - `masks`: uint8 (H, W), one per [SEG] token in the answers, in reading order (conversation by
      conversation, turn by turn, left to right). 1 = target, 0 = background, 255 = ignored by the
      metrics (only ReasonSeg has it; for training losses use `mask == 1`, as the official code does).
    - `source`: the reader's name, e.g. "reason_seg", "refcoco", "ade20k", "llava_instruct", "synthetic".
    - `meta`: reader-specific facts, e.g. {"is_sentence": True, "image_path": ...}; the synthetic reader
      adds APPEARANCE_KEY, the class of every pixel (its shape and its colour), for the appearance loss.
    """

    image: np.ndarray
    conversations: list[list[Turn]]
    masks: list[np.ndarray]
    source: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise InputError(
                f"{self.source}: image must be uint8 (H, W, 3), got {self.image.dtype} {self.image.shape}"
            )
        height, width = self.image.shape[:2]
        seg_count = sum(answer.count(SEG_TOKEN) for conversation in self.conversations for _, answer in conversation)
        if seg_count != len(self.masks):
            raise InputError(f"{self.source}: answers hold {seg_count} {SEG_TOKEN} but {len(self.masks)} masks given")
        for mask in self.masks:
            if mask.dtype != np.uint8 or mask.shape != (height, width):
                raise InputError(
                    f"{self.source}: masks must be uint8 ({height}, {width}), got {mask.dtype} {mask.shape}"
                )

    def masks_per_conversation(self) -> list[list[np.ndarray]]:
        """`masks` split by conversation, following the [SEG] count of each conversation's answers."""
        grouped, start = [], 0
        for conversation in self.conversations:
            count = sum(answer.count(SEG_TOKEN) for _, answer in conversation)
            grouped.append(self.masks[start : start + count])
            start += count
        return grouped

    def query_ground_truth(self, conversation_index: int) -> np.ndarray:
        """The ground truth of one conversation as a single uint8 map for the metrics.

        Union of its masks (1 where any mask is 1, 255 where any is 255 and none is 1, else 0); all
        zeros when the conversation has no [SEG] (an absent target).
        """
        ground_truth = np.zeros(self.image.shape[:2], dtype=np.uint8)
        masks = self.masks_per_conversation()[conversation_index]
        for mask in masks:
            ground_truth[mask == IGNORE_LABEL] = IGNORE_LABEL
        for mask in masks:
            ground_truth[mask == 1] = 1
        return ground_truth


class SampleSource(Protocol):
    """What the mixer needs from a reader: a number of items and a way to build one.

    `get(index, rng)` must depend only on `index` and the numbers drawn from `rng` (a
    numpy.random.Generator), so a seeded mixer is reproducible.
    """

    name: str

    def __len__(self) -> int: ...

    def get(self, index: int, rng: np.random.Generator) -> Sample: ...
