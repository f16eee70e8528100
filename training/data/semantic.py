"""Semantic segmentation datasets given as label maps (ADE20K style).

    <root>/images/<split>/<id>.jpg
    <root>/annotations/<split>/<id>.png   one class index per pixel, 255 = ignore

The class list is a JSON list of names or a text file with one name per line ("<index>: <name>" lines
are accepted too); label value k names class k after reduction. ADE20K's reduction, as in the official
reader: 0 ("other") becomes 255, every other value k becomes k - 1. Each sample asks about up to 3
classes present in the image (255 excluded), one short question and one binary mask (label == class) each.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from lisa_core.errors import InputError
from training.data import templates
from training.data.images import read_rgb
from training.data.sample import IGNORE_LABEL, Sample


def load_class_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"class list not found: {path}")
    if path.suffix == ".json":
        names = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise InputError(f"{path} must hold a JSON list of class names")
        return names
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            numbered = re.match(r"^\d+\s*:\s*(.+)$", line)
            names.append(numbered.group(1) if numbered else line)
    return names


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    reduced = label.astype(np.int32) - 1
    reduced[(label == 0) | (label == IGNORE_LABEL)] = IGNORE_LABEL
    return reduced.astype(np.uint8)


def read_label_map(path: str | Path) -> np.ndarray:
    label = np.array(Image.open(path))
    if label.ndim != 2 or label.dtype != np.uint8:
        raise InputError(f"{path}: a label map must be a single-channel 8-bit PNG, got {label.dtype} {label.shape}")
    return label


class SemanticSegDataset:
    """Image and label-map pairs with a class list."""

    def __init__(
        self,
        image_paths: Sequence[str | Path],
        label_paths: Sequence[str | Path],
        class_names: Sequence[str],
        name: str = "semantic",
        reduce_zero: bool = False,
        ignore_class_ids: Iterable[int] = (),
        queries_per_image: int = templates.QUERIES_PER_IMAGE,
    ):
        if len(image_paths) != len(label_paths):
            raise InputError(f"{name}: {len(image_paths)} images but {len(label_paths)} label maps")
        if not image_paths:
            raise InputError(f"{name}: no images")
        self.image_paths = [Path(p) for p in image_paths]
        self.label_paths = [Path(p) for p in label_paths]
        self.class_names = list(class_names)
        self.name = name
        self.reduce_zero = reduce_zero
        self.ignore_class_ids = frozenset(int(i) for i in ignore_class_ids)
        self.queries_per_image = queries_per_image

    @classmethod
    def ade20k(cls, root: str | Path, class_names_path: str | Path, split: str = "training", **kwargs):
        root = Path(root)
        image_paths = sorted((root / "images" / split).glob("*.jpg"))
        if not image_paths:
            raise InputError(f"no .jpg images in {root / 'images' / split}")
        label_paths = [root / "annotations" / split / f"{p.stem}.png" for p in image_paths]
        missing = [str(p) for p in label_paths if not p.is_file()]
        if missing:
            raise InputError(f"label maps missing for {len(missing)} images, first: {missing[0]}")
        kwargs.setdefault("name", "ade20k")
        return cls(image_paths, label_paths, load_class_names(class_names_path), reduce_zero=True, **kwargs)

    def __len__(self) -> int:
        return len(self.image_paths)

    def label(self, index: int) -> np.ndarray:
        """The label map after reduction, with ignored classes set to 255."""
        label = read_label_map(self.label_paths[index])
        if self.reduce_zero:
            label = reduce_zero_label(label)
        for class_id in self.ignore_class_ids:
            label[label == class_id] = IGNORE_LABEL
        return label

    def _present_classes(self, label: np.ndarray, path: Path) -> list[int]:
        present = [int(v) for v in np.unique(label) if v != IGNORE_LABEL]
        unknown = [v for v in present if v >= len(self.class_names)]
        if unknown:
            raise InputError(f"{path}: label values {unknown} exceed the {len(self.class_names)} class names")
        return present

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        # An image with no labelled class gives no query: take the next one that has some.
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            label = self.label(position)
            present = self._present_classes(label, self.label_paths[position])
            if present:
                break
        else:
            raise InputError(f"{self.name}: no label map holds a class other than {IGNORE_LABEL}")
        chosen = [present[i] for i in templates.sample_query_indices(len(present), rng, self.queries_per_image)]
        conversations = [
            [(templates.segmentation_question(self.class_names[c], False, rng), templates.segmentation_answer(rng))]
            for c in chosen
        ]
        masks = [(label == c).astype(np.uint8) for c in chosen]
        image = read_rgb(self.image_paths[position])
        if image.shape[:2] != label.shape:
            raise InputError(f"{self.image_paths[position]}: image {image.shape[:2]} and label map {label.shape} differ")
        meta = {"image_path": str(self.image_paths[position]), "classes": [self.class_names[c] for c in chosen]}
        return Sample(image, conversations, masks, self.name, meta)
