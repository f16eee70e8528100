"""The refCOCO family (refclef, refcoco, refcoco+, refcocog) in the `refer` layout.

    <root>/<dataset>/refs(<split_by>).p   pickled list of refs: {"ref_id", "ann_id", "image_id",
                                          "category_id", "split", "sentences": [{"sent", "sent_id", ...}]}
    <root>/<dataset>/instances.json       COCO-style {"images", "annotations", "categories"}
    <root>/images/mscoco/images/train2014/<file_name>   (refcoco, refcoco+, refcocog)
    <root>/images/saiapr_tc-12/<file_name>              (refclef)

split_by is "umd" for refcocog and "unc" for the others in LISA's recipe. The pickle is read with an
unpickler that builds only plain builtin values, so a tampered file cannot run code. Masks are decoded
with pycocotools (polygons or RLE, several parts summed into one binary mask), as the official readers do.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
from pycocotools import mask as coco_mask

from lisa_core.errors import InputError
from training.data import templates
from training.data.images import read_rgb
from training.data.sample import Sample

DEFAULT_SPLIT_BY = {"refcocog": "umd"}  # every other dataset: "unc"
IMAGE_FOLDERS = {"refclef": "images/saiapr_tc-12"}  # every other dataset: the COCO train2014 folder
COCO_TRAIN2014 = "images/mscoco/images/train2014"

_SAFE_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool"}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class("builtins", name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a refs file holds only plain data")


def load_refs(path: str | Path) -> list[dict]:
    """The refs list of a refs(<split_by>).p file, loaded without running any code from it."""
    data = Path(path).read_bytes()
    try:
        refs = _PlainDataUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise InputError(f"{path}: not a refs pickle of plain data ({error})") from error
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise InputError(f"{path}: expected a list of dicts, got {type(refs).__name__}")
    return refs


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """Binary uint8 (height, width) mask of one COCO annotation (polygons or RLE; empty -> zeros)."""
    segmentation = annotation["segmentation"]
    if len(segmentation) == 0:
        return np.zeros((height, width), dtype=np.uint8)
    if isinstance(segmentation, list) and isinstance(segmentation[0], list):
        rles = coco_mask.frPyObjects(segmentation, height, width)
    else:
        parts = segmentation if isinstance(segmentation, list) else [segmentation]
        rles = []
        for part in parts:
            counts = part["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                rles.extend(coco_mask.frPyObjects([part], height, width))
            else:
                rles.append({"size": part["size"], "counts": counts.encode() if isinstance(counts, str) else counts})
    decoded = coco_mask.decode(rles)
    if decoded.ndim == 3:
        # Parts may overlap; the official sum could reach 2 there, a mask must stay binary.
        decoded = decoded.max(axis=2)
    return decoded.astype(np.uint8)


class ReferDataset:
    """Referring expressions of one refer dataset and split; one sample per image."""

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split: str = "train",
        split_by: Optional[str] = None,
        image_dir: Optional[str | Path] = None,
        queries_per_image: int = templates.QUERIES_PER_IMAGE,
    ):
        self.root = Path(root)
        self.name = dataset
        split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
        data_dir = self.root / dataset
        refs_path = data_dir / f"refs({split_by}).p"
        instances_path = data_dir / "instances.json"
        for path in (refs_path, instances_path):
            if not path.is_file():
                raise InputError(f"refer file not found: {path}")
        refs = [ref for ref in load_refs(refs_path) if ref_in_split(ref, split)]
        with open(instances_path, "rb") as handle:
            instances = json.load(handle)
        self.annotations = {ann["id"]: ann for ann in instances["annotations"]}
        images = {image["id"]: image for image in instances["images"]}
        self.image_dir = Path(image_dir) if image_dir else self.root / IMAGE_FOLDERS.get(dataset, COCO_TRAIN2014)
        self.refs_by_image: dict[int, list[dict]] = {}
        for ref in refs:
            self.refs_by_image.setdefault(ref["image_id"], []).append(ref)
        self.images = [images[image_id] for image_id in sorted(self.refs_by_image)]
        if not self.images:
            raise InputError(f"{refs_path} has no refs in split {split!r}")
        self.queries_per_image = queries_per_image

    def __len__(self) -> int:
        return len(self.images)

    def _sentences(self, index: int) -> tuple[dict, list[tuple[str, object]]]:
        info = self.images[index]
        pairs = []
        for ref in self.refs_by_image[info["id"]]:
            for sentence in ref["sentences"]:
                pairs.append((sentence["sent"].strip(), ref["ann_id"]))
        return info, pairs

    def _mask(self, ann_id, info: dict) -> np.ndarray:
        height, width = info["height"], info["width"]
        # gRefCOCO-style refs name a list of annotations ([-1] = no target); refer refs name one.
        ann_ids = ann_id if isinstance(ann_id, list) else [ann_id]
        mask = np.zeros((height, width), dtype=np.uint8)
        for one_id in ann_ids:
            if one_id == -1:
                continue
            if one_id not in self.annotations:
                raise InputError(f"{self.name}: ref names annotation {one_id}, absent from instances.json")
            mask |= annotation_mask(self.annotations[one_id], height, width)
        return mask

    def _image(self, info: dict) -> np.ndarray:
        image = read_rgb(self.image_dir / info["file_name"])
        if image.shape[:2] != (info["height"], info["width"]):
            raise InputError(
                f"{info['file_name']}: image is {image.shape[:2]}, instances.json says "
                f"{(info['height'], info['width'])}"
            )
        return image

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        info, pairs = self._sentences(index)
        chosen = [pairs[i] for i in templates.sample_query_indices(len(pairs), rng, self.queries_per_image)]
        conversations = [
            [(templates.segmentation_question(sentence, False, rng), templates.segmentation_answer(rng))]
            for sentence, _ in chosen
        ]
        masks = [self._mask(ann_id, info) for _, ann_id in chosen]
        meta = {"image_path": str(self.image_dir / info["file_name"]), "queries": [s for s, _ in chosen]}
        return Sample(self._image(info), conversations, masks, self.name, meta)

    def eval_sample(self, index: int) -> Sample:
        """Every sentence of the image with the fixed validation question and answer "[SEG].", as officially."""
        info, pairs = self._sentences(index)
        conversations = [[(templates.eval_question(s.lower(), False), templates.EVAL_ANSWER)] for s, _ in pairs]
        masks = [self._mask(ann_id, info) for _, ann_id in pairs]
        meta = {"image_path": str(self.image_dir / info["file_name"]), "queries": [s.lower() for s, _ in pairs]}
        return Sample(self._image(info), conversations, masks, self.name, meta)


def ref_in_split(ref: dict, split: str) -> bool:
    """The refer toolkit's split rule: "testA" matches any split containing "A" (testAB too), "test" any test split."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref["split"]
    if split == "test":
        return "test" in ref["split"]
    return ref["split"] == split
