"""Measure a LISA model with ReasonSeg's gIoU and cIoU (lisa_core.metrics), in two modes.

    python -m training.evaluate --model models/demo --data synthetic --splits val test --out results.json
    python -m training.evaluate --model PATH --data reason_seg --root .../ReasonSeg --splits val test

Modes (`--mode`, default both):
- `generation`: what users get. `LisaPipeline.segment(image, question)` generates the answer greedily;
  the prediction is the union of the masks of every [SEG] it wrote (empty if none).
- `forced`: the official validation protocol. The answer "[SEG]." is fed with the question and one
  forward pass runs (no generation); the mask of that [SEG] is the prediction. Absent-target queries
  therefore always get a mask in this mode.

Each query is one evaluation sample of the reader (`eval_sample(index)`: the official fixed question;
for ReasonSeg the image's first query). Its ground truth is the union of its masks, 255 = ignored, and
an empty prediction on an empty ground truth counts IoU 1 (lisa_core.metrics).

Reports, per split and mode: gIoU, cIoU, number of queries, and groups: ReasonSeg "short" and "long"
(plus the whole split, the paper's "overall"); the synthetic benchmark per query kind (attribute, size,
relation, function, multiple, absent). Generation mode also reports how often the number of [SEG]s
written equals the number of ground-truth masks (`seg_count_accuracy`) and, over absent-target
queries, how often no mask was given (`absent_accuracy`); with an answer check (synthetic:
`is_well_formed`) the share of well-formed answers (`well_formed`); and over every generated target,
Spearman's rank correlation of its confidence with its IoU against the ground-truth mask it overlaps
most (`confidence_iou_spearman`) and the confidences' range. `--out` writes the report as JSON.
`--min-confidence` scores generation mode as the node's min_confidence answers: targets below it are
left out (well-formedness still counts every [SEG] written). Synthetic scenes can be asked on other
frames (`--aspect-ratio 16:9`) and in other words (`--phrasing trained|held_out`,
training.data.phrasing).

One process; `--limit` evaluates the first N queries of each split.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from lisa_core.errors import ConfigurationError
from lisa_core.metrics import SegmentationMeter, intersection_and_union, iou_from_counts, spearman_correlation
from lisa_core.pipeline import DTYPES, LisaPipeline
from training.collate import LisaCollator
from training.data import ReasonSegDataset, Sample, SyntheticReasonSeg
from training.data.phrasing import OFFICIAL, PHRASINGS
from training.data.synthetic import ASPECT_RATIOS, is_well_formed
from training.data.templates import EVAL_ANSWER
from training.model import LisaForTraining

MODES = ("generation", "forced")


class GroupedMeter:
    """A meter for the whole split plus one per group."""

    def __init__(self) -> None:
        self.overall = SegmentationMeter()
        self.groups: dict[str, SegmentationMeter] = {}

    def update(self, prediction: np.ndarray, ground_truth: np.ndarray, groups: Iterable[str]) -> float:
        iou = self.overall.update(prediction, ground_truth)
        for group in groups:
            self.groups.setdefault(group, SegmentationMeter()).update(prediction, ground_truth)
        return iou

    def summary(self) -> dict:
        report = self.overall.summary()
        report["groups"] = {name: meter.summary() for name, meter in sorted(self.groups.items())}
        return report


def sample_groups(sample: Sample) -> list[str]:
    """ReasonSeg: "short" / "long"; synthetic: the query kind."""
    if "kind" in sample.meta:
        return [sample.meta["kind"]]
    if "is_sentence" in sample.meta:
        return ["long" if sample.meta["is_sentence"] else "short"]
    return []


def target_iou(mask: np.ndarray, ground_truths: Sequence[np.ndarray]) -> float:
    """IoU of one predicted target with the ground-truth mask it overlaps most (0 when there is none)."""
    return max((iou_from_counts(*intersection_and_union(mask, truth)) for truth in ground_truths), default=0.0)


def evaluate_generation(
    pipeline: LisaPipeline,
    samples: Sequence[Sample],
    max_new_tokens: Optional[int] = None,
    answer_check: Optional[Callable[[str, int], bool]] = None,
    min_confidence: float = 0.0,
) -> dict:
    """Scores the masks left after dropping targets below `min_confidence` (the node's parameter);
    `well_formed` judges the answer with every [SEG] the model wrote."""
    meter = GroupedMeter()
    count_correct, absent_total, absent_correct, well_formed = 0, 0, 0, 0
    confidences, ious = [], []
    for sample in samples:
        question = sample.conversations[0][0][0]
        result = pipeline.segment(sample.image, question, max_new_tokens=max_new_tokens)
        if answer_check is not None:
            well_formed += int(answer_check(result.answer, len(result.targets)))
        result.drop_unconfident(min_confidence)
        ground_truth = sample.query_ground_truth(0)
        union = result.union_mask
        meter.update(union, ground_truth, sample_groups(sample))
        count_correct += int(len(result.targets) == len(sample.masks))
        if not sample.masks:
            absent_total += 1
            absent_correct += int(not union.any())
        for target in result.targets:
            confidences.append(target.confidence)
            ious.append(target_iou(target.mask, sample.masks))
    report = meter.summary()
    report["seg_count_accuracy"] = count_correct / len(samples)
    report["absent_accuracy"] = absent_correct / absent_total if absent_total else None
    report["well_formed"] = well_formed / len(samples) if answer_check is not None else None
    report["targets"] = len(confidences)
    report["confidence_iou_spearman"] = spearman_correlation(confidences, ious)
    report["confidence_range"] = [min(confidences), max(confidences)] if confidences else None
    return report


def forced_sample(sample: Sample) -> Sample:
    """The sample with its answer replaced by "[SEG]." (one mask slot, unused for prediction)."""
    question = sample.conversations[0][0][0]
    placeholder = np.zeros(sample.image.shape[:2], dtype=np.uint8)
    return replace(sample, conversations=[[(question, EVAL_ANSWER)]], masks=[placeholder])


@torch.no_grad()
def evaluate_forced(model, tokenizer, samples: Sequence[Sample], batch_size: int = 8) -> dict:
    module = LisaForTraining(model, tokenizer).eval()
    collator = LisaCollator(tokenizer, model.config, model.config.language_model.max_position_embeddings)
    device = model.mm_projector.weight.device
    meter = GroupedMeter()
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collator([forced_sample(sample) for sample in chunk]).to(device)
        for sample, logits in zip(chunk, module.predict_masks(batch)):
            prediction = (logits[0] > 0).cpu().numpy()
            meter.update(prediction, sample.query_ground_truth(0), sample_groups(sample))
    return meter.summary()


def load_split(
    data: str, split: str, *, root: Optional[str], size: Optional[int], seed: int, image_size: int,
    aspect_ratio: str = "1:1", phrasing: str = OFFICIAL,
):
    if data == "synthetic":
        return SyntheticReasonSeg(split=split, seed=seed, size=size, image_size=image_size,
                                  aspect_ratios=(aspect_ratio,), eval_phrasing=phrasing)
    if data == "reason_seg":
        if root is None:
            raise ConfigurationError("--root (the ReasonSeg folder holding train/ val/ test/) is needed for reason_seg")
        return ReasonSegDataset(root, splits=(split,))
    raise ConfigurationError(f"--data must be synthetic or reason_seg, got {data!r}")


def evaluate(
    pipeline: LisaPipeline,
    splits: dict[str, Sequence[Sample]],
    modes: Sequence[str] = MODES,
    *,
    batch_size: int = 8,
    max_new_tokens: Optional[int] = None,
    answer_check: Optional[Callable[[str, int], bool]] = None,
    min_confidence: float = 0.0,
) -> dict:
    """{split: {mode: report}} for evaluation samples already built. `answer_check(answer, masks)` says
    whether an answer is well formed (synthetic.is_well_formed); generation mode leaves out targets
    below `min_confidence`."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ConfigurationError(f"unknown evaluation modes {sorted(unknown)}; use {MODES}")
    report: dict = {}
    for split, samples in splits.items():
        if not samples:
            raise ConfigurationError(f"split {split!r} has no samples to evaluate")
        report[split] = {}
        for mode in modes:
            started = time.time()
            if mode == "generation":
                result = evaluate_generation(pipeline, samples, max_new_tokens, answer_check, min_confidence)
            else:
                result = evaluate_forced(pipeline.model, pipeline.tokenizer, samples, batch_size)
            result["seconds"] = time.time() - started
            report[split][mode] = result
    return report


def format_table(report: dict) -> str:
    lines = [f"{'split':<20} {'mode':<11} {'group':<10} {'gIoU':>7} {'cIoU':>7} {'queries':>8}"]
    for split, modes in report.items():
        for mode, result in modes.items():
            rows = [("all", result)] + list(result["groups"].items())
            for group, values in rows:
                lines.append(
                    f"{split:<20} {mode:<11} {group:<10} {values['gIoU']:>7.4f} {values['cIoU']:>7.4f} "
                    f"{values['queries']:>8d}"
                )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="gIoU / cIoU of a LISA model on ReasonSeg or the synthetic benchmark.")
    parser.add_argument("--model", required=True, help="a folder lisa_core loads")
    parser.add_argument("--vision-tower", default=None, help="CLIP folder for official checkpoints")
    parser.add_argument("--data", choices=("synthetic", "reason_seg"), default="synthetic")
    parser.add_argument("--root", default=None, help="ReasonSeg folder (train/ val/ test/)")
    parser.add_argument("--splits", nargs="+", default=["test"])
    parser.add_argument("--mode", choices=("generation", "forced", "both"), default="both")
    parser.add_argument("--size", type=int, default=None, help="synthetic: scenes per split (default: the split's size)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: benchmark seed")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic: the scenes' short side in pixels")
    parser.add_argument("--aspect-ratio", choices=tuple(ASPECT_RATIOS), default="1:1", help="synthetic: width:height")
    parser.add_argument("--phrasing", choices=PHRASINGS, default=OFFICIAL,
                        help="synthetic: the official evaluation question, or a trained or held-out phrasing")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries per split")
    parser.add_argument("--batch-size", type=int, default=8, help="forced mode: samples per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="generation mode: leave out targets below this confidence, as the node's min_confidence")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if not 0.0 <= args.min_confidence <= 1.0:
        parser.error(f"--min-confidence must lie in [0, 1] (confidences do), got {args.min_confidence}")
    if args.threads:
        torch.set_num_threads(args.threads)

    pipeline = LisaPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, vision_tower=args.vision_tower)
    splits = {}
    for split in args.splits:
        dataset = load_split(args.data, split, root=args.root, size=args.size, seed=args.seed, image_size=args.image_size,
                             aspect_ratio=args.aspect_ratio, phrasing=args.phrasing)
        count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
        splits[split] = [dataset.eval_sample(index) for index in range(count)]
    modes = MODES if args.mode == "both" else (args.mode,)
    report = {
        "model": str(args.model),
        "data": args.data,
        "settings": {"seed": args.seed, "size": args.size, "image_size": args.image_size, "limit": args.limit,
                     "aspect_ratio": args.aspect_ratio, "phrasing": args.phrasing,
                     "min_confidence": args.min_confidence, "device": args.device, "dtype": args.dtype},
        "splits": evaluate(pipeline, splits, modes, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           answer_check=is_well_formed if args.data == "synthetic" else None,
                           min_confidence=args.min_confidence),
    }
    print(format_table(report["splits"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
