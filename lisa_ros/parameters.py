"""The perception node's names and parameters: defaults, descriptions, limits, and when each may change.

The one place where the package, executable and node names and every topic default are defined: the
node, the launch file, the client, the demo, the bag tool and the tests import them from here.
config/perception.yaml holds the same defaults for people to copy; tests check the two agree.
Topic names are relative, so a launch namespace applies to them (in the root namespace they resolve
to /camera/image_raw, /lisa/query, ...); give absolute names to opt out. With `cameras` set, each
camera's topics are these names under the camera's name (head/camera/image_raw, head/lisa/mask...).

When a parameter may change:
- FIXED: for the life of the process (the interfaces clients reach the node by, in every state);
- AT_CONFIGURE: read when the node is configured; changes are refused unless it is unconfigured
  (run the cleanup transition, set them, configure again);
- RUNTIME: any time; the worker takes the new value at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from lisa_core.precision import PRECISIONS, QUANTIZATIONS

PACKAGE = "lisa_ros"
EXECUTABLE = "perception_node"
NODE_NAME = "lisa_perception"

OVERFLOW_POLICIES = ("drop_oldest", "reject_new")
QUANTIZATION_CHOICES = tuple("none" if q is None else q for q in QUANTIZATIONS)
IMAGE_RELIABILITIES = ("auto", "best_effort", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")
COMPRESSED_SUFFIX = "compressed"  # image_transport's convention: <image_topic>/compressed
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
CAMERA_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

FIXED, AT_CONFIGURE, RUNTIME = "fixed", "at_configure", "runtime"


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Any
    description: str
    changes: str = RUNTIME  # FIXED, AT_CONFIGURE or RUNTIME
    limits: Optional[tuple[float, float]] = None  # inclusive, for numbers
    choices: Optional[tuple[str, ...]] = None  # for strings

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is not acceptable beyond type and range (which rclpy checks), or None."""
        if self.choices is not None and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}"
        if self.name == "device" and not DEVICE_PATTERN.match(value):
            return f"device must be cpu, cuda or cuda:<index>; got {value!r}"
        if self.name == "cameras":
            names = list(value or [])
            bad = [name for name in names if not CAMERA_NAME_PATTERN.match(name)]
            if bad:
                return f"cameras must be names of letters, digits and _ (starting with a letter); got {bad}"
            if len(set(names)) != len(names):
                return f"cameras must not repeat a name; got {names}"
        return None


PARAMETERS = (
    # The process: fixed for its life.
    ParameterSpec("autostart", True, "Configure and activate at start (false: wait for the lifecycle "
                  "transitions).", changes=FIXED),
    ParameterSpec("cameras", [], "Camera names, each with its own topics, service and action under its "
                  "name (head/camera/image_raw, head/lisa/query, ...); one model serves them all. Empty: "
                  "one camera, topics as named below.", changes=FIXED),
    ParameterSpec("query_topic", "lisa/query", "Instructions (std_msgs/String), one-shot.", changes=FIXED),
    ParameterSpec("stop_topic", "lisa/stop", "Any std_msgs/Empty here ends tracking.", changes=FIXED),
    ParameterSpec("result_topic", "lisa/result", "lisa_ros/SegmentationResult: every query's outcome with "
                  "its status code.", changes=FIXED),
    ParameterSpec("segment_service", "lisa/segment", "lisa_ros/Segment request/response service.",
                  changes=FIXED),
    ParameterSpec("query_action", "lisa/query_action", "lisa_ros/Query action: the answer streamed as "
                  "feedback, cancellable.", changes=FIXED),
    ParameterSpec("reset_conversation_service", "lisa/reset_conversation", "lisa_ros/ResetConversation: "
                  "forget a conversation's turns.", changes=FIXED),
    ParameterSpec("diagnostics_rate_hz", 1.0, "Rate of diagnostic_msgs/DiagnosticArray on /diagnostics.",
                  changes=FIXED, limits=(0.1, 100.0)),
    # The model, the camera inputs and the outputs: read at configure.
    ParameterSpec("model_path", "", "Model folder (our format or an official LISA folder). Empty: the "
                  "embedded demo model (models/demo when present, else the untrained tiny preset).",
                  changes=AT_CONFIGURE),
    ParameterSpec("model_cache_dir", "", "Where the untrained tiny preset is written on first use. "
                  "Empty: $XDG_CACHE_HOME/lisa_ros or ~/.cache/lisa_ros.", changes=AT_CONFIGURE),
    ParameterSpec("device", "cpu", "Torch device: cpu, cuda or cuda:<index>.", changes=AT_CONFIGURE),
    ParameterSpec("precision", "fp32", "Weights and activations: " + ", ".join(PRECISIONS) + ".",
                  changes=AT_CONFIGURE, choices=PRECISIONS),
    ParameterSpec("quantization", "none", "Load the language model in 8 or 4 bit (bitsandbytes, GPU).",
                  changes=AT_CONFIGURE, choices=QUANTIZATION_CHOICES),
    ParameterSpec("cpu_threads", 0, "Torch CPU threads for the model; 0: torch's default. Small models "
                  "on a busy machine run faster with 1.", changes=AT_CONFIGURE, limits=(0, 256)),
    ParameterSpec("image_topic", "camera/image_raw", "Camera frames (rgb8, bgr8, rgba8, bgra8, mono8).",
                  changes=AT_CONFIGURE),
    ParameterSpec("image_transport", "raw", "raw: sensor_msgs/Image on image_topic; compressed: "
                  "sensor_msgs/CompressedImage (jpeg, png) on <image_topic>/compressed.",
                  changes=AT_CONFIGURE, choices=IMAGE_TRANSPORTS),
    ParameterSpec("depth_topic", "camera/depth/image_raw", "Depth registered to the camera frames "
                  "(16UC1 or mono16 millimetres, 32FC1 metres). Empty: no depth.", changes=AT_CONFIGURE),
    ParameterSpec("camera_info_topic", "camera/camera_info", "Intrinsics of the camera frames.",
                  changes=AT_CONFIGURE),
    ParameterSpec("image_reliability", "auto", "Reliability of the image, depth and camera info "
                  "subscriptions: auto matches the publisher found on each topic (reliable when every "
                  "publisher is, so no fragment of a large frame is lost); best_effort matches every "
                  "publisher; reliable matches reliable publishers only.", changes=AT_CONFIGURE,
                  choices=IMAGE_RELIABILITIES),
    ParameterSpec("mask_topic", "lisa/mask", "Union of the targets' masks, mono8, 255 on targets.",
                  changes=AT_CONFIGURE),
    ParameterSpec("centroid_topic", "lisa/centroid", "Pixel centroid of the main target (x = column, "
                  "y = row).", changes=AT_CONFIGURE),
    ParameterSpec("target_point_topic", "lisa/target_point", "3D centroid of the main target in the camera's "
                  "optical frame, metres (needs depth and camera info); grasp points and boxes are per target "
                  "in the result.",
                  changes=AT_CONFIGURE),
    ParameterSpec("explanation_topic", "lisa/explanation", "The model's answer text.", changes=AT_CONFIGURE),
    ParameterSpec("overlay_topic", "lisa/overlay", "The frame with the masks drawn, rgb8, for RViz.",
                  changes=AT_CONFIGURE),
    ParameterSpec("target_cloud_topic", "lisa/target_cloud", "sensor_msgs/PointCloud2 of the targets' "
                  "depth points (x, y, z float32, target uint32), optical frame.", changes=AT_CONFIGURE),
    ParameterSpec("markers_topic", "lisa/markers", "visualization_msgs/MarkerArray: per target a sphere at "
                  "its 3D point, its 3D box and a label.", changes=AT_CONFIGURE),
    # Scheduling and outputs: may change at run time.
    ParameterSpec("queue_size", 4, "Queries waiting for the model, at most.", limits=(1, 1000)),
    ParameterSpec("overflow_policy", "drop_oldest", "When the queue is full: drop_oldest (the oldest "
                  "waiting query gets a queue-full outcome) or reject_new (the new one does).",
                  choices=OVERFLOW_POLICIES),
    ParameterSpec("max_batch_size", 8, "Waiting one-shot queries (any camera) answered in one batched "
                  "model call, at most; 1: one at a time.", limits=(1, 64)),
    ParameterSpec("max_image_age", 1.0, "Seconds: a query fails with 'frame too old' when the newest "
                  "frame arrived longer ago; 0 accepts any age.", limits=(0.0, 3600.0)),
    ParameterSpec("service_timeout", 120.0, "Seconds the segment service waits for its answer.",
                  limits=(0.1, 3600.0)),
    ParameterSpec("max_new_tokens", 0, "Longest answer, in tokens; 0: the model's default.",
                  limits=(0, 4096)),
    ParameterSpec("max_query_chars", 2000, "Longer instructions are refused.", limits=(1, 1_000_000)),
    ParameterSpec("max_image_pixels", 4096 * 4096, "Larger frames are refused before conversion.",
                  limits=(1, 1_000_000_000)),
    ParameterSpec("min_confidence", 0.0, "Targets whose confidence (SAM's IoU prediction, 0..1) is lower "
                  "are left out; 0 keeps all.", limits=(0.0, 1.0)),
    ParameterSpec("depth_max_offset", 0.05, "Seconds between a frame's stamp and the stamp of the depth "
                  "image used with it, at most.", limits=(0.0, 10.0)),
    ParameterSpec("depth_wait", 0.2, "Seconds an answer waits for its frame's depth image when none within "
                  "depth_max_offset has arrived yet and the depth stream has not passed the frame (the image "
                  "may still be in transit); 0 publishes at once.", limits=(0.0, 5.0)),
    ParameterSpec("max_cloud_points", 5000, "Points in each answer's target cloud, at most (uniformly "
                  "down-sampled).", limits=(1, 10_000_000)),
    ParameterSpec("conversation_max_turns", 8, "Earlier turns of a conversation kept in its prompt; the "
                  "oldest go first.", limits=(0, 256)),
    ParameterSpec("conversation_idle_expiry", 300.0, "Seconds after which an unused conversation is "
                  "forgotten; 0: never.", limits=(0.0, 1e9)),
    ParameterSpec("max_conversations", 64, "Conversations remembered; the least recently used go first.",
                  limits=(1, 100_000)),
    ParameterSpec("max_prompt_tokens", 0, "A conversation's prompt, in tokens, at most (oldest turns "
                  "dropped to fit); 0: the model's context window.", limits=(0, 1_000_000)),
    ParameterSpec("tracking", False, "After an answer, keep publishing its targets' masks on new frames "
                  "(SAM only) until the next query or a message on stop_topic."),
    ParameterSpec("track_rate_hz", 10.0, "Tracking updates per second, at most.", limits=(0.1, 120.0)),
    ParameterSpec("publish_overlay", True, "Draw and publish the overlay image (only while someone "
                  "subscribes)."),
)

PARAMETERS_BY_NAME = {spec.name: spec for spec in PARAMETERS}
# Every topic, service and action name, by parameter: the defaults clients and tools use.
DEFAULT_NAMES = {spec.name: spec.default for spec in PARAMETERS
                 if spec.name.endswith(("_topic", "_service", "_action"))}
