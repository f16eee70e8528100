"""Turn `training.data.Sample`s into one batch of LISA model inputs.

Each sample is one image with one or more conversations about it (training.data.sample.Sample). As in
the official training code, every conversation becomes its own token sequence, while the image goes
through SAM's encoder once; `conversation_image` says which image each sequence belongs to.

A conversation's tokens are the llava_v1 prompt (lisa_core.prompt.build_prompt, the image placeholder
expanded by lisa_core.prompt.tokenize_with_image) followed, for each turn, by the answer tokens and
EOS. Every prompt part is tokenised exactly as lisa_core tokenises the query (with the earlier turns as
history) at inference, so training sees what inference feeds; the answers are tokenised on their own,
as the model writes them. Labels are IGNORE_INDEX everywhere except the answers and their EOS, which
is what the model must learn to write.

Ground-truth masks stay at the image's original resolution, as float {0, 1} (`mask == 1`: label 255,
ReasonSeg's "ignore", counts as background in the loss, as in the official readers). They are grouped
per image in [SEG] reading order, which is also the order in which the model's [SEG] tokens appear in
that image's sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lisa_core.checkpoint import seg_token_id
from lisa_core.config import LisaConfig
from lisa_core.errors import InputError
from lisa_core.preprocess import clip_preprocess, sam_preprocess, sam_resized_shape
from lisa_core.prompt import ANSWER_SEPARATOR, Turn, build_prompt, tokenize_with_image
from training.data.sample import APPEARANCE_KEY, IGNORE_LABEL, Sample

IGNORE_INDEX = -100


@dataclass
class LisaBatch:
    """Model inputs for C conversations about B images (C >= B)."""

    input_ids: torch.Tensor  # (C, L) long, IMAGE_PLACEHOLDER_ID at the image features' positions
    attention_mask: torch.Tensor  # (C, L) long, 0 on right padding
    labels: torch.Tensor  # (C, L) long, IGNORE_INDEX except answer tokens
    conversation_image: torch.Tensor  # (C,) long, index of each conversation's image
    clip_pixels: torch.Tensor  # (B, 3, clip_size, clip_size) float
    sam_pixels: torch.Tensor  # (B, 3, sam_size, sam_size) float
    resized_sizes: list[tuple[int, int]]  # per image, (h, w) inside the padded SAM input
    original_sizes: list[tuple[int, int]]  # per image, (H, W)
    gt_masks: list[torch.Tensor]  # per image, (N_b, H, W) float {0, 1}, one per [SEG]
    # (B, K, sam_size, sam_size) long: the samples' APPEARANCE_KEY class maps placed as SAM's input places
    # the image, IGNORE_INDEX on the padding and for samples without them; None unless the collator is
    # asked for K maps
    appearance: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "LisaBatch":
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif item.name == "gt_masks":
                value = [mask.to(device) for mask in value]
            moved[item.name] = value
        return LisaBatch(**moved)

    @property
    def num_images(self) -> int:
        return len(self.original_sizes)

    @property
    def num_masks(self) -> int:
        return sum(int(mask.shape[0]) for mask in self.gt_masks)


class LisaCollator:
    """Callable for a DataLoader's `collate_fn`: list[Sample] -> LisaBatch."""

    def __init__(self, tokenizer, config: LisaConfig, max_length: int, appearance_maps: int = 0) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = max_length
        self.appearance_maps = appearance_maps
        self.seg_token_id = seg_token_id(tokenizer, config.seg_token)
        self.template_tokens = dict(
            image_token=config.image_token,
            im_start_token=config.im_start_token,
            im_end_token=config.im_end_token,
            use_im_start_end=config.use_im_start_end,
        )
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has no EOS token: answers could not be terminated")
        pad_id = tokenizer.pad_token_id
        self.pad_token_id = tokenizer.eos_token_id if pad_id is None else pad_id

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_conversation(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int], int]:
        """(input ids, labels, number of turns kept) for one conversation.

        Trailing turns that would exceed `max_length` are dropped (the caller drops their masks); a
        first turn that alone is too long is an InputError.
        """
        if not turns:
            raise InputError("a conversation needs at least one (question, answer) turn")
        input_ids: list[int] = []
        labels: list[int] = []
        previous_text = ""
        history: list[Turn] = []
        kept = 0
        for question, answer in turns:
            prompt_text = build_prompt(question, history, **self.template_tokens)
            full_ids = tokenize_with_image(
                self.tokenizer, prompt_text, self.config.num_image_tokens, self.config.image_token
            )
            if full_ids[: len(input_ids)] == input_ids:
                prompt_ids = full_ids[len(input_ids):]
            else:  # the tokenizer merged across the previous answer's end: tokenise the new part alone
                prompt_ids = self._text_ids(prompt_text[len(previous_text):])
            answer_ids = self._text_ids(answer.strip()) + [self.tokenizer.eos_token_id]
            if len(input_ids) + len(prompt_ids) + len(answer_ids) > self.max_length:
                if kept == 0:
                    raise InputError(
                        f"the first turn takes {len(prompt_ids) + len(answer_ids)} tokens, more than "
                        f"max_length {self.max_length}: raise max_length or shorten the question {question!r}"
                    )
                break
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            history.append(Turn(question, answer.strip()))
            previous_text = prompt_text + " " + answer.strip() + ANSWER_SEPARATOR
            kept += 1
        return input_ids, labels, kept

    def __call__(self, samples: Sequence[Sample]) -> LisaBatch:
        if not samples:
            raise InputError("cannot collate an empty list of samples")
        sequences, label_rows, conversation_image = [], [], []
        clip_pixels, sam_pixels, resized_sizes, original_sizes, gt_masks = [], [], [], [], []
        for image_index, sample in enumerate(samples):
            kept_masks = []
            for conversation, masks in zip(sample.conversations, sample.masks_per_conversation()):
                ids, labels, kept = self.encode_conversation(conversation)
                seg_count = sum(answer.count(self.config.seg_token) for _, answer in conversation[:kept])
                if ids.count(self.seg_token_id) != seg_count:
                    raise InputError(
                        f"{sample.source}: answers name {seg_count} {self.config.seg_token} but the tokenizer "
                        f"produced {ids.count(self.seg_token_id)} [SEG] ids"
                    )
                sequences.append(ids)
                label_rows.append(labels)
                conversation_image.append(image_index)
                kept_masks.extend(masks[:seg_count])
            clip_size = self.config.vision_tower.image_size
            clip_pixels.append(clip_preprocess(sample.image, size=clip_size, framing=self.config.clip_framing))
            pixels, resized = sam_preprocess(sample.image, size=self.config.sam.image_size)
            sam_pixels.append(pixels)
            resized_sizes.append(resized)
            original_sizes.append(tuple(sample.image.shape[:2]))
            height, width = sample.image.shape[:2]
            if kept_masks:
                gt_masks.append(torch.stack([torch.from_numpy(mask == 1) for mask in kept_masks]).float())
            else:
                gt_masks.append(torch.zeros(0, height, width))

        length = max(len(ids) for ids in sequences)
        appearance = torch.stack([self.appearance_labels(sample) for sample in samples]) if self.appearance_maps else None
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, (ids, label_row) in enumerate(zip(sequences, label_rows)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(label_row)
            attention_mask[row, : len(ids)] = 1
        return LisaBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            conversation_image=torch.tensor(conversation_image, dtype=torch.long),
            clip_pixels=torch.stack(clip_pixels),
            sam_pixels=torch.stack(sam_pixels),
            resized_sizes=resized_sizes,
            original_sizes=original_sizes,
            gt_masks=gt_masks,
            appearance=appearance,
        )

    def appearance_labels(self, sample: Sample) -> torch.Tensor:
        """(K, sam_size, sam_size) long: the sample's class maps resized (nearest) as sam_preprocess
        resizes the image, IGNORE_INDEX on the padding, on IGNORE_LABEL pixels and for a sample without
        maps."""
        size = self.config.sam.image_size
        maps = sample.meta.get(APPEARANCE_KEY)
        if maps is None:
            return torch.full((self.appearance_maps, size, size), IGNORE_INDEX, dtype=torch.long)
        if maps.shape != (self.appearance_maps, *sample.image.shape[:2]):
            raise InputError(
                f"{sample.source}: {APPEARANCE_KEY} maps are {maps.shape}, expected "
                f"({self.appearance_maps}, {sample.image.shape[0]}, {sample.image.shape[1]})"
            )
        new_h, new_w = sam_resized_shape(maps.shape[1], maps.shape[2], size)
        resized = np.stack([np.array(Image.fromarray(m).resize((new_w, new_h), resample=Image.NEAREST)) for m in maps])
        labels = torch.from_numpy(resized).long()
        labels[labels == IGNORE_LABEL] = IGNORE_INDEX
        return F.pad(labels, (0, size - new_w, 0, size - new_h), value=IGNORE_INDEX)
