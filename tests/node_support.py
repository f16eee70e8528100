"""For the perception node's tests: a tiny model that always segments, scenes, a camera process.

The untrained tiny preset rarely writes [SEG], so a test of masks and centroids would check nothing.
`write_segmenting_model` edits the tiny model's weights (then saves a real checkpoint) so that every
generated token is [SEG]: one coordinate of the residual stream is pinned to a large positive value
by the token embeddings and the image projector's bias, the final norm keeps only that coordinate, and
lm_head maps it to [SEG] alone. The [SEG] states then go through the untouched projection and SAM
decoder, which give a real, non-empty mask.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

PINNED_COORDINATE = 0
K = (100.0, 0.0, 80.0, 0.0, 110.0, 60.0, 0.0, 0.0, 1.0)  # intrinsics of the test camera (160x120)
FRAME_ID = "test_camera_optical"


def write_segmenting_model(path: Path) -> Path:
    from lisa_core.checkpoint import save_pretrained
    from lisa_core.config import SEG_TOKEN
    from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    language_model = model.language_model
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    with torch.no_grad():
        language_model.model.embed_tokens.weight[:, PINNED_COORDINATE] = 50.0
        model.mm_projector.bias[PINNED_COORDINATE] = 50.0
        language_model.model.norm.weight.zero_()
        language_model.model.norm.weight[PINNED_COORDINATE] = 1.0
        language_model.lm_head.weight.zero_()
        language_model.lm_head.weight[seg_id, PINNED_COORDINATE] = 10.0
    return save_pretrained(model, tokenizer, path)


def scene(index: int, height: int = 120, width: int = 160) -> np.ndarray:
    """A grey background with a red square moving right by 2 px per frame."""
    image = np.full((height, width, 3), 90, np.uint8)
    left = 20 + (2 * index) % (width - 60)
    image[30:80, left:left + 40] = (220, 30, 30)
    return image


def depth_image(height: int = 120, width: int = 160) -> np.ndarray:
    """16UC1: 1500 mm everywhere, with a grid of invalid (0) pixels that must be ignored."""
    depth = np.full((height, width), 1500, np.uint16)
    depth[::7, :] = 0
    return depth


def run_camera() -> None:
    """A camera process: rgb8 frames, 16UC1 depth and CameraInfo with equal stamps; logs each stamp."""
    import rclpy

    from lisa_ros.client import PerceptionClient

    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--stamps-file", type=Path, required=True)
    parser.add_argument("--camera-name", default="", help="one of the node's `cameras`; '' for the single one")
    parser.add_argument("--topics", type=json.loads, default=None, help="JSON: topic names to override")
    arguments = parser.parse_args()
    rclpy.init()
    camera = PerceptionClient(rclpy.get_default_context(), name=f"test_camera{arguments.camera_name}",
                              camera_name=arguments.camera_name, topics=arguments.topics)
    while camera.image_pub.get_subscription_count() == 0:
        time.sleep(0.05)
    depth = depth_image()
    index = 0
    with open(arguments.stamps_file, "a") as stamps:
        try:
            while rclpy.ok():
                stamp = time.time_ns()
                header = camera.publish_frame(scene(index), stamp, FRAME_ID)
                camera.publish_depth(depth, header)
                camera.publish_camera_info(header, K, 160, 120)
                stamps.write(json.dumps(stamp) + "\n")
                stamps.flush()
                index += 1
                time.sleep(1.0 / arguments.rate)
        except KeyboardInterrupt:
            pass


CAMERA_CODE = "import node_support; node_support.run_camera()"
