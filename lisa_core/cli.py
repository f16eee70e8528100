"""`lisa-segment --model DIR IMAGE "query"`: one query on one image file, results written as files.

Writes, into --output (default: the current folder), for an image `photo.jpg`:
  photo_mask.png      union of all targets, 255 on target pixels
  photo_overlay.png   the image with each target tinted and outlined, the answer as a caption
  photo_result.json   query, answer, generated ids, per-target confidence / IoU prediction / centroid / box /
                      area, timings
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lisa_core.errors import LisaError


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lisa-segment", description="LISA reasoning segmentation on one image.")
    parser.add_argument("image", type=Path, help="image file (any format OpenCV reads)")
    parser.add_argument("query", help='instruction or question, e.g. "What can I use to cut this paper?"')
    parser.add_argument("--model", required=True, type=Path, help="model folder (official LISA or ours)")
    parser.add_argument("--output", type=Path, default=Path("."), help="folder for the result files")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--quantization", default=None, choices=("8bit", "4bit"))
    parser.add_argument("--vision-tower", type=Path, default=None, help="CLIP folder for official checkpoints")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--generation-mode", default="cached", choices=("cached", "reference"))
    return parser.parse_args(argv)


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    from lisa_core.errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"{path}: not an image OpenCV can read")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def result_record(result) -> dict:
    return {
        "query": result.query,
        "answer": result.answer,
        "image_size": list(result.image_size),
        "output_ids": result.output_ids,
        "targets": [
            {
                "confidence": target.confidence,
                "iou_prediction": target.iou_prediction,
                "centroid": list(target.centroid) if target.centroid is not None else None,
                "box": list(target.box) if target.box is not None else None,
                "area": target.area,
            }
            for target in result.targets
        ],
        "timings": result.timings,
    }


def run(args: argparse.Namespace) -> dict:
    import cv2

    from lisa_core.overlay import draw_overlay
    from lisa_core.pipeline import LisaPipeline

    image = read_rgb(args.image)
    print(f"loading {args.model} on {args.device} ({args.dtype}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    settings = {"generation_mode": args.generation_mode}
    if args.max_new_tokens is not None:
        settings["max_new_tokens"] = args.max_new_tokens
    pipeline = LisaPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
        vision_tower=args.vision_tower, **settings,
    )
    print(f"loaded in {time.perf_counter() - start:.1f} s; segmenting ...", file=sys.stderr, flush=True)
    result = pipeline.segment(image, args.query)

    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.image.stem
    cv2.imwrite(str(args.output / f"{stem}_mask.png"), result.union_mask.astype(np.uint8) * 255)
    tinted = draw_overlay(image, result.targets, caption=result.answer)
    cv2.imwrite(str(args.output / f"{stem}_overlay.png"), cv2.cvtColor(tinted, cv2.COLOR_RGB2BGR))
    record = result_record(result)
    (args.output / f"{stem}_result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        record = run(args)
    except LisaError as error:
        print(f"lisa-segment: error: {error}", file=sys.stderr)
        return 2
    print(f"answer: {record['answer']}")
    print(f"targets: {len(record['targets'])}; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
