"""A small rclpy client of the perception node: publishes frames and instructions, collects what the
node publishes. The demo, the benchmark and the tests use it; robot code would subscribe directly.

Its node spins in a background thread; collected messages are lists under `lock`, and `wait_for`
polls a condition on them.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Optional

import numpy as np
import rclpy
from geometry_msgs.msg import PointStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Empty, Header, String

from lisa_ros.image_conv import cv2_to_imgmsg
from lisa_ros.msg import SegmentationResult
from lisa_ros.srv import Segment

# The node's default names (relative, so the client's namespace applies).
TOPICS = dict(image="camera/image_raw", depth="camera/depth/image_raw", camera_info="camera/camera_info",
              query="lisa/query", stop="lisa/stop", mask="lisa/mask", centroid="lisa/centroid",
              target_point="lisa/target_point", explanation="lisa/explanation", result="lisa/result",
              overlay="lisa/overlay", status="lisa/status", segment="lisa/segment")

RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
STATUS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.TRANSIENT_LOCAL)
CAMERA = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)


def stamp_ns(header: Header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


class PerceptionClient:
    def __init__(self, context, namespace: str = "", name: str = "lisa_client", camera: bool = True,
                 subscribe_overlay: bool = False, topics: Optional[dict] = None):
        topics = {**TOPICS, **(topics or {})}
        self.node = rclpy.create_node(name, namespace=namespace, context=context)
        self.lock = threading.Lock()
        self.results: list[SegmentationResult] = []
        self.result_times: list[int] = []  # time.time_ns() when each result arrived
        self.masks: list[Image] = []
        self.centroids: list[PointStamped] = []
        self.target_points: list[PointStamped] = []
        self.explanations: list[str] = []
        self.overlays: list[Image] = []
        self.statuses: list[dict] = []
        self.image_pub = self.node.create_publisher(Image, topics["image"], CAMERA) if camera else None
        self.depth_pub = self.node.create_publisher(Image, topics["depth"], CAMERA) if camera else None
        self.camera_info_pub = self.node.create_publisher(CameraInfo, topics["camera_info"], CAMERA) if camera else None
        self.query_pub = self.node.create_publisher(String, topics["query"], RELIABLE)
        self.stop_pub = self.node.create_publisher(Empty, topics["stop"], RELIABLE)
        self._collect(SegmentationResult, topics["result"], self.results, arrivals=self.result_times)
        self._collect(Image, topics["mask"], self.masks)
        self._collect(PointStamped, topics["centroid"], self.centroids)
        self._collect(PointStamped, topics["target_point"], self.target_points)
        self._collect(String, topics["explanation"], self.explanations, lambda m: m.data)
        self._collect(String, topics["status"], self.statuses, lambda m: json.loads(m.data), STATUS)
        if subscribe_overlay:
            self._collect(Image, topics["overlay"], self.overlays)
        self.segment_client = self.node.create_client(Segment, topics["segment"])
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

    def segment(self, request: Segment.Request, timeout_s: float = 60.0) -> SegmentationResult:
        if not self.segment_client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError("the segment service is not available")
        future = self.segment_client.call_async(request)
        if not self.wait_for(future.done, timeout_s):
            raise TimeoutError(f"no response from the segment service after {timeout_s} s")
        return future.result().result
