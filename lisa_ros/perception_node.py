"""The `lisa_perception` node: camera frames and instructions in; masks, centroids and answers out.
lisa_ros.node runs it.

Threads: one executor thread converts messages and hands work over (the segment service awaits its
answer as a coroutine, so it never blocks that thread); one InferenceWorker thread owns the model.
Outcomes are published from the worker thread (rclpy publishers are thread-safe). A single-threaded
executor costs far less per frame than rclpy's multi-threaded one (bench/results_node.md).

QoS, on purpose:
- camera, depth and camera info: best effort, keep last 1 (sensor data). A best-effort subscription
  matches both reliable and best-effort publishers, and keeping only the newest frame means a busy
  node never works through a backlog. Frames over ~0.5 MB (640x480 rgb8 and up) leave Fast DDS's
  default shared memory and go over UDP in fragments, and best effort loses most of them: run the
  camera driver (and the node) with config/fastdds_large_frames.xml (see that file; bench/results_node.md
  has the numbers), or set `image_reliability: reliable`, which then matches reliable publishers only.
- instructions and stop: reliable, keep all, so no instruction of a burst is lost in transit (each
  is taken at once; the node's own bounded queue decides what to drop, and says so).
- results (mask, centroids, answer, SegmentationResult, overlay): reliable, keep last 10; the result
  topic keeps all: a keep-last writer overwrites outcomes its readers have not acknowledged yet, and
  a burst of 'queue full' errors lost ~4% of 400 that way; subscribe keep-all to get every outcome.
- status: reliable, transient local, keep last 1: a late subscriber gets the current state at once.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from typing import Optional

import numpy as np
import rclpy
from geometry_msgs.msg import Point, PointStamped
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from std_msgs.msg import Empty, Header, String

from lisa_core.errors import InputError
from lisa_core.overlay import draw_overlay
from lisa_core.preprocess import check_aspect_ratio
from lisa_core.result import Target
from lisa_ros.geometry import DEPTH_SCALE_TO_METRES, Intrinsics, depth_in_metres, target_point
from lisa_ros.image_conv import cv2_to_imgmsg, imgmsg_to_cv2
from lisa_ros.model_source import UNTRAINED_TINY_LABEL, ModelSource, resolve_model, write_tiny_preset
from lisa_ros.msg import SegmentationResult as SegmentationResultMsg
from lisa_ros.msg import Target as TargetMsg
from lisa_ros.parameters import PARAMETERS, PARAMETERS_BY_NAME, ParameterSpec
from lisa_ros.srv import Segment
from lisa_ros.worker import Frame, InferenceWorker, Outcome, Query, WorkerSettings

NODE_NAME = "lisa_perception"
COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_BUFFER_LENGTH = 10  # recent depth images (as received) kept for pairing with frames by stamp
SHUTDOWN_WORKER_WAIT_S = 1.0
# The process exits right after close(): results still in flight (a frame-sized mask takes a while)
# would be lost, and with them a query's only outcome.
SHUTDOWN_DELIVERY_WAIT_S = 0.5


def _stamp_ns(header: Header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def _main_target(targets: list[Target]) -> Optional[Target]:
    """The target with the highest confidence among non-empty ones (the first on a tie)."""
    candidates = [t for t in targets if t.area > 0]
    return max(candidates, key=lambda t: t.confidence) if candidates else None


class PerceptionNode(Node):
    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        self._worker: Optional[InferenceWorker] = None
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._declare_parameters()
        p = self._parameter_values()

        self._model: ModelSource = resolve_model(p["model_path"], p["model_cache_dir"] or None)
        self._frame_keys = itertools.count(1)
        self._query_numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._depth_images: deque = deque(maxlen=DEPTH_BUFFER_LENGTH)
        self._camera_info: Optional[CameraInfo] = None
        self._waiting_services: dict[int, Future] = {}  # id(query) -> its service call's answer
        self._counts = dict(queries=0, results=0, errors=0, dropped=0, tracked=0, frames=0, bad_frames=0,
                            bad_depth=0, bad_queries=0)
        self._last_latency_s: Optional[float] = None
        self._last_error: Optional[str] = None
        self._last_bad_input_report = 0.0
        self._closing = False

        image_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1,
            reliability=(ReliabilityPolicy.RELIABLE if p["image_reliability"] == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT))
        command_qos = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
        output_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                                reliability=ReliabilityPolicy.RELIABLE)
        result_qos = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
        status_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)

        self._mask_pub = self.create_publisher(Image, p["mask_topic"], output_qos)
        self._centroid_pub = self.create_publisher(PointStamped, p["centroid_topic"], output_qos)
        self._point_pub = self.create_publisher(PointStamped, p["target_point_topic"], output_qos)
        self._explanation_pub = self.create_publisher(String, p["explanation_topic"], output_qos)
        self._overlay_pub = self.create_publisher(Image, p["overlay_topic"], output_qos)
        self._result_pub = self.create_publisher(SegmentationResultMsg, p["result_topic"], result_qos)
        self._status_pub = self.create_publisher(String, p["status_topic"], status_qos)

        self._image_topic = self.resolve_topic_name(p["image_topic"])
        self.create_subscription(Image, p["image_topic"], self._on_image, image_qos)
        if p["depth_topic"]:
            self.create_subscription(Image, p["depth_topic"], self._on_depth, image_qos)
            self.create_subscription(CameraInfo, p["camera_info_topic"], self._on_camera_info, image_qos)
        self.create_subscription(String, p["query_topic"], self._on_query, command_qos)
        self.create_subscription(Empty, p["stop_topic"], self._on_stop, command_qos)
        self.create_service(Segment, p["segment_service"], self._on_segment)
        if p["status_rate_hz"] > 0:
            self.create_timer(1.0 / p["status_rate_hz"], lambda: self._publish_status("heartbeat"))

        self._worker = InferenceWorker(
            load_pipeline=self._load_pipeline, on_outcome=self._publish_outcome, on_state=self._publish_status,
            settings=self._worker_settings(p), frame_source=self._image_topic,
            log_error=lambda text: self.get_logger().error(text))
        self.get_logger().info(f"model: {self._model.label}; loading from {self._model.path} on "
                               f"{p['device']} ({p['precision']})")
        self._publish_status("starting")
        self._worker.start()

    # ---- parameters ---------------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        for spec in PARAMETERS:
            descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
            if spec.choices:
                descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
            if spec.limits is not None and isinstance(spec.default, int) and not isinstance(spec.default, bool):
                descriptor.integer_range = [IntegerRange(from_value=int(spec.limits[0]),
                                                         to_value=int(spec.limits[1]), step=1)]
            elif spec.limits is not None:
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(spec.limits[0]),
                                                                      to_value=float(spec.limits[1]), step=0.0)]
            self.declare_parameter(spec.name, spec.default, descriptor)

    def _parameter_values(self) -> dict:
        return {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS}

    @staticmethod
    def _worker_settings(p: dict) -> WorkerSettings:
        return WorkerSettings(queue_size=p["queue_size"], overflow_policy=p["overflow_policy"],
                              max_image_age=p["max_image_age"], max_new_tokens=p["max_new_tokens"],
                              max_query_chars=p["max_query_chars"], min_confidence=p["min_confidence"],
                              tracking=p["tracking"],
                              track_rate_hz=p["track_rate_hz"])

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Rejects values rclpy's type and range checks let through (choices, device names)."""
        for parameter in parameters:
            spec: Optional[ParameterSpec] = PARAMETERS_BY_NAME.get(parameter.name)
            problem = spec.problem(parameter.value) if spec is not None else None
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        if self._worker is not None:
            changed = {parameter.name: parameter.value for parameter in parameters}
            values = {**self._parameter_values(), **changed}
            self._worker.update_settings(**vars(self._worker_settings(values)))
            self.get_logger().info(f"parameters changed: {changed}")
        return SetParametersResult(successful=True)

    # ---- the model ------------------------------------------------------------------------------------
    def _load_pipeline(self):
        import torch

        from lisa_core.pipeline import LisaPipeline

        if self.get_parameter("cpu_threads").value > 0:
            torch.set_num_threads(self.get_parameter("cpu_threads").value)

        if self._model.needs_writing:
            self.get_logger().warning(f"writing the {self._model.label} to {self._model.path}")
            write_tiny_preset(self._model.path)
        quantization = self.get_parameter("quantization").value
        return LisaPipeline.from_pretrained(
            self._model.path, device=self.get_parameter("device").value,
            dtype=self.get_parameter("precision").value,
            quantization=None if quantization == "none" else quantization)

    # ---- inputs (executor threads) ---------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self._count("frames")
        try:
            image = self._colour_image(msg)
        except InputError as error:
            self._count("bad_frames")
            self.report_error(f"bad image on {self._image_topic}: {error}")
            return
        self._worker.submit_frame(Frame(image, msg.header, time.monotonic(), next(self._frame_keys)))

    def _colour_image(self, msg: Image) -> np.ndarray:
        pixels, limit = int(msg.width) * int(msg.height), self.get_parameter("max_image_pixels").value
        if pixels > limit:
            raise InputError(f"{msg.width}x{msg.height} is {pixels} pixels, more than max_image_pixels ({limit})")
        if msg.width and msg.height:  # zero sizes are refused by the conversion, with their own message
            check_aspect_ratio(msg.height, msg.width)
        if msg.encoding not in COLOUR_ENCODINGS:
            raise InputError(f"encoding {msg.encoding!r} is not a colour or mono8 image "
                             f"(expected one of {', '.join(COLOUR_ENCODINGS)})")
        return imgmsg_to_cv2(msg, "rgb8")

    def _on_depth(self, msg: Image) -> None:
        pixels, limit = int(msg.width) * int(msg.height), self.get_parameter("max_image_pixels").value
        try:
            if pixels > limit:
                raise InputError(f"{msg.width}x{msg.height} is more than max_image_pixels ({limit})")
            if msg.encoding not in DEPTH_SCALE_TO_METRES:
                raise InputError(f"unsupported depth encoding {msg.encoding!r}; expected one of "
                                 f"{', '.join(DEPTH_SCALE_TO_METRES)}")
            depth = imgmsg_to_cv2(msg)
        except InputError as error:
            self._count("bad_depth")
            self.report_error(f"bad depth image: {error}")
            return
        with self._lock:
            self._depth_images.append((msg.header, depth, msg.encoding))

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._camera_info = msg

    def _on_query(self, msg: String) -> None:
        self._submit(Query(f"q-{next(self._query_numbers)}", msg.data, time.monotonic()))

    def _on_stop(self, _msg: Empty) -> None:
        stopped = self._worker.stop_tracking()
        self.get_logger().info(f"tracking of {stopped} stopped" if stopped else "stop: nothing was tracked")
        self._publish_status("tracking stopped")

    def _submit(self, query: Query) -> None:
        self._count("queries")
        self._worker.submit(query)

    async def _on_segment(self, request: Segment.Request, response: Segment.Response) -> Segment.Response:
        query = Query(request.query_id or f"q-{next(self._query_numbers)}", request.query, time.monotonic())
        answer = Future(executor=self.executor)
        answer.add_done_callback(lambda _: None)  # so that completing it from the worker wakes the executor
        timeout = self.get_parameter("service_timeout").value
        timer = self.create_timer(timeout, lambda: answer.done() or answer.set_result(None))
        with self._lock:
            self._waiting_services[id(query)] = answer
        try:
            if request.use_image:
                try:
                    query.image = Frame(self._colour_image(request.image), request.image.header,
                                        time.monotonic(), next(self._frame_keys))
                except InputError as error:
                    self._count("queries")
                    self._publish_outcome(Outcome(query, None, None, f"bad image in the request: {error}",
                                                  time.monotonic() - query.received))
            if not answer.done():
                self._submit(query)
            result = await answer
        finally:
            self.destroy_timer(timer)
            with self._lock:
                self._waiting_services.pop(id(query), None)
        response.result = result if result is not None else SegmentationResultMsg(
            query_id=query.id, query=request.query, success=False,
            error=f"timed out after {timeout} s (service_timeout); the outcome will still be published on "
                  "the result topic")
        return response

    # ---- outputs (worker thread, or the submitting thread for dropped queries) --------------------------
    def _publish_outcome(self, outcome: Outcome) -> None:
        if self._closing and not rclpy.ok(context=self.context):
            return
        header = outcome.frame.header if outcome.frame is not None else Header(
            stamp=self.get_clock().now().to_msg())
        message = SegmentationResultMsg(header=header, query_id=outcome.query.id, query=outcome.query.text,
                                        tracked=outcome.tracked, success=outcome.success,
                                        latency_s=float(outcome.latency_s))
        if outcome.success:
            message.answer = outcome.result.answer
            message.targets = self._publish_targets(outcome, header)
        else:
            message.error = outcome.error
        self._result_pub.publish(message)

        with self._lock:
            waiting = self._waiting_services.get(id(outcome.query))
        if waiting is not None and not outcome.tracked and not waiting.done():
            waiting.set_result(message)

        if outcome.success:
            self._count("tracked" if outcome.tracked else "results")
            with self._lock:
                self._last_latency_s = outcome.latency_s
            if not outcome.tracked:  # tracked frames show in the heartbeat's counts, not one status each
                self.get_logger().info(f"{outcome.query.id} answered in {outcome.latency_s:.2f} s: "
                                       f"{outcome.result.answer!r} ({len(outcome.result.targets)} targets)")
                self._publish_status("result", outcome.query.id)
        else:
            self._count("dropped" if outcome.error.startswith("dropped") else
                        "bad_queries" if outcome.error.startswith("bad query:") else "errors")
            with self._lock:
                self._last_error = f"{outcome.query.id}: {outcome.error}"
            self.get_logger().warning(f"{outcome.query.id} ({outcome.query.text[:80]!r}) failed: {outcome.error}")
            self._publish_status("error", outcome.query.id)

    def _publish_targets(self, outcome: Outcome, header: Header) -> list:
        """Publishes mask, centroids, answer and overlay; returns the Target messages for the result."""
        result, frame = outcome.result, outcome.frame
        depth_m, intrinsics, no_depth_reason = self._depth_for(header, result.image_size)
        messages, points = [], {}
        for index, target in enumerate(result.targets):
            message = TargetMsg(mask=cv2_to_imgmsg(target.mask.astype(np.uint8) * 255, "mono8", header),
                                confidence=float(target.confidence), area_px=int(target.area))
            if target.centroid is not None:
                message.centroid_px = Point(x=target.centroid[0], y=target.centroid[1])
                x0, y0, x1, y1 = target.box
                message.box = RegionOfInterest(x_offset=x0, y_offset=y0, width=x1 - x0 + 1, height=y1 - y0 + 1)
                if depth_m is not None:
                    point = target_point(target.mask, target.centroid, depth_m, intrinsics)
                    if point is not None:
                        points[index] = point
                        message.centroid_3d = Point(x=point[0], y=point[1], z=point[2])
                        message.centroid_3d_valid = True
            messages.append(message)

        self._mask_pub.publish(cv2_to_imgmsg(result.union_mask.astype(np.uint8) * 255, "mono8", header))
        main = _main_target(result.targets)
        if main is not None:
            self._centroid_pub.publish(PointStamped(header=header, point=Point(x=main.centroid[0],
                                                                               y=main.centroid[1])))
            main_index = next(i for i, t in enumerate(result.targets) if t is main)
            if main_index in points:
                x, y, z = points[main_index]
                point_header = Header(stamp=header.stamp, frame_id=self._camera_info.header.frame_id
                                      or header.frame_id)
                self._point_pub.publish(PointStamped(header=point_header, point=Point(x=x, y=y, z=z)))
            elif no_depth_reason is not None and self.get_parameter("depth_topic").value:
                self.report_error(f"{outcome.query.id}: no 3D point: {no_depth_reason}")
        if not outcome.tracked:
            self._explanation_pub.publish(String(data=result.answer))
        if self.get_parameter("publish_overlay").value and self._overlay_pub.get_subscription_count() > 0:
            caption = (f"{'[untrained tiny preset] ' if self._model.label == UNTRAINED_TINY_LABEL else ''}"
                       f"{outcome.query.id}{' (tracked)' if outcome.tracked else ''}: {result.answer}")
            self._overlay_pub.publish(cv2_to_imgmsg(draw_overlay(frame.image, result.targets, caption),
                                                    "rgb8", header))
        return messages

    def _depth_for(self, header: Header, image_size):
        """(depth in metres, intrinsics, None) for the frame, or (None, None, why not)."""
        with self._lock:
            depth_images = list(self._depth_images)
        info = self._camera_info
        if not depth_images:
            return None, None, "no depth image received"
        if info is None:
            return None, None, "no camera info received"
        stamp = _stamp_ns(header)
        depth_header, depth, encoding = min(depth_images, key=lambda item: abs(_stamp_ns(item[0]) - stamp))
        offset_s = abs(_stamp_ns(depth_header) - stamp) / 1e9
        if offset_s > self.get_parameter("depth_max_offset").value:
            return None, None, f"the closest depth image is {offset_s:.3f} s from the frame (depth_max_offset)"
        if depth.shape != tuple(image_size):
            return None, None, (f"depth is {depth.shape[1]}x{depth.shape[0]}, the frame "
                                f"{image_size[1]}x{image_size[0]}: depth must be registered to the frame")
        try:
            return depth_in_metres(depth, encoding), Intrinsics.from_k(info.k), None
        except InputError as error:
            return None, None, str(error)

    # ---- status ---------------------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def report_error(self, text: str) -> None:
        """Logs and reports on status; the same text again within a second only updates last_error."""
        now = time.monotonic()
        with self._lock:
            repeated = text == self._last_error and now - self._last_bad_input_report < 1.0
            self._last_error = text
            if not repeated:
                self._last_bad_input_report = now
        if not repeated:
            self.get_logger().warning(text)
            self._publish_status("bad input")

    def _publish_status(self, event: str, query_id: Optional[str] = None) -> None:
        worker = self._worker
        with self._lock:
            status = {
                "node": self.get_fully_qualified_name(),
                "event": event,
                "query_id": query_id,
                "model": self._model.label,
                "model_path": str(self._model.path),
                "model_loaded": bool(worker and worker.model_loaded),
                "model_error": worker.model_error if worker else None,
                "busy": bool(worker and worker.busy),
                "queue_length": worker.queue_length if worker else 0,
                "queue_size": worker.settings.queue_size if worker else None,
                "tracking": worker.tracking_query_id if worker else None,
                "last_latency_s": self._last_latency_s,
                "last_error": self._last_error,
                "counts": dict(self._counts),
            }
        if self._closing and not rclpy.ok(context=self.context):
            return
        self._status_pub.publish(String(data=json.dumps(status)))

    # ---- shutdown -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the worker (queued queries get a 'shutting down' error); inference still running
        after SHUTDOWN_WORKER_WAIT_S is abandoned."""
        self._closing = True
        if not self._worker.stop(SHUTDOWN_WORKER_WAIT_S):
            self.get_logger().warning("inference still running at shutdown: abandoned")
        self._publish_status("stopped")
        if not self._result_pub.wait_for_all_acked(Duration(seconds=SHUTDOWN_DELIVERY_WAIT_S)):
            self.get_logger().warning("results not acknowledged by every subscriber at shutdown")
