"""LLaVA-Instruct visual question answering (llava_instruct_150k.json) in its official JSON.

    [{"id": "...", "image": "<file name>", "conversations": [
        {"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}, ...]

Images live in `image_root` (COCO train2017 for LLaVA-Instruct). A conversation starting with a "gpt"
turn loses that turn, as in the official reader; the rest must alternate human/gpt. The "<image>"
placeholder is removed from the text (Sample questions carry none). No masks: answers have no [SEG].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lisa_core.errors import InputError
from training.data.images import read_rgb
from training.data.sample import Sample

IMAGE_PLACEHOLDER = "<image>"


def conversation_turns(messages: list[dict], item_id: object) -> list[tuple[str, str]]:
    """(question, answer) pairs from LLaVA messages."""
    if messages and messages[0].get("from") != "human":
        messages = messages[1:]
    if not messages or len(messages) % 2:
        raise InputError(f"VQA item {item_id}: needs human/gpt pairs, got {len(messages)} messages")
    turns = []
    for position in range(0, len(messages), 2):
        question, answer = messages[position], messages[position + 1]
        if question.get("from") != "human" or answer.get("from") != "gpt":
            raise InputError(
                f"VQA item {item_id}: turn {position // 2} is {question.get('from')}/{answer.get('from')}, "
                "expected human/gpt"
            )
        turns.append((question["value"].replace(IMAGE_PLACEHOLDER, "").strip(), answer["value"].strip()))
    return turns


class LlavaInstructDataset:
    """One sample per JSON item: the whole multi-turn conversation about its image."""

    def __init__(self, json_path: str | Path, image_root: str | Path, name: str = "llava_instruct"):
        json_path = Path(json_path)
        if not json_path.is_file():
            raise InputError(f"VQA JSON not found: {json_path}")
        with open(json_path, encoding="utf-8") as handle:
            self.items = json.load(handle)
        if not isinstance(self.items, list) or not self.items:
            raise InputError(f"{json_path} must hold a non-empty JSON list of items")
        self.image_root = Path(image_root)
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        item = self.items[index]
        turns = conversation_turns(item["conversations"], item.get("id", index))
        image_path = self.image_root / item["image"]
        meta = {"image_path": str(image_path), "id": item.get("id")}
        return Sample(read_rgb(image_path), [turns], [], self.name, meta)
