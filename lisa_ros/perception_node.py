"""The `lisa_perception` node: camera frames and instructions in; masks, 3D targets and answers out.
A managed lifecycle node; lisa_ros.node runs it.

Lifecycle (autostart, the default, configures and activates at start):
- unconfigured: the query interfaces (topic, service, action, reset) and the result topic exist in
  every state, so that every query gets its one outcome: here MODEL_NOT_LOADED, with the reason the
  last configure failed when it did;
- configure: loads the model (on its worker thread; a signal still stops the process) and creates the
  output publishers; FAILURE when the model cannot load;
- activate: subscribes to the cameras and lets the worker take queries; deactivate: unsubscribes,
  queued queries get INACTIVE outcomes, tracking stops (a query inside the model is still answered);
- cleanup: frees the model; shutdown: from any state.

Threads: one executor thread checks messages and hands work over (camera frames unconverted) (the service and the action await
their outcome as coroutines, so they never block that thread); one InferenceWorker thread owns the
model. Outcomes are published from the worker thread (rclpy publishers are thread-safe).

QoS, on purpose:
- camera, depth and camera info: keep last CAMERA_HISTORY_DEPTH (30, one second at 30 Hz), so that a
  message arriving while the executor is busy (the model answering on 2 cores) waits instead of
  replacing the one before: with a reliable 720p camera at 30 Hz, keep last 1 lost a third of the
  frames, keep last 10 4 %, 30 under 1 % (bench/results_node.md). The image callback only checks a
  frame's fields and hands the message over; the worker converts the newest when it takes it, so a
  backlog costs little and the newest frame still wins (a compressed frame's format, end marker and
  size are checked on arrival; damage inside the file shows when the worker decodes it: BAD_IMAGE).
  When the worker takes a frame, the depth images buffered then go with it (an answer may take
  seconds, longer than the buffer lasts), and until it is answered each
  depth image that arrives is offered to it too (a frame's own depth image may arrive after the frame
  is taken, and be pushed out of the buffer before the answer comes); the answer uses the closest in
  stamp of those and of the ones buffered when it is published, and when none is close enough it waits
  up to `depth_wait` for the frame's own (a quick answer can beat its depth image). Reliability
  `auto` (default) matches the publisher found on each topic: reliable publishers get a reliable
  subscription, so a large frame's lost fragments are sent again instead of the frame being lost;
  best-effort publishers get best effort. Until a publisher appears the subscription waits.
- instructions and stop: reliable, keep all, so no instruction of a burst is lost in transit.
- results: reliable; the result topic keeps all (a keep-last writer overwrites outcomes its readers
  have not acknowledged yet); the other outputs keep the last 10.
- /diagnostics: reliable, keep last 10 (as diagnostic_updater publishes).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PointStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, RegionOfInterest
from std_msgs.msg import Empty, Header, String
from visualization_msgs.msg import MarkerArray

from lisa_core.errors import InputError
from lisa_core.overlay import draw_overlay
from lisa_core.frames import check_aspect_ratio
from lisa_core.result import STAGE_DECODING_MASKS, STAGE_ENCODING, STAGE_GENERATING
from lisa_ros import health
from lisa_ros.conversations import ConversationLimits, ConversationStore
from lisa_ros.geometry import DEPTH_SCALE_TO_METRES, cloud_points, pair_depth, target_geometry
from lisa_ros.image_conv import (check_compressed_imgmsg, check_imgmsg, compressed_imgmsg_to_cv2, cv2_to_imgmsg,
                                 imgmsg_to_cv2)
from lisa_ros.model_source import UNTRAINED_TINY_LABEL, ModelSource, resolve_model, write_tiny_preset
from lisa_ros.msg import SegmentationResult as SegmentationResultMsg
from lisa_ros.msg import Target as TargetMsg
from lisa_ros.outputs import DEPTH_BUFFER_LENGTH, main_target_index, overlay_caption
from lisa_ros.parameters import (AT_CONFIGURE, COMPRESSED_SUFFIX, FIXED, NODE_NAME, PARAMETERS,
                                 PARAMETERS_BY_NAME, ParameterSpec)
from lisa_ros.action import Query as QueryAction
from lisa_ros.ros_outputs import cloud_message, fill_target_geometry, marker_array
from lisa_ros.srv import ResetConversation, Segment
from lisa_ros.status import Status
from lisa_ros.worker import STAGE_QUEUED, Frame, InferenceWorker, Outcome, Query, WorkerSettings

COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
SHUTDOWN_WORKER_WAIT_S = 1.0
# The process exits right after close(): results still in flight (a frame-sized mask takes a while)
# would be lost, and with them a query's only outcome.
SHUTDOWN_DELIVERY_WAIT_S = 0.5
# A query can reach the node's subscription just before a signal and not be taken yet: at close the node
# spins until SHUTDOWN_DRAIN_S pass without a query taken (at most SHUTDOWN_DRAIN_MAX_S), answering each
# one SHUTTING_DOWN instead of leaving it unanswered. A fixed 0.1 s of spinning took one of three queries
# on a host whose cores were busy with other work.
SHUTDOWN_DRAIN_S = 0.1
SHUTDOWN_DRAIN_MAX_S = 2.0
# Messages an image, depth or camera info subscription holds while the executor is busy (one second at
# 30 Hz: max_image_age's default): one that arrives meanwhile waits instead of replacing the one
# before. Reliable 720p at 30 Hz while answering: keep last 1 lost a third of the frames, 10 lost 4 %.
CAMERA_HISTORY_DEPTH = 30
AWAITING_DEPTH_FRAMES = 8  # taken frames offered the depth images that arrive while they are answered
PUBLISHER_POLL_S = 0.5  # how often `auto` reliability looks for a camera publisher that is not there yet
# Per-camera input topics may be set under the camera's name (head.image_topic: /head_cam/color/image_raw).
CAMERA_INPUTS = ("image_topic", "depth_topic", "camera_info_topic")
ACTION_STAGES = {STAGE_QUEUED: QueryAction.Feedback.STAGE_QUEUED,
                 STAGE_ENCODING: QueryAction.Feedback.STAGE_ENCODING,
                 STAGE_GENERATING: QueryAction.Feedback.STAGE_GENERATING,
                 STAGE_DECODING_MASKS: QueryAction.Feedback.STAGE_DECODING_MASKS}
# The primary state each transition leaves; shutting down and error processing start from several.
STATE_LEFT_BY_TRANSITION = {"configuring": "unconfigured", "activating": "inactive", "deactivating": "active",
                            "cleaningup": "inactive"}
DIAGNOSTIC_LEVELS = {health.OK: DiagnosticStatus.OK, health.WARN: DiagnosticStatus.WARN,
                     health.ERROR: DiagnosticStatus.ERROR}

COMMAND_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
RESULT_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


def _stamp_ns(header: Header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def _sensor_qos(reliable: bool) -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=CAMERA_HISTORY_DEPTH,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)


@dataclass(eq=False)
class FrameInputs:
    """What the node keeps for a frame from when the worker takes it (Frame.paired): the depth images
    buffered then, the closest in stamp of those that arrived after (its own may come late), and the
    camera info. The answer's 3D outputs use the closest of these and those buffered at publishing."""

    stamp_ns: int
    depth_images: tuple
    camera_info: Optional[CameraInfo]
    closest_later: Optional[tuple] = None  # (stamp ns, depth, encoding), written by the depth callback

    def offer(self, depth_item: tuple) -> None:
        if self.closest_later is None or abs(depth_item[0] - self.stamp_ns) < abs(self.closest_later[0] - self.stamp_ns):
            self.closest_later = depth_item


@dataclass
class CameraChannel:
    """One camera's topics, interfaces and state within the node ("" is the single default camera)."""

    name: str
    result_pub: object = None
    outputs: dict = field(default_factory=dict)  # parameter name -> publisher, while configured
    subscriptions: list = field(default_factory=list)  # while active
    pending_subscriptions: dict = field(default_factory=dict)  # topic -> subscribe(reliable), for `auto`
    image_topic: str = ""  # resolved, for messages
    depth_images: deque = field(default_factory=lambda: deque(maxlen=DEPTH_BUFFER_LENGTH))
    # FrameInputs of frames taken and not answered yet (a query that ends without an answer leaves its
    # frame here until newer ones push it out)
    awaiting_depth: deque = field(default_factory=lambda: deque(maxlen=AWAITING_DEPTH_FRAMES))
    camera_info: Optional[CameraInfo] = None
    frames_in: health.RateMeter = field(default_factory=health.RateMeter)
    last_frame_at: Optional[float] = None
    latencies: health.LatencyWindow = field(default_factory=health.LatencyWindow)
    outcomes: health.OutcomeCounts = field(default_factory=health.OutcomeCounts)
    counts: dict = field(default_factory=lambda: dict(frames=0, bad_frames=0, bad_depth=0))
    last_error: Optional[str] = None
    reliability: dict = field(default_factory=dict)  # topic -> the reliability chosen

    def name_of(self, topic: str) -> str:
        """A parameter's topic name under this camera's name (absolute names stay as they are)."""
        return topic if not self.name or topic.startswith("/") else f"{self.name}/{topic}"


class PerceptionNode(LifecycleNode):
    def __init__(self, abort: Optional[threading.Event] = None, **node_kwargs):
        """`abort`, when set, makes a configure that is loading the model give up (the process is ending)."""
        super().__init__(NODE_NAME, **node_kwargs)
        change_state = self._service_change_state
        change_state.callback = self._refusing_unavailable_transitions(change_state.callback)
        self._abort = abort or threading.Event()
        self._worker: Optional[InferenceWorker] = None
        self._model: Optional[ModelSource] = None
        self._model_error: Optional[str] = None
        self._configured_values: dict = {}
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._declare_parameters()
        p = self._parameter_values()
        self._frame_keys = itertools.count(1)
        self._query_numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._depth_arrived = threading.Condition(self._lock)
        self._waiting: dict[int, Future] = {}  # id(query) -> its service call's or goal's outcome
        self._last_event_report = 0.0
        self._closing = False
        self._refused_at_close = 0  # queries answered SHUTTING_DOWN by close's drain
        self._conversations = ConversationStore(self._conversation_limits(p))
        # The service and the action await their outcome as coroutines; in the default (mutually
        # exclusive) group a waiting one would hold back every other callback, its own timeout too.
        self._awaiting_group = ReentrantCallbackGroup()

        self._channels = {name: CameraChannel(name) for name in (p["cameras"] or [""])}
        for channel in self._channels.values():
            self._create_command_interfaces(channel, p)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", OUTPUT_QOS)
        self.create_timer(1.0 / p["diagnostics_rate_hz"], self._publish_diagnostics)
        self.create_timer(10.0, self._conversations.expire)

    # ---- lifecycle transitions ---------------------------------------------------------------------
    def _refusing_unavailable_transitions(self, change_state):
        """rclpy raises inside the node for a transition id the current state does not have, and the
        caller never gets an answer; answer success false instead, as rclcpp nodes do."""

        def answer(request, response):
            if self._closing:
                self.get_logger().warning(f"transition {request.transition.id} refused: node shutting down")
                response.success = False
                return response
            available = {description[0] for description in self._state_machine.available_transitions}
            if not request.transition.label and request.transition.id not in available:
                self.get_logger().warning(
                    f"transition {request.transition.id} refused: not available in state {self.lifecycle_state}")
                response.success = False
                return response
            return change_state(request, response)

        return answer

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._parameter_values()
        self._configured_values = p
        self._model = resolve_model(p["model_path"], p["model_cache_dir"] or None)
        self.get_logger().info(f"model: {self._model.label}; loading from {self._model.path} on "
                               f"{p['device']} ({p['precision']})")
        worker = InferenceWorker(
            load_pipeline=self._load_pipeline, on_outcome=self._publish_outcome,
            on_state=lambda event: self._report_event(event), settings=self._worker_settings(p),
            frame_source=lambda camera: self._channels[camera].image_topic,
            log_error=lambda text: self.get_logger().error(text), conversations=self._conversations,
            prepare_frame=self._prepare_frame)
        worker.set_active(False, "node not active yet")
        worker.start()
        while not worker.loaded.wait(0.1):
            if self._abort.is_set():
                worker.stop(0.0)
                return TransitionCallbackReturn.FAILURE
        if not worker.model_loaded:
            self._model_error = worker.model_error
            worker.stop(SHUTDOWN_WORKER_WAIT_S)
            self._publish_diagnostics()
            return TransitionCallbackReturn.FAILURE
        self._model_error = None
        self._worker = worker
        for channel in self._channels.values():
            self._create_outputs(channel, p)
        self._publish_diagnostics()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._configured_values
        for channel in self._channels.values():
            self._subscribe_camera(channel, p)
        self._worker.set_active(True)
        self.get_logger().info("active: answering queries")
        self._publish_diagnostics()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_taking_work("node deactivated")
        self._publish_diagnostics()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_model()
        self._publish_diagnostics()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._closing = True
        self._stop_taking_work("node shutting down")
        self._release_model()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_taking_work("node failed")
        self._release_model()
        return TransitionCallbackReturn.SUCCESS

    def _stop_taking_work(self, reason: str) -> None:
        for channel in self._channels.values():
            for subscription in channel.subscriptions:
                self.destroy_subscription(subscription)
            channel.subscriptions.clear()
            channel.pending_subscriptions.clear()
        if self._worker is not None and not self._closing:  # closing: worker.stop gives SHUTTING_DOWN outcomes
            self._worker.set_active(False, reason)

    def _release_model(self) -> None:
        worker, self._worker = self._worker, None
        # Closing: the process exits next, and freeing the model would hold up the exit.
        if worker is not None and not worker.stop(SHUTDOWN_WORKER_WAIT_S, release=not self._closing):
            self.get_logger().warning("inference still running at cleanup: abandoned")
        for channel in self._channels.values():
            for publisher in channel.outputs.values():
                self.destroy_publisher(publisher)
            channel.outputs.clear()

    @property
    def lifecycle_state(self) -> str:
        """unconfigured, inactive, active or finalized (transitions show as the state they leave)."""
        label = self._state_machine.current_state[1]
        return STATE_LEFT_BY_TRANSITION.get(label, label)

    # ---- parameters ---------------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        for spec in PARAMETERS:
            self._declare(spec.name, spec)
        for camera in self._cameras():
            for name in CAMERA_INPUTS:
                spec = PARAMETERS_BY_NAME[name]
                self._declare(f"{camera}.{name}", ParameterSpec(
                    f"{camera}.{name}", "", f"{spec.description} For camera {camera}; empty: "
                    f"{camera}/{spec.default}.", changes=AT_CONFIGURE))

    def _declare(self, name: str, spec: ParameterSpec) -> None:
        descriptor = ParameterDescriptor(description=spec.description, read_only=spec.changes == FIXED)
        constraints = ["one of: " + ", ".join(spec.choices)] if spec.choices else []
        if spec.changes == AT_CONFIGURE:
            constraints.append("changes only while the node is unconfigured")
        descriptor.additional_constraints = "; ".join(constraints)
        if spec.limits is not None and isinstance(spec.default, int) and not isinstance(spec.default, bool):
            descriptor.integer_range = [IntegerRange(from_value=int(spec.limits[0]),
                                                     to_value=int(spec.limits[1]), step=1)]
        elif spec.limits is not None:
            descriptor.floating_point_range = [FloatingPointRange(from_value=float(spec.limits[0]),
                                                                  to_value=float(spec.limits[1]), step=0.0)]
        if isinstance(spec.default, list):  # an empty list has no type of its own
            self.declare_parameter(name, Parameter.Type.STRING_ARRAY, descriptor)
        else:
            self.declare_parameter(name, spec.default, descriptor)

    def _cameras(self) -> list[str]:
        """The `cameras` list; a string array left unset has no value at all in rclpy."""
        return list(self.get_parameter_or("cameras", Parameter("cameras", value=None)).value or [])

    def _parameter_values(self) -> dict:
        values = {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS if spec.name != "cameras"}
        values["cameras"] = self._cameras()
        for camera in values["cameras"]:
            for name in CAMERA_INPUTS:
                values[f"{camera}.{name}"] = self.get_parameter(f"{camera}.{name}").value
        return values

    @staticmethod
    def _worker_settings(p: dict) -> WorkerSettings:
        return WorkerSettings(queue_size=p["queue_size"], overflow_policy=p["overflow_policy"],
                              max_image_age=p["max_image_age"], max_new_tokens=p["max_new_tokens"],
                              max_query_chars=p["max_query_chars"], min_confidence=p["min_confidence"],
                              tracking=p["tracking"], track_rate_hz=p["track_rate_hz"],
                              max_batch_size=p["max_batch_size"], max_prompt_tokens=p["max_prompt_tokens"])

    @staticmethod
    def _conversation_limits(p: dict) -> ConversationLimits:
        return ConversationLimits(max_turns=p["conversation_max_turns"],
                                  idle_expiry_s=p["conversation_idle_expiry"],
                                  max_conversations=p["max_conversations"])

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Rejects values rclpy's checks let through (choices, device names) and configure-time changes
        while configured; applies run-time ones."""
        configured = self._worker is not None
        for parameter in parameters:
            spec: Optional[ParameterSpec] = PARAMETERS_BY_NAME.get(parameter.name)
            per_camera = parameter.name.split(".")[-1] in CAMERA_INPUTS and "." in parameter.name
            if (configured and (per_camera or (spec is not None and spec.changes == AT_CONFIGURE))
                    and parameter.value != self.get_parameter(parameter.name).value):
                return SetParametersResult(successful=False, reason=(
                    f"{parameter.name} is read when the node is configured: it changes only while the node "
                    f"is unconfigured (run the cleanup transition first; state now: {self.lifecycle_state})"))
            problem = spec.problem(parameter.value) if spec is not None else None
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        if not hasattr(self, "_conversations"):  # still declaring
            return SetParametersResult(successful=True)
        changed = {parameter.name: parameter.value for parameter in parameters}
        values = {**self._parameter_values(), **changed}
        self._conversations.update_limits(self._conversation_limits(values))
        if self._worker is not None:
            self._worker.update_settings(**vars(self._worker_settings(values)))
        self.get_logger().info(f"parameters changed: {changed}")
        return SetParametersResult(successful=True)

    # ---- the model ------------------------------------------------------------------------------------
    def _load_pipeline(self):
        import torch

        from lisa_core.pipeline import LisaPipeline

        p = self._configured_values
        if p["cpu_threads"] > 0:
            torch.set_num_threads(p["cpu_threads"])
        if self._model.needs_writing:
            self.get_logger().warning(f"writing the {self._model.label} to {self._model.path}")
            write_tiny_preset(self._model.path)
        quantization = p["quantization"]
        return LisaPipeline.from_pretrained(
            self._model.path, device=p["device"], dtype=p["precision"],
            quantization=None if quantization == "none" else quantization)

    # ---- interfaces -----------------------------------------------------------------------------------
    def _create_command_interfaces(self, channel: CameraChannel, p: dict) -> None:
        channel.result_pub = self.create_publisher(SegmentationResultMsg, channel.name_of(p["result_topic"]),
                                                   RESULT_QOS)
        self.create_subscription(String, channel.name_of(p["query_topic"]),
                                 lambda msg: self._on_query(channel, msg), COMMAND_QOS)
        self.create_subscription(Empty, channel.name_of(p["stop_topic"]),
                                 lambda _msg: self._on_stop(channel), COMMAND_QOS)

        # rclpy awaits a callback only when it is a coroutine function itself (not a lambda returning one).
        async def on_segment(request, response):
            return await self._on_segment(channel, request, response)

        async def on_goal(goal):
            return await self._on_goal(channel, goal)

        self.create_service(Segment, channel.name_of(p["segment_service"]), on_segment,
                            callback_group=self._awaiting_group)
        self.create_service(ResetConversation, channel.name_of(p["reset_conversation_service"]),
                            self._on_reset_conversation)
        ActionServer(self, QueryAction, channel.name_of(p["query_action"]), execute_callback=on_goal,
                     callback_group=self._awaiting_group,
                     goal_callback=lambda _request: GoalResponse.ACCEPT,
                     cancel_callback=lambda _goal: CancelResponse.ACCEPT)

    def _create_outputs(self, channel: CameraChannel, p: dict) -> None:
        kinds = dict(mask_topic=Image, centroid_topic=PointStamped, target_point_topic=PointStamped,
                     explanation_topic=String, overlay_topic=Image, target_cloud_topic=PointCloud2,
                     markers_topic=MarkerArray)
        channel.outputs = {name: self.create_publisher(kind, channel.name_of(p[name]), OUTPUT_QOS)
                           for name, kind in kinds.items()}

    def _input_topic(self, channel: CameraChannel, p: dict, name: str) -> str:
        own = p.get(f"{channel.name}.{name}") if channel.name else None
        return own or channel.name_of(p[name])

    def _subscribe_camera(self, channel: CameraChannel, p: dict) -> None:
        image_topic = self._input_topic(channel, p, "image_topic")
        if p["image_transport"] == "compressed":
            image_topic = f"{image_topic}/{COMPRESSED_SUFFIX}"
            image_type = CompressedImage
        else:
            image_type = Image
        channel.image_topic = self.resolve_topic_name(image_topic)
        inputs = [(image_type, image_topic, lambda msg: self._on_image(channel, msg))]
        depth_topic = self._input_topic(channel, p, "depth_topic")
        if p["depth_topic"] or (channel.name and p.get(f"{channel.name}.depth_topic")):
            inputs += [(Image, depth_topic, lambda msg: self._on_depth(channel, msg)),
                       (CameraInfo, self._input_topic(channel, p, "camera_info_topic"),
                        lambda msg: self._on_camera_info(channel, msg))]
        for message_type, topic, callback in inputs:
            subscribe = self._subscriber(channel, message_type, topic, callback)
            if p["image_reliability"] == "auto":
                channel.pending_subscriptions[topic] = subscribe
            else:
                subscribe(p["image_reliability"] == "reliable")
        if channel.pending_subscriptions:
            self._match_publishers(channel)

    def _subscriber(self, channel: CameraChannel, message_type, topic: str, callback) -> Callable[[bool], None]:
        def subscribe(reliable: bool) -> None:
            channel.subscriptions.append(self.create_subscription(message_type, topic, callback,
                                                                  _sensor_qos(reliable)))
            channel.reliability[self.resolve_topic_name(topic)] = "reliable" if reliable else "best_effort"
            self.get_logger().info(f"subscribed to {self.resolve_topic_name(topic)} "
                                   f"({'reliable' if reliable else 'best effort'})")
        return subscribe

    def _match_publishers(self, channel: CameraChannel) -> None:
        """`auto` reliability: subscribes to each pending topic as reliably as its publishers allow;
        topics with no publisher yet are looked at again every PUBLISHER_POLL_S."""
        for topic, subscribe in list(channel.pending_subscriptions.items()):
            publishers = self.get_publishers_info_by_topic(self.resolve_topic_name(topic))
            if not publishers:
                continue
            del channel.pending_subscriptions[topic]
            subscribe(all(info.qos_profile.reliability == ReliabilityPolicy.RELIABLE for info in publishers))
        if channel.pending_subscriptions:
            timer = self.create_timer(PUBLISHER_POLL_S, lambda: (self.destroy_timer(timer),
                                                                 self._match_publishers(channel)))

    # ---- inputs (executor thread) ------------------------------------------------------------------------
    def _on_image(self, channel: CameraChannel, msg) -> None:
        channel.counts["frames"] += 1
        channel.frames_in.tick()
        channel.last_frame_at = time.monotonic()
        try:
            # checked now, converted or decoded only if the worker takes it (most frames are replaced first)
            if isinstance(msg, CompressedImage):  # damage inside the file shows only when decoded
                self._check_frame_size(*check_compressed_imgmsg(msg))
            else:
                self._check_colour_message(msg)
        except InputError as error:
            channel.counts["bad_frames"] += 1
            self.report_error(f"bad image on {channel.image_topic}: {error}", channel)
            return
        if self._worker is not None:
            self._worker.submit_frame(Frame(msg, msg.header, time.monotonic(), next(self._frame_keys),
                                            channel.name))

    def _check_frame_size(self, height: int, width: int) -> None:
        pixels, limit = width * height, self.get_parameter("max_image_pixels").value
        if pixels > limit:
            raise InputError(f"{width}x{height} is {pixels} pixels, more than max_image_pixels ({limit})")
        if width and height:  # zero sizes are refused by the message checks, with their own message
            check_aspect_ratio(height, width)

    def _check_colour_message(self, msg: Image) -> None:
        """InputError unless `msg` converts to an rgb8 frame the node takes; converts nothing."""
        self._check_frame_size(int(msg.height), int(msg.width))
        if msg.encoding not in COLOUR_ENCODINGS:
            raise InputError(f"encoding {msg.encoding!r} is not a colour or mono8 image "
                             f"(expected one of {', '.join(COLOUR_ENCODINGS)})")
        check_imgmsg(msg)

    def _colour_image(self, msg: Image) -> np.ndarray:
        self._check_colour_message(msg)
        return imgmsg_to_cv2(msg, "rgb8")

    def _on_depth(self, channel: CameraChannel, msg: Image) -> None:
        pixels, limit = int(msg.width) * int(msg.height), self.get_parameter("max_image_pixels").value
        try:
            if pixels > limit:
                raise InputError(f"{msg.width}x{msg.height} is more than max_image_pixels ({limit})")
            if msg.encoding not in DEPTH_SCALE_TO_METRES:
                raise InputError(f"unsupported depth encoding {msg.encoding!r}; expected one of "
                                 f"{', '.join(DEPTH_SCALE_TO_METRES)}")
            depth = imgmsg_to_cv2(msg)
        except InputError as error:
            channel.counts["bad_depth"] += 1
            self.report_error(f"bad depth image: {error}", channel)
            return
        item = (_stamp_ns(msg.header), depth, msg.encoding)
        with self._lock:
            channel.depth_images.append(item)
            for inputs in channel.awaiting_depth:
                inputs.offer(item)
            self._depth_arrived.notify_all()

    def _on_camera_info(self, channel: CameraChannel, msg: CameraInfo) -> None:
        channel.camera_info = msg

    def _on_query(self, channel: CameraChannel, msg: String) -> None:
        self._submit(Query(f"q-{next(self._query_numbers)}", msg.data, time.monotonic(), channel.name))

    def _on_stop(self, channel: CameraChannel) -> None:
        stopped = self._worker.stop_tracking(channel.name) if self._worker is not None else None
        self.get_logger().info(f"tracking of {stopped} stopped" if stopped else "stop: nothing was tracked")

    def _on_reset_conversation(self, request, response):
        response.forgotten = self._conversations.reset(request.conversation_id)
        self.get_logger().info(f"conversation {request.conversation_id or '(all)'} reset: "
                               f"{response.forgotten} forgotten")
        return response

    def _submit(self, query: Query) -> None:
        worker = self._worker
        if self._closing:
            self._refused_at_close += 1
            self._publish_outcome(self._refusal(query, Status.SHUTTING_DOWN, "node shutting down: query not answered"))
        elif worker is None:
            reason = (f"model not loaded: {self._model_error}" if self._model_error else
                      f"model not loaded: the node is {self.lifecycle_state} (configure and activate it)")
            self._publish_outcome(self._refusal(query, Status.MODEL_NOT_LOADED, reason))
        else:
            worker.submit(query)

    @staticmethod
    def _refusal(query: Query, status: Status, reason: str) -> Outcome:
        return Outcome(query, None, None, reason, time.monotonic() - query.received, status)

    def _query_from_request(self, channel: CameraChannel, request, on_progress=None,
                            cancel_requested=None) -> tuple[Query, Optional[Outcome]]:
        """The Query of a service request or action goal, and its refusal when its image is unusable."""
        query = Query(request.query_id or f"q-{next(self._query_numbers)}", request.query, time.monotonic(),
                      channel.name, conversation_id=request.conversation_id,
                      max_new_tokens=int(request.max_new_tokens), on_progress=on_progress)
        if cancel_requested is not None:
            query.cancel_requested = cancel_requested
        if not request.use_image:
            return query, None
        try:
            image = self._colour_image(request.image)
            check_aspect_ratio(*image.shape[:2])
        except InputError as error:
            return query, self._refusal(query, Status.BAD_IMAGE, f"bad image in the request: {error}")
        query.image = Frame(image, request.image.header, time.monotonic(), next(self._frame_keys), channel.name)
        return query, None

    async def _await_outcome(self, query: Query, refusal: Optional[Outcome], timeout: Optional[float]):
        """Submits `query` (or publishes its refusal) and waits for its result message; None on timeout."""
        answer = Future(executor=self.executor)
        answer.add_done_callback(lambda _: None)  # so that completing it from the worker wakes the executor
        timer = (self.create_timer(timeout, lambda: answer.done() or answer.set_result(None),
                                   callback_group=self._awaiting_group) if timeout is not None else None)
        with self._lock:
            self._waiting[id(query)] = answer
        try:
            if refusal is not None:
                self._publish_outcome(refusal)
            else:
                self._submit(query)
            return await answer
        finally:
            if timer is not None:
                self.destroy_timer(timer)
            with self._lock:
                self._waiting.pop(id(query), None)

    async def _on_segment(self, channel: CameraChannel, request: Segment.Request,
                          response: Segment.Response) -> Segment.Response:
        query, refusal = self._query_from_request(channel, request)
        timeout = self.get_parameter("service_timeout").value
        result = await self._await_outcome(query, refusal, timeout)
        response.result = result if result is not None else SegmentationResultMsg(
            camera=channel.name, query_id=query.id, query=request.query, status=Status.TIMEOUT, success=False,
            conversation_id=request.conversation_id,
            error=f"timed out after {timeout} s (service_timeout); the outcome will still be published on "
                  "the result topic")
        return response

    async def _on_goal(self, channel: CameraChannel, goal):
        def feedback(stage: str, text: str, tokens: int) -> None:
            goal.publish_feedback(QueryAction.Feedback(stage=ACTION_STAGES[stage], text=text, tokens=tokens))

        query, refusal = self._query_from_request(channel, goal.request, on_progress=feedback,
                                                  cancel_requested=lambda: goal.is_cancel_requested)
        result = await self._await_outcome(query, refusal, None)
        if result.status == Status.CANCELLED and goal.is_cancel_requested:
            goal.canceled()
        elif result.status == Status.OK:
            goal.succeed()
        else:
            goal.abort()
        return QueryAction.Result(result=result)

    # ---- outputs (worker thread, or the submitting thread for refused queries) ---------------------------
    def _publish_outcome(self, outcome: Outcome) -> None:
        if self._closing and not rclpy.ok(context=self.context):
            return
        channel = self._channels[outcome.query.camera]
        header = outcome.frame.header if outcome.frame is not None else Header(
            stamp=self.get_clock().now().to_msg())
        message = SegmentationResultMsg(
            header=header, camera=channel.name, query_id=outcome.query.id, query=outcome.query.text,
            conversation_id=outcome.query.conversation_id, history_turns=outcome.history_turns,
            turns_dropped=outcome.turns_dropped, notes=outcome.notes, tracked=outcome.tracked,
            status=int(outcome.status), success=outcome.success, latency_s=float(outcome.latency_s))
        if outcome.success:
            message.answer = outcome.result.answer
            message.targets = self._publish_targets(channel, outcome, header)
        else:
            message.error = outcome.error
        channel.result_pub.publish(message)

        with self._lock:
            waiting = self._waiting.get(id(outcome.query))
        if waiting is not None and not outcome.tracked and not waiting.done():
            waiting.set_result(message)

        channel.outcomes.add(outcome.status, tracked=outcome.tracked)
        if outcome.success:
            channel.latencies.add(outcome.latency_s)
            if not outcome.tracked:
                self.get_logger().info(f"{outcome.query.id} answered in {outcome.latency_s:.2f} s: "
                                       f"{outcome.result.answer!r} ({len(outcome.result.targets)} targets)")
        else:
            channel.last_error = f"{outcome.query.id}: {outcome.error}"
            self.get_logger().warning(f"{outcome.query.id} ({outcome.query.text[:80]!r}) failed: {outcome.error}")
            self._report_event("query failed")

    def _publish_targets(self, channel: CameraChannel, outcome: Outcome, header: Header) -> list:
        """Publishes mask, centroids, answer, cloud, markers and overlay; returns the Target messages."""
        result, outputs = outcome.result, channel.outputs
        depth, no_depth_reason, info = self._depth_for(channel, outcome.frame)
        messages, geometries = [], []
        for target in result.targets:
            message = TargetMsg(mask=cv2_to_imgmsg(target.mask.astype(np.uint8) * 255, "mono8", header),
                                confidence=float(target.confidence), area_px=int(target.area))
            geometry = target_geometry(target.mask, target.centroid, depth, no_depth_reason)
            if target.centroid is not None:
                message.centroid_px = Point(x=target.centroid[0], y=target.centroid[1])
                x0, y0, x1, y1 = target.box
                message.box = RegionOfInterest(x_offset=x0, y_offset=y0, width=x1 - x0 + 1, height=y1 - y0 + 1)
            fill_target_geometry(message, geometry)
            messages.append(message)
            geometries.append(geometry)
        if not outputs:  # cleaned up while this answer was being computed: the result topic still gets it
            return messages

        optical_header = Header(stamp=header.stamp, frame_id=(info.header.frame_id if info is not None else "")
                                or header.frame_id)
        outputs["mask_topic"].publish(cv2_to_imgmsg(result.union_mask.astype(np.uint8) * 255, "mono8", header))
        main = main_target_index(result.targets)
        if main is not None:
            centroid = result.targets[main].centroid
            outputs["centroid_topic"].publish(PointStamped(header=header, point=Point(x=centroid[0], y=centroid[1])))
            point = geometries[main].centroid_3d
            if point is not None:
                outputs["target_point_topic"].publish(PointStamped(header=optical_header,
                                                                   point=Point(x=point[0], y=point[1], z=point[2])))
            elif depth is None and self._configured_values.get("depth_topic"):
                self.report_error(f"{outcome.query.id}: no 3D point: {no_depth_reason}", channel)
        if not outcome.tracked:
            outputs["explanation_topic"].publish(String(data=result.answer))
        if depth is not None and outputs["target_cloud_topic"].get_subscription_count() > 0:
            xyz, index = cloud_points([t.mask for t in result.targets], depth,
                                      self.get_parameter("max_cloud_points").value)
            outputs["target_cloud_topic"].publish(cloud_message(xyz, index, optical_header))
        if outputs["markers_topic"].get_subscription_count() > 0:
            outputs["markers_topic"].publish(marker_array(list(enumerate(geometries)), result.answer,
                                                          optical_header))
        if self.get_parameter("publish_overlay").value and outputs["overlay_topic"].get_subscription_count() > 0:
            caption = overlay_caption(outcome.query.id, result.answer, outcome.tracked,
                                      untrained=self._model.label == UNTRAINED_TINY_LABEL)
            outputs["overlay_topic"].publish(cv2_to_imgmsg(draw_overlay(outcome.frame.image, result.targets, caption),
                                                           "rgb8", header))
        return messages

    def _prepare_frame(self, frame: Frame) -> Frame:
        """The frame the worker takes (worker thread), converted to rgb8, with the depth images and the
        camera info buffered now, and offered those that arrive until it is answered: however long the
        answer takes, its frame's depth is still there."""
        channel = self._channels[frame.camera]
        if isinstance(frame.image, Image):
            frame = dataclasses.replace(frame, image=imgmsg_to_cv2(frame.image, "rgb8"))
        elif isinstance(frame.image, CompressedImage):
            frame = dataclasses.replace(frame, image=compressed_imgmsg_to_cv2(frame.image, "rgb8"))
        with self._lock:
            inputs = FrameInputs(_stamp_ns(frame.header), tuple(channel.depth_images), channel.camera_info)
            channel.awaiting_depth.append(inputs)
        return dataclasses.replace(frame, paired=inputs)

    def _depth_for(self, channel: CameraChannel, frame: Frame):
        """(DepthView or None, why not, the camera info) for an answer on `frame`: the depth image closest
        in stamp among those buffered when the worker took the frame, the closest of those that came
        after, and those buffered now; if none is within depth_max_offset, waits up to depth_wait for
        one while the depth stream has not passed the frame."""
        taken: FrameInputs = frame.paired
        max_offset_ns = self.get_parameter("depth_max_offset").value * 1e9
        deadline = time.monotonic() + self.get_parameter("depth_wait").value
        with self._lock:
            while True:
                later = [taken.closest_later] if taken.closest_later is not None else []
                depth_images = [*taken.depth_images, *later, *channel.depth_images]
                if any(abs(stamp - taken.stamp_ns) <= max_offset_ns for stamp, _, _ in depth_images):
                    break
                # Wait only while the stream flows and has not passed the frame: its depth may be in transit.
                passed = bool(depth_images) and max(stamp for stamp, _, _ in depth_images) > taken.stamp_ns + max_offset_ns
                remaining = deadline - time.monotonic()
                if not channel.depth_images or passed or remaining <= 0:
                    break
                self._depth_arrived.wait(remaining)
            if taken in channel.awaiting_depth:
                channel.awaiting_depth.remove(taken)
        info = taken.camera_info or channel.camera_info
        depth, reason = pair_depth(depth_images, taken.stamp_ns, tuple(frame.image.shape[:2]),
                                   self.get_parameter("depth_max_offset").value, info.k if info is not None else None)
        return depth, reason, info

    # ---- diagnostics ------------------------------------------------------------------------------------
    def report_error(self, text: str, channel: Optional[CameraChannel] = None) -> None:
        """Logs and reports on /diagnostics (on `channel`, or on every camera's status when None); the
        same text again within a second only updates last_error."""
        channels = [channel] if channel is not None else list(self._channels.values())
        repeated = all(c.last_error == text for c in channels) and time.monotonic() - self._last_event_report < 1.0
        for c in channels:
            c.last_error = text
        if not repeated:
            self.get_logger().warning(text)
            self._report_event("bad input")

    def _report_event(self, event: str) -> None:
        self._last_event_report = time.monotonic()
        self._publish_diagnostics()

    def _model_state(self, worker: Optional[InferenceWorker]) -> str:
        if worker is not None:
            return "loaded" if worker.model_loaded else "loading"
        return "failed" if self._model_error else "unloaded"

    def _publish_diagnostics(self) -> None:
        if self._closing and not rclpy.ok(context=self.context):
            return
        worker, state = self._worker, self.lifecycle_state
        p = self._parameter_values()
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        for channel in self._channels.values():
            seconds_since_frame = (time.monotonic() - channel.last_frame_at
                                   if channel.last_frame_at is not None else None)
            report = health.assess(
                model_state=self._model_state(worker), model_error=self._model_error,
                seconds_since_frame=seconds_since_frame,
                max_image_age=p["max_image_age"] if state == "active" else 0.0,
                queue_length=worker.queue_length if worker else 0, queue_size=p["queue_size"],
                fps_in=channel.frames_in.rate(), latency_p50=channel.latencies.percentile(50),
                latency_p95=channel.latencies.percentile(95), counts=channel.outcomes.snapshot(),
                last_error=channel.last_error, active=state == "active")
            values = {**report.values, **{key: str(count) for key, count in channel.counts.items()},
                      "lifecycle_state": state, "camera": channel.name,
                      "model": self._model.label if self._model else "",
                      "model_path": str(self._model.path) if self._model else "",
                      "busy": str(bool(worker and worker.busy)).lower(),
                      "tracking": (worker.tracking_query_id(channel.name) if worker else None) or "",
                      "image_topic": channel.image_topic,
                      "image_reliability": ", ".join(f"{topic}: {kind}" for topic, kind in
                                                     channel.reliability.items()),
                      "conversations": str(len(self._conversations))}
            array.status.append(DiagnosticStatus(
                level=DIAGNOSTIC_LEVELS[report.level],
                name=f"{self.get_fully_qualified_name()}: {channel.name or 'camera'}",
                message=report.message, hardware_id=p["device"],
                values=[KeyValue(key=key, value=value) for key, value in values.items()]))
        self._diagnostics_pub.publish(array)

    # ---- shutdown -------------------------------------------------------------------------------------
    def _answer_what_arrived(self) -> None:
        """Runs the callbacks of what reached the node before close (closing: each query is refused
        SHUTTING_DOWN) when the node is in an executor that is not spinning."""
        executor = self.executor
        if executor is None:
            return
        start = time.monotonic()
        quiet_until = start + SHUTDOWN_DRAIN_S
        while time.monotonic() < min(quiet_until, start + SHUTDOWN_DRAIN_MAX_S):
            taken = self._refused_at_close
            executor.spin_once(timeout_sec=SHUTDOWN_DRAIN_S / 10)
            if self._refused_at_close != taken:
                quiet_until = time.monotonic() + SHUTDOWN_DRAIN_S

    def close(self) -> None:
        """Stops the worker (queued queries get SHUTTING_DOWN outcomes); inference still running after
        SHUTDOWN_WORKER_WAIT_S is abandoned. Queries that arrived but were not taken yet are refused
        SHUTTING_DOWN too. Waits briefly for the results to be delivered."""
        self._closing = True
        self._stop_taking_work("node shutting down")
        self._release_model()
        self._answer_what_arrived()
        self._publish_diagnostics()
        for channel in self._channels.values():
            if not channel.result_pub.wait_for_all_acked(Duration(seconds=SHUTDOWN_DELIVERY_WAIT_S)):
                self.get_logger().warning("results not acknowledged by every subscriber at shutdown")
