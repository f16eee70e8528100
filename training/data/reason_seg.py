"""ReasonSeg in its official layout.

    <root>/train/*.jpg, <root>/train/*.json  (also val/, test/)
    <root>/explanatory/train.json            (optional)

Each image's JSON (LabelMe style): {"text": [queries...], "is_sentence": bool,
"shapes": [{"label": "target" | "ignore" | "flag", "points": [[x, y], ...], ...}, ...]}.
Ground truth, as the official get_mask_from_json builds it: "flag" shapes are skipped; the others are
drawn largest first (so smaller shapes end on top), each as its outline (1 px) and filled polygon with
points truncated to int32; a label containing "ignore" (any case) draws 255, any other label draws 1.
Every query of an image shares that one mask.

explanatory/train.json: [{"image": "<file name>.jpg", "query": "...", "outputs": "<explanation>"}, ...].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from lisa_core.errors import InputError
from training.data import templates
from training.data.images import read_rgb
from training.data.sample import IGNORE_LABEL, Sample


def read_annotation_json(json_path: str | Path) -> dict:
    """The JSON document; some official files are cp1252 rather than UTF-8."""
    raw = Path(json_path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{json_path} is not valid JSON: {error}") from error


def _polygon(points) -> np.ndarray:
    return np.array([points], dtype=np.int32)


def reason_seg_mask(shapes: Sequence[dict], height: int, width: int) -> np.ndarray:
    """uint8 (height, width) mask: 1 target, 255 ignore, 0 background (rules in the module doc)."""
    drawn = []
    for shape in shapes:
        if shape["label"].lower() == "flag":
            continue
        scratch = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(scratch, _polygon(shape["points"]), True, 1, 1)
        cv2.fillPoly(scratch, _polygon(shape["points"]), 1)
        drawn.append((int(scratch.sum()), shape))
    # Largest first; a stable sort of the reversed list keeps the official tie order.
    order = np.argsort([area for area, _ in drawn], kind="stable")[::-1]
    mask = np.zeros((height, width), dtype=np.uint8)
    for position in order:
        shape = drawn[position][1]
        value = IGNORE_LABEL if "ignore" in shape["label"].lower() else 1
        cv2.polylines(mask, _polygon(shape["points"]), True, value, 1)
        cv2.fillPoly(mask, _polygon(shape["points"]), value)
    return mask


def load_annotation(json_path: str | Path, height: int, width: int) -> tuple[np.ndarray, list[str], bool]:
    """(mask, queries, is_sentence) of one ReasonSeg image."""
    document = read_annotation_json(json_path)
    for key in ("shapes", "text", "is_sentence"):
        if key not in document:
            raise InputError(f"{json_path} lacks the key {key!r}")
    queries = document["text"]
    if isinstance(queries, str):
        queries = [queries]
    return reason_seg_mask(document["shapes"], height, width), list(queries), bool(document["is_sentence"])


def load_explanations(json_path: str | Path) -> dict[str, dict]:
    """{image file name: {"query": ..., "outputs": ...}} from explanatory/train.json."""
    items = read_annotation_json(json_path)
    return {item["image"]: {"query": item["query"], "outputs": item["outputs"]} for item in items}


class ReasonSegDataset:
    """ReasonSeg images of the given splits, as training samples (`get`) or evaluation samples (`eval_sample`)."""

    name = "reason_seg"

    def __init__(
        self,
        root: str | Path,
        splits: Sequence[str] = ("train",),
        explanatory_rate: Optional[float] = templates.EXPLANATORY_RATE,
        queries_per_image: int = templates.QUERIES_PER_IMAGE,
    ):
        self.root = Path(root)
        self.image_paths: list[Path] = []
        for split in splits:
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise InputError(f"ReasonSeg split folder not found: {split_dir}")
            self.image_paths.extend(sorted(split_dir.glob("*.jpg")))
        if not self.image_paths:
            raise InputError(f"no .jpg images in {self.root} for splits {list(splits)}")
        self.explanatory_rate = explanatory_rate
        self.queries_per_image = queries_per_image
        explanatory_json = self.root / "explanatory" / "train.json"
        use_explanations = explanatory_rate is not None and explanatory_json.is_file()
        self.explanations = load_explanations(explanatory_json) if use_explanations else {}

    def __len__(self) -> int:
        return len(self.image_paths)

    def _load(self, index: int) -> tuple[Path, np.ndarray, np.ndarray, list[str], bool]:
        image_path = self.image_paths[index]
        image = read_rgb(image_path)
        mask, queries, is_sentence = load_annotation(image_path.with_suffix(".json"), *image.shape[:2])
        if not queries:
            raise InputError(f"{image_path.with_suffix('.json')} has no queries in 'text'")
        return image_path, image, mask, queries, is_sentence

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        image_path, image, mask, queries, is_sentence = self._load(index)
        chosen = [queries[i] for i in templates.sample_query_indices(len(queries), rng, self.queries_per_image)]
        explanation = self.explanations.get(image_path.name)
        mode = templates.PLAIN
        if explanation is not None:
            mode = templates.draw_explanatory_mode(rng, self.explanatory_rate)
        conversations, masks = [], []
        for query in chosen:
            turn, has_seg = templates.segmentation_turn(
                query, is_sentence, rng, mode, explanation["outputs"] if explanation else ""
            )
            conversations.append([turn])
            if has_seg:
                masks.append(mask.copy())
        meta = {"image_path": str(image_path), "is_sentence": is_sentence, "explanatory_mode": mode}
        return Sample(image, conversations, masks, self.name, meta)

    def eval_sample(self, index: int) -> Sample:
        """The official validation sample: the image's first query, a fixed question, answer "[SEG]."."""
        image_path, image, mask, queries, is_sentence = self._load(index)
        turn = (templates.eval_question(queries[0], is_sentence), templates.EVAL_ANSWER)
        meta = {"image_path": str(image_path), "is_sentence": is_sentence, "query": queries[0]}
        return Sample(image, [[turn]], [mask], self.name, meta)
