"""The perception node's parameters: names, defaults, descriptions, limits, and which are read-only.

config/perception.yaml holds the same defaults for people to copy; tests check the two agree.
Topic names are relative, so a launch namespace applies to them (in the root namespace they resolve
to /camera/image_raw, /lisa/query, ...); give absolute names to opt out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from lisa_ros.worker import OVERFLOW_POLICIES

PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "8bit", "4bit")
IMAGE_RELIABILITIES = ("best_effort", "reliable")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Any
    description: str
    read_only: bool = False
    limits: Optional[tuple[float, float]] = None  # inclusive, for numbers
    choices: Optional[tuple[str, ...]] = None  # for strings

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is not acceptable beyond type and range (which rclpy checks), or None."""
        if self.choices is not None and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}"
        if self.name == "device" and not DEVICE_PATTERN.match(value):
            return f"device must be cpu, cuda or cuda:<index>; got {value!r}"
        return None


PARAMETERS = (
    # The model: fixed for the life of the node.
    ParameterSpec("model_path", "", "Model folder (our format or an official LISA folder). Empty: the "
                  "embedded demo model (models/demo when present, else the untrained tiny preset).",
                  read_only=True),
    ParameterSpec("model_cache_dir", "", "Where the untrained tiny preset is written on first use. "
                  "Empty: $XDG_CACHE_HOME/lisa_ros or ~/.cache/lisa_ros.", read_only=True),
    ParameterSpec("device", "cpu", "Torch device: cpu, cuda or cuda:<index>.", read_only=True),
    ParameterSpec("precision", "fp32", "Weights and activations: fp32, bf16 or fp16.", read_only=True,
                  choices=PRECISIONS),
    ParameterSpec("quantization", "none", "Load the language model in 8 or 4 bit (bitsandbytes, GPU).",
                  read_only=True, choices=QUANTIZATIONS),
    ParameterSpec("cpu_threads", 0, "Torch CPU threads for the model; 0: torch's default. Small models "
                  "on a busy machine run faster with 1.", read_only=True, limits=(0, 256)),
    # Topics and service: fixed once subscribed.
    ParameterSpec("image_topic", "camera/image_raw", "Camera frames (rgb8, bgr8, rgba8, bgra8, mono8).",
                  read_only=True),
    ParameterSpec("depth_topic", "camera/depth/image_raw", "Depth registered to the camera frames "
                  "(16UC1 or mono16 millimetres, 32FC1 metres). Empty: no depth.", read_only=True),
    ParameterSpec("camera_info_topic", "camera/camera_info", "Intrinsics of the camera frames.",
                  read_only=True),
    ParameterSpec("query_topic", "lisa/query", "Instructions (std_msgs/String).", read_only=True),
    ParameterSpec("stop_topic", "lisa/stop", "Any std_msgs/Empty here ends tracking.", read_only=True),
    ParameterSpec("mask_topic", "lisa/mask", "Union of the targets' masks, mono8, 255 on targets.",
                  read_only=True),
    ParameterSpec("centroid_topic", "lisa/centroid", "Pixel centroid of the main target (x = column, "
                  "y = row).", read_only=True),
    ParameterSpec("target_point_topic", "lisa/target_point", "3D centroid of the main target in the "
                  "camera frame, metres (needs depth and camera info).", read_only=True),
    ParameterSpec("explanation_topic", "lisa/explanation", "The model's answer text.", read_only=True),
    ParameterSpec("result_topic", "lisa/result", "lisa_ros/SegmentationResult: every query's outcome.",
                  read_only=True),
    ParameterSpec("overlay_topic", "lisa/overlay", "The frame with the masks drawn, rgb8, for RViz.",
                  read_only=True),
    ParameterSpec("status_topic", "lisa/status", "JSON status: model, busy, queue, latency, errors, "
                  "counts.", read_only=True),
    ParameterSpec("segment_service", "lisa/segment", "lisa_ros/Segment request/response service.",
                  read_only=True),
    ParameterSpec("image_reliability", "best_effort", "Reliability of the image subscriptions: "
                  "best_effort matches every camera publisher; reliable matches only reliable ones but "
                  "loses no fragments of large frames.", read_only=True, choices=IMAGE_RELIABILITIES),
    ParameterSpec("status_rate_hz", 1.0, "Status heartbeat rate; 0: publish only on events.",
                  read_only=True, limits=(0.0, 100.0)),
    # Scheduling: may change at run time.
    ParameterSpec("queue_size", 4, "Queries waiting for the model, at most.", limits=(1, 1000)),
    ParameterSpec("overflow_policy", "drop_oldest", "When the queue is full: drop_oldest (the oldest "
                  "waiting query gets a 'dropped' error) or reject_new (the new one does).",
                  choices=OVERFLOW_POLICIES),
    ParameterSpec("max_image_age", 1.0, "Seconds: a query fails with 'frame too old' when the newest "
                  "frame arrived longer ago; 0 accepts any age.", limits=(0.0, 3600.0)),
    ParameterSpec("service_timeout", 120.0, "Seconds the segment service waits for its answer.",
                  limits=(0.1, 3600.0)),
    ParameterSpec("max_new_tokens", 0, "Longest answer, in tokens; 0: the model's default.",
                  limits=(0, 4096)),
    ParameterSpec("max_query_chars", 2000, "Longer instructions are refused.", limits=(1, 1_000_000)),
    ParameterSpec("max_image_pixels", 4096 * 4096, "Larger frames are refused before conversion.",
                  limits=(1, 1_000_000_000)),
    ParameterSpec("min_confidence", 0.0, "Targets whose SAM IoU prediction is lower are left out; 0 keeps "
                  "all (the prediction can be negative).", limits=(0.0, 1.0)),
    ParameterSpec("depth_max_offset", 0.05, "Seconds between a frame's stamp and the stamp of the depth "
                  "image used with it, at most.", limits=(0.0, 10.0)),
    ParameterSpec("tracking", False, "After an answer, keep publishing its targets' masks on new frames "
                  "(SAM only) until the next query or a message on stop_topic."),
    ParameterSpec("track_rate_hz", 10.0, "Tracking updates per second, at most.", limits=(0.1, 120.0)),
    ParameterSpec("publish_overlay", True, "Draw and publish the overlay image (only while someone "
                  "subscribes)."),
)

PARAMETERS_BY_NAME = {spec.name: spec for spec in PARAMETERS}
