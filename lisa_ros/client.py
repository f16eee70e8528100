"""A small rclpy client of the perception node: publishes frames and instructions, collects what the
node publishes, asks through the service and the action, and drives the lifecycle. The demo, the
benchmarks and the tests use it; robot code would subscribe directly.

Its node spins in a background thread; collected messages are lists under `lock`, and `wait_for`
polls a condition on them. `statuses` holds the node's /diagnostics entries for this client's camera,
each as a dict (see `status_from_diagnostic`).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PointStamped
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Empty, Header, String
from visualization_msgs.msg import MarkerArray

from lisa_ros.action import Query as QueryAction
from lisa_ros.image_conv import cv2_to_imgmsg
from lisa_ros.msg import SegmentationResult
from lisa_ros.parameters import DEFAULT_NAMES, NODE_NAME
from lisa_ros.srv import ResetConversation, Segment
from lisa_ros.status import Status

RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
CAMERA = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
TRANSITIONS = {name: getattr(Transition, f"TRANSITION_{name.upper()}")
               for name in ("configure", "activate", "deactivate", "cleanup")}


def stamp_ns(header: Header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def status_from_diagnostic(status: DiagnosticStatus) -> dict:
    """One camera's diagnostic entry as a dict: every key/value, plus typed fields: level (int),
    message, model_loaded, model_error (the load error or None), busy, queue_length, last_error (or
    None), and counts (frames, bad_frames, bad_depth, tracked and one per status label, as ints)."""
    values = {value.key: value.value for value in status.values}
    count_keys = ["frames", "bad_frames", "bad_depth", "tracked", *(s.label for s in Status)]
    return {**values, "level": int.from_bytes(status.level, "little") if isinstance(status.level, bytes)
            else int(status.level), "message": status.message, "name": status.name,
            "model_loaded": values.get("model_state") == "loaded",
            "model_error": values.get("model_load_error") or None,
            "busy": values.get("busy") == "true",
            "queue_length": int(values.get("queue", "0/0").split("/")[0]),
            "last_error": values.get("last_error") or None,
            "counts": {key: int(values[key]) for key in count_keys if key in values}}


class PerceptionClient:
    def __init__(self, context, namespace: str = "", name: str = "lisa_client", camera: bool = True,
                 subscribe_overlay: bool = False, topics: Optional[dict] = None, node_name: str = NODE_NAME,
                 camera_name: str = ""):
        """`namespace`: the node's namespace. `camera_name`: one of the node's `cameras` (its topics are
        under that name); "" for the single default camera. `topics` overrides DEFAULT_NAMES entries."""
        names = {**DEFAULT_NAMES, **(topics or {})}
        prefix = f"{camera_name}/" if camera_name else ""
        names = {key: value if value.startswith("/") else prefix + value for key, value in names.items()}
        self.node = rclpy.create_node(name, namespace=namespace, context=context)
        self.camera_name = camera_name
        node_namespace = self.node.get_namespace().rstrip("/")
        self.node_path = f"{node_namespace}/{node_name}"
        self.lock = threading.Lock()
        self.results: list[SegmentationResult] = []
        self.result_times: list[int] = []  # time.time_ns() when each result arrived
        self.masks: list[Image] = []
        self.centroids: list[PointStamped] = []
        self.target_points: list[PointStamped] = []
        self.explanations: list[str] = []
        self.overlays: list[Image] = []
        self.clouds: list[PointCloud2] = []
        self.markers: list[MarkerArray] = []
        self.statuses: list[dict] = []
        self.image_pub = self.node.create_publisher(Image, names["image_topic"], CAMERA) if camera else None
        self.depth_pub = self.node.create_publisher(Image, names["depth_topic"], CAMERA) if camera else None
        self.camera_info_pub = (self.node.create_publisher(CameraInfo, names["camera_info_topic"], CAMERA)
                                if camera else None)
        self.query_pub = self.node.create_publisher(String, names["query_topic"], RELIABLE)
        self.stop_pub = self.node.create_publisher(Empty, names["stop_topic"], RELIABLE)
        self._collect(SegmentationResult, names["result_topic"], self.results, arrivals=self.result_times)
        self._collect(Image, names["mask_topic"], self.masks)
        self._collect(PointStamped, names["centroid_topic"], self.centroids)
        self._collect(PointStamped, names["target_point_topic"], self.target_points)
        self._collect(String, names["explanation_topic"], self.explanations, lambda m: m.data)
        self._collect(PointCloud2, names["target_cloud_topic"], self.clouds)
        self._collect(MarkerArray, names["markers_topic"], self.markers)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RELIABLE)
        if subscribe_overlay:
            self._collect(Image, names["overlay_topic"], self.overlays)
        self.segment_client = self.node.create_client(Segment, names["segment_service"])
        self.reset_client = self.node.create_client(ResetConversation, names["reset_conversation_service"])
        self.action_client = ActionClient(self.node, QueryAction, names["query_action"])
        self._executor = SingleThreadedExecutor(context=context)
        self._executor.add_node(self.node)
        self._running = True
        self._thread = threading.Thread(target=self._spin, name="lisa-client", daemon=True)
        self._thread.start()

    def _collect(self, message_type, topic: str, into: list, convert: Callable = lambda m: m,
                 qos: QoSProfile = RELIABLE, arrivals: Optional[list] = None) -> None:
        def store(message):
            arrived = time.time_ns()
            with self.lock:
                into.append(convert(message))
                if arrivals is not None:
                    arrivals.append(arrived)
        self.node.create_subscription(message_type, topic, store, qos)

    def _on_diagnostics(self, array: DiagnosticArray) -> None:
        wanted = f"{self.node_path.lstrip('/')}: {self.camera_name or 'camera'}"
        for status in array.status:
            if status.name.lstrip("/") == wanted:
                with self.lock:
                    self.statuses.append(status_from_diagnostic(status))

    def _spin(self) -> None:
        while self._running and self._executor.context.ok():
            self._executor.spin_once(timeout_sec=0.05)

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)
        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()

    # ---- waiting --------------------------------------------------------------------------------
    def wait_for(self, condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def wait_for_node(self, timeout_s: float = 60.0) -> dict:
        """Waits until the node reports its model loaded (or failed) and matches the query topic."""
        def ready():
            with self.lock:
                loaded = any(s["model_loaded"] or s["model_error"] for s in self.statuses)
            return loaded and self.query_pub.get_subscription_count() > 0
        if not self.wait_for(ready, timeout_s):
            raise TimeoutError(f"no ready perception node after {timeout_s} s")
        with self.lock:
            return self.statuses[-1]

    def frames_received(self) -> int:
        """The node's count of frames received on this camera, as last reported (0 before any report)."""
        with self.lock:
            return self.statuses[-1]["counts"]["frames"] if self.statuses else 0

    # ---- sending --------------------------------------------------------------------------------
    def publish_frame(self, image: np.ndarray, stamp_ns_value: int, frame_id: str = "camera_optical",
                      encoding: str = "rgb8") -> Header:
        header = Header(frame_id=frame_id)
        header.stamp.sec, header.stamp.nanosec = divmod(int(stamp_ns_value), 1_000_000_000)
        self.image_pub.publish(cv2_to_imgmsg(image, encoding, header))
        return header

    def publish_depth(self, depth: np.ndarray, header: Header, encoding: str = "16UC1") -> None:
        self.depth_pub.publish(cv2_to_imgmsg(depth, encoding, header))

    def publish_camera_info(self, header: Header, k, width: int, height: int) -> None:
        self.camera_info_pub.publish(CameraInfo(header=header, width=width, height=height, k=[float(v) for v in k],
                                                distortion_model="plumb_bob", d=[0.0] * 5))

    def query(self, text: str, timeout_s: float = 60.0) -> SegmentationResult:
        """Publishes an instruction and waits for the first new untracked result with that text."""
        with self.lock:
            seen = len(self.results)
        self.query_pub.publish(String(data=text))
        found: list = []

        def answered():
            with self.lock:
                found[:] = [r for r in self.results[seen:] if not r.tracked and r.query == text.strip()]
            return bool(found)
        if not self.wait_for(answered, timeout_s):
            raise TimeoutError(f"no result for {text!r} after {timeout_s} s")
        return found[0]

    def stop_tracking(self) -> None:
        self.stop_pub.publish(Empty())

    def _call(self, client, request, timeout_s: float, what: str):
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"{what} is not available")
        future = client.call_async(request)
        if not self.wait_for(future.done, timeout_s):
            raise TimeoutError(f"no response from {what} after {timeout_s} s")
        return future.result()

    def segment(self, request: Segment.Request, timeout_s: float = 60.0) -> SegmentationResult:
        return self._call(self.segment_client, request, timeout_s, "the segment service").result

    def reset_conversation(self, conversation_id: str = "", timeout_s: float = 10.0) -> int:
        request = ResetConversation.Request(conversation_id=conversation_id)
        return self._call(self.reset_client, request, timeout_s, "the reset service").forgotten

    def send_goal(self, goal: QueryAction.Goal, feedback: Optional[list] = None, timeout_s: float = 10.0):
        """Sends an action goal; feedback messages are appended to `feedback` (with their arrival
        time.monotonic()) as they come. Returns the accepted goal handle."""
        if not self.action_client.wait_for_server(timeout_sec=timeout_s):
            raise TimeoutError("the query action is not available")

        def on_feedback(message):
            if feedback is not None:
                with self.lock:
                    feedback.append((time.monotonic(), message.feedback))
        future = self.action_client.send_goal_async(goal, feedback_callback=on_feedback)
        if not self.wait_for(future.done, timeout_s):
            raise TimeoutError("the goal was not accepted in time")
        return future.result()

    def goal_result(self, goal_handle, timeout_s: float = 60.0) -> SegmentationResult:
        future = goal_handle.get_result_async()
        if not self.wait_for(future.done, timeout_s):
            raise TimeoutError(f"no action result after {timeout_s} s")
        return future.result().result.result

    # ---- lifecycle ------------------------------------------------------------------------------
    def lifecycle_state(self, timeout_s: float = 10.0) -> str:
        client = self.node.create_client(GetState, f"{self.node_path}/get_state")
        try:
            return self._call(client, GetState.Request(), timeout_s, "get_state").current_state.label
        finally:
            self.node.destroy_client(client)

    def change_state(self, transition: str, timeout_s: float = 60.0) -> bool:
        """Asks for a transition by name (configure, activate, deactivate, cleanup); True on success."""
        client = self.node.create_client(ChangeState, f"{self.node_path}/change_state")
        try:
            request = ChangeState.Request(transition=Transition(id=TRANSITIONS[transition]))
            return self._call(client, request, timeout_s, "change_state").success
        finally:
            self.node.destroy_client(client)
