"""Training data for LISA: official dataset readers, the synthetic benchmark, templates and mixing.

Data API
--------
Every reader returns `Sample` (training.data.sample):
    Sample.image           RGB uint8 (H, W, 3)
    Sample.conversations   list of conversations about the image, each a list of (question, answer);
                           segmentation readers give up to 3 single-turn conversations, VQA one
                           multi-turn conversation. Questions carry no "<image>" placeholder: the
                           prompt builder puts the image before the first question of each conversation.
    Sample.masks           one uint8 (H, W) mask per "[SEG]" in the answers, in reading order
                           (conversation, turn, left to right); 1 target, 0 background, 255 ignored by
                           the metrics (ReasonSeg only; losses should use mask == 1, as officially)
    Sample.source          reader name ("reason_seg", "refcoco", "ade20k", "llava_instruct", "synthetic")
    Sample.meta            reader facts, e.g. is_sentence (ReasonSeg short/long split), query, kind
    Sample.masks_per_conversation(), Sample.query_ground_truth(i)  (union map for the metrics)

Readers (all: `len(reader)`, `reader.get(index, rng)` with a numpy Generator; the evaluation readers
also `reader.eval_sample(index)`, the official validation question with answer "[SEG]."):
    ReasonSegDataset(root, splits=("train",), explanatory_rate=0.1)      training.data.reason_seg
    ReferDataset(root, dataset="refcoco", split="train", split_by=None)  training.data.refer
    SemanticSegDataset.ade20k(root, class_names_path, split="training")  training.data.semantic
    LlavaInstructDataset(json_path, image_root)                           training.data.vqa
    SyntheticReasonSeg(split="train", seed=0, size=None, image_size=128)  training.data.synthetic
        synthetic.corpus() -> sentences covering its whole vocabulary (for a word-level tokenizer)

Mixing: MixtureDataset(sources, ratios, length, seed) is a map-style torch Dataset of Samples;
DEFAULT_RATIOS is the official 9:3:3:1 (semantic:refer:vqa:reason_seg), synthetic 1.

Config entries (TrainConfig.datasets), one dict per source, built by `build_mixture(entries, length, seed)`:
    {"type": "reason_seg", "root": ".../reason_seg/ReasonSeg", "splits": ["train"], "explanatory_rate": 0.1}
    {"type": "refer", "root": ".../refer_seg", "dataset": "refcoco", "split": "train"}
    {"type": "semantic", "root": ".../ade20k", "class_names": ".../ade20k_classes.json", "split": "training"}
    {"type": "vqa", "json": ".../llava_instruct_150k.json", "image_root": ".../coco/train2017"}
    {"type": "synthetic", "split": "train", "seed": 0, "size": 4000, "image_size": 128}
Optional keys in every entry: "name" (the source's key, default the reader's name) and "ratio"
(default: the group's DEFAULT_RATIOS share, split equally among the group's sources).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from lisa_core.errors import ConfigurationError
from training.data.mixing import DEFAULT_RATIOS, MixtureDataset, mixture_ratios
from training.data.reason_seg import ReasonSegDataset
from training.data.refer import ReferDataset
from training.data.sample import IGNORE_LABEL, SEG_TOKEN, Sample, SampleSource
from training.data.semantic import SemanticSegDataset
from training.data.synthetic import SyntheticReasonSeg, corpus
from training.data.vqa import LlavaInstructDataset

ENTRY_TYPES = ("reason_seg", "refer", "semantic", "vqa", "synthetic")


def build_source(entry: Mapping[str, Any]) -> SampleSource:
    """One reader from a config entry (format in the module doc)."""
    options = {k: v for k, v in entry.items() if k not in ("type", "name", "ratio")}
    kind = entry.get("type")
    try:
        if kind == "reason_seg":
            return ReasonSegDataset(options.pop("root"), **options)
        if kind == "refer":
            return ReferDataset(options.pop("root"), **options)
        if kind == "semantic":
            return SemanticSegDataset.ade20k(options.pop("root"), options.pop("class_names"), **options)
        if kind == "vqa":
            return LlavaInstructDataset(options.pop("json"), options.pop("image_root"), **options)
        if kind == "synthetic":
            return SyntheticReasonSeg(**options)
    except (KeyError, TypeError) as error:
        raise ConfigurationError(f"dataset entry {dict(entry)} is missing or misnames an option: {error}") from error
    raise ConfigurationError(f"dataset entry type must be one of {ENTRY_TYPES}, got {kind!r}")


def build_sources(entries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, SampleSource], dict[str, float]]:
    """Readers keyed by name, and their mixing ratios."""
    sources: dict[str, SampleSource] = {}
    groups: dict[str, str] = {}
    overrides: dict[str, float] = {}
    for entry in entries:
        source = build_source(entry)
        name = entry.get("name", source.name)
        if name in sources:
            raise ConfigurationError(f"two dataset entries are named {name!r}; give one a distinct 'name'")
        sources[name] = source
        groups[name] = entry["type"]
        if "ratio" in entry:
            overrides[name] = float(entry["ratio"])
    return sources, mixture_ratios(groups, overrides)


def build_mixture(entries: Sequence[Mapping[str, Any]], length: int, seed: int = 0) -> MixtureDataset:
    sources, ratios = build_sources(entries)
    return MixtureDataset(sources, ratios, length, seed)


__all__ = [
    "DEFAULT_RATIOS",
    "IGNORE_LABEL",
    "SEG_TOKEN",
    "LlavaInstructDataset",
    "MixtureDataset",
    "ReasonSegDataset",
    "ReferDataset",
    "Sample",
    "SampleSource",
    "SemanticSegDataset",
    "SyntheticReasonSeg",
    "build_mixture",
    "build_source",
    "build_sources",
    "corpus",
    "mixture_ratios",
]
