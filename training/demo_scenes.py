"""Write the scenes `python -m lisa_ros.demo` plays as files beside the demo model.

    python -m training.demo_scenes [--out models/demo/scenes] [--count 6] [--seed 0]

Scene i is the synthetic benchmark's validation query i (training.data.synthetic, restricted to the
attribute, function, size and multiple kinds: every query has a target) on a frame of DEMO_FRAMES[i]
(mostly 16:9), asked in DEMO_PHRASINGS[i] (a user's words: the benchmark's trained phrasings or its
held-out ones, never LISA's templates), drawn with a 144 px short side and scaled 5x (nearest
neighbour) to a camera frame 720 px tall (1280x720 for 16:9), on a flat table 0.8 m in front of a
pinhole camera.
Files, for scene NN (00, 01, ...):
- NN.png: the frame, 8-bit colour;
- NN_depth.png: depth registered to the frame, 16UC1 millimetres (16-bit grey);
- NN_mask.png: the ground truth, the union of the targets' masks (8-bit grey, 255 on targets);
- scenes.json: {"scenes": [{"image", "depth", "mask", "instruction", "kind", "targets",
  "camera": {"width", "height", "k"}}]}, file names relative to the folder, k the 3x3 intrinsics
  (pixels) row by row.
The files depend only on `--count` and `--seed`: writing them again gives the same pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from lisa_core.errors import InputError
from training.data.phrasing import HELD_OUT, TRAINED
from training.data.synthetic import SyntheticReasonSeg

DEFAULT_OUT = "models/demo/scenes"
DEFAULT_COUNT = 6
SCENES_FILE = "scenes.json"
DEMO_KINDS = ("attribute", "function", "size", "multiple")
DEMO_FRAMES = ("16:9", "16:9", "4:3", "16:9", "1:1", "16:9")
DEMO_PHRASINGS = (HELD_OUT, TRAINED, HELD_OUT, TRAINED, HELD_OUT, HELD_OUT)
SCENE_SHORT_SIDE = 144
SCALE = 5
DEPTH_MM = 800
FOCAL_PX = 400.0


def camera_matrix(width: int, height: int) -> list[float]:
    """Row-major K of the demo camera: FOCAL_PX focal length, principal point at the frame's centre."""
    return [FOCAL_PX, 0.0, width / 2, 0.0, FOCAL_PX, height / 2, 0.0, 0.0, 1.0]


def demo_benchmark(index: int, seed: int = 0) -> SyntheticReasonSeg:
    """The benchmark that scene `index` comes from (its frame shape and phrasing)."""
    position = index % len(DEMO_FRAMES)
    return SyntheticReasonSeg("val", seed=seed, image_size=SCENE_SHORT_SIDE, kinds=DEMO_KINDS,
                              aspect_ratios=(DEMO_FRAMES[position],), eval_phrasing=DEMO_PHRASINGS[position])


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise InputError(f"{path}: could not be written")


def write_scenes(out: Union[str, Path], count: int = DEFAULT_COUNT, seed: int = 0) -> Path:
    """Write `count` demo scenes (benchmark seed `seed`) into `out`; returns the path of scenes.json."""
    if count < 1:
        raise InputError(f"count must be at least 1, got {count}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(count):
        sample = demo_benchmark(index, seed).eval_sample(index)
        height, width = (side * SCALE for side in sample.image.shape[:2])
        depth = np.full((height, width), DEPTH_MM, np.uint16)
        frame = cv2.resize(sample.image, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST)
        truth = cv2.resize(sample.query_ground_truth(0), None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_NEAREST)
        names = {"image": f"{index:02d}.png", "depth": f"{index:02d}_depth.png", "mask": f"{index:02d}_mask.png"}
        _write_png(out / names["image"], cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        _write_png(out / names["depth"], depth)
        _write_png(out / names["mask"], np.where(truth == 1, 255, 0).astype(np.uint8))
        entries.append({
            **names,
            "instruction": sample.conversations[0][0][0],
            "kind": sample.meta["kind"],
            "targets": len(sample.masks),
            "camera": {"width": width, "height": height, "k": camera_matrix(width, height)},
        })
    index_path = out / SCENES_FILE
    index_path.write_text(json.dumps({"scenes": entries}, indent=2) + "\n")
    return index_path


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description="Write the demo's scenes (frames, depth, ground truth) as files.")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write (the demo reads models/demo/scenes)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="how many scenes")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic benchmark's seed")
    args = parser.parse_args(argv)
    index_path = write_scenes(args.out, args.count, args.seed)
    print(f"wrote {args.count} scenes: {index_path}")
    return index_path


if __name__ == "__main__":
    main()
