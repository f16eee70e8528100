"""What the node publishes for an answer, as rules without ROS: the perception node and the offline
bag tool (lisa_ros.bag, which runs where ROS is not installed) share them."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from lisa_core.result import Target

# Recent depth images kept for pairing with frames by stamp (lisa_ros.geometry.pair_depth); the node's
# depth and camera info subscriptions keep as many.
DEPTH_BUFFER_LENGTH = 10
# The target cloud's point layout: x, y, z in metres (optical frame) and the target's index.
CLOUD_POINT = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("target", "<u4")])
UNTRAINED_CAPTION = "[untrained tiny preset] "


def main_target_index(targets: Sequence[Target]) -> Optional[int]:
    """The index of the target with the highest confidence among non-empty ones (the first on a tie):
    the one whose centroid and 3D point go on the centroid and target_point topics."""
    candidates = [i for i, t in enumerate(targets) if t.area > 0]
    return max(candidates, key=lambda i: targets[i].confidence) if candidates else None


def overlay_caption(query_id: str, answer: str, tracked: bool = False, untrained: bool = False) -> str:
    """The text drawn on the overlay image."""
    return f"{UNTRAINED_CAPTION if untrained else ''}{query_id}{' (tracked)' if tracked else ''}: {answer}"
