"""`lisa-bag BAG --out DIR`: answers instructions on a recorded rosbag2 as the perception node would,
and writes the node's outputs into a new bag. No ROS install needed: bags are read and written with
the `rosbags` library (pip install lisa_ros[bag]).

What the node would have done, replayed in bag time (the receive/log time of each message):
- a query at time t is answered on the newest frame logged at or before t; it fails with 'no frame'
  before the first frame and with 'frame too old' when that frame was logged more than
  --max-image-age before t;
- depth is paired with the frame by header stamp (lisa_ros.geometry.pair_depth) among the last
  DEPTH_BUFFER_LENGTH depth images and the newest camera info logged at or before t;
- the model runs in the node's InferenceWorker, so instructions are cleaned and refused, and model
  errors reported, in the node's words.
Every query gets exactly one SegmentationResult, written at the query's time; mask, centroid,
target point, explanation and (with depth) target cloud follow the node's rules, with the frame's
header. Instructions come from the bag's query topic or from --queries FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sqlite3
import sys
import time
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import cv2
import numpy as np
from rosbags.interfaces import Nodetype
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore, get_types_from_msg
from tqdm import tqdm

from lisa_core.errors import ConfigurationError, InputError, LisaError
from lisa_core.overlay import draw_overlay
from lisa_core.result import Target
from lisa_ros.geometry import DepthView, TargetGeometry, cloud_points, pair_depth, target_geometry
from lisa_ros.image_conv import compressed_imgmsg_to_cv2, imgmsg_to_cv2
from lisa_ros.model_source import UNTRAINED_TINY_LABEL, ModelSource, is_model_dir, resolve_model, write_tiny_preset
from lisa_ros.outputs import CLOUD_POINT, DEPTH_BUFFER_LENGTH, main_target_index, overlay_caption
from lisa_ros.parameters import PACKAGE, PARAMETERS_BY_NAME, PRECISIONS
from lisa_ros.status import Status
from lisa_ros.worker import Frame, InferenceWorker, Outcome, Query, WorkerSettings

# The package's own message types the outputs use, each after the ones it refers to.
INTERFACE_TYPES = ("Target", "SegmentationResult")
# Where a pip-installed package keeps its copy of msg/ (setup.py puts it there).
PACKAGED_INTERFACES = Path("interfaces") / "msg"
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
BAG_VERSION = 8  # the rosbag2 format ROS 2 Jazzy writes
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
STRING = "std_msgs/msg/String"
POINT_STAMPED = "geometry_msgs/msg/PointStamped"
POINT_CLOUD2 = "sensor_msgs/msg/PointCloud2"
RESULT = "lisa_ros/msg/SegmentationResult"
VIDEO_CODEC = "mp4v"


class BagError(LisaError):
    """A bag, topic, file or option the tool cannot use; the message names the problem."""


def node_default(name: str) -> Any:
    return PARAMETERS_BY_NAME[name].default


def absolute_topic(name: str) -> str:
    """The node's relative topic names as they resolve in the root namespace (bags record those)."""
    return name if name.startswith("/") else "/" + name


def stamp_ns(header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


# ---- message types ------------------------------------------------------------------------------------

def interface_dirs() -> list[Path]:
    """Where the package's .msg files may be: the source tree, the copy installed with the Python
    package, then share/lisa_ros/msg under each prefix on AMENT_PREFIX_PATH (a colcon install)."""
    package_dir = Path(__file__).resolve().parent
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    return ([package_dir.parent / "msg", package_dir / PACKAGED_INTERFACES]
            + [prefix / "share" / PACKAGE / "msg" for prefix in prefixes])


def typestore():
    """ROS 2 Jazzy's message types plus lisa_ros/msg/Target and SegmentationResult from their .msg files."""
    candidates = interface_dirs()
    folder = next((d for d in candidates if all((d / f"{n}.msg").is_file() for n in INTERFACE_TYPES)), None)
    if folder is None:
        raise BagError(f"the lisa_ros message definitions ({', '.join(n + '.msg' for n in INTERFACE_TYPES)}) "
                       f"are in none of: {', '.join(map(str, candidates))}")
    store = get_typestore(Stores.ROS2_JAZZY)
    types: dict = {}
    for name in INTERFACE_TYPES:
        types.update(get_types_from_msg((folder / f"{name}.msg").read_text(), f"{PACKAGE}/msg/{name}"))
    store.register(types)
    return store


# ROS defaults other than zero, empty or false (rosbags' field definitions carry no defaults).
_NONZERO_DEFAULTS = {"geometry_msgs/msg/Quaternion": {"w": 1.0}}
_NUMPY_NAMES = {"byte": "uint8", "char": "uint8"}


def new_message(store, msgtype: str, **values):
    """A typestore message of `msgtype` holding `values`, every other field at its ROS default."""
    values = {**_NONZERO_DEFAULTS.get(msgtype, {}), **values}
    for name, (kind, detail) in store.fielddefs[msgtype][1]:
        if name not in values:
            values[name] = _default_value(store, kind, detail)
    return store.types[msgtype](**values)


def _default_value(store, kind: int, detail):
    if kind == Nodetype.NAME:
        return new_message(store, detail)
    if kind == Nodetype.BASE:
        name = detail[0]
        return "" if name in ("string", "wstring") else False if name == "bool" else 0.0 if "float" in name else 0
    (element_kind, element), length = detail
    if element_kind == Nodetype.BASE and element[0] not in ("string", "wstring"):
        return np.zeros(length if kind == Nodetype.ARRAY else 0, np.dtype(_NUMPY_NAMES.get(element[0], element[0])))
    return [_default_value(store, element_kind, element) for _ in range(length if kind == Nodetype.ARRAY else 0)]


# ---- outputs: the one place a lisa_core result becomes messages ------------------------------------

@dataclass(frozen=True)
class OutputTopics:
    result: str
    mask: str
    centroid: str
    target_point: str
    explanation: str
    target_cloud: str

    @classmethod
    def node_defaults(cls) -> "OutputTopics":
        return cls(**{field.name: absolute_topic(node_default(f"{field.name}_topic")) for field in fields(cls)})


@dataclass
class Answer:
    """One query's outcome in bag terms, with what the outputs are made of."""

    outcome: Outcome
    header: Any  # the frame's header, or one stamped with the query's time when there was no frame
    geometries: list[TargetGeometry]
    depth: Optional[DepthView]
    point_frame_id: str  # the camera info's frame, else the frame's


def outcome_messages(store, answer: Answer, topics: OutputTopics, max_cloud_points: int) -> list[tuple[str, Any]]:
    """(topic, typestore message) pairs the node publishes for `answer`, the result first."""
    outcome, header = answer.outcome, answer.header
    result = new_message(store, RESULT, header=header, status=int(outcome.status), query_id=outcome.query.id,
                         query=outcome.query.text, history_turns=outcome.history_turns,
                         turns_dropped=outcome.turns_dropped, notes=outcome.notes, tracked=outcome.tracked,
                         success=outcome.success, latency_s=float(outcome.latency_s), error=outcome.error or "")
    if not outcome.success:
        return [(topics.result, result)]
    lisa = outcome.result
    result.answer = lisa.answer
    result.targets = [_target_message(store, t, g, header) for t, g in zip(lisa.targets, answer.geometries)]
    messages = [(topics.result, result), (topics.mask, _mono8(store, lisa.union_mask, header))]
    main = main_target_index(lisa.targets)
    point_header = new_message(store, "std_msgs/msg/Header", stamp=header.stamp, frame_id=answer.point_frame_id)
    if main is not None:
        x, y = lisa.targets[main].centroid
        messages.append((topics.centroid, new_message(store, POINT_STAMPED, header=header,
                                                      point=_point(store, (x, y, 0.0)))))
        if answer.geometries[main].centroid_3d is not None:
            messages.append((topics.target_point, new_message(
                store, POINT_STAMPED, header=point_header, point=_point(store, answer.geometries[main].centroid_3d))))
    messages.append((topics.explanation, new_message(store, STRING, data=lisa.answer)))
    if answer.depth is not None and lisa.targets:
        xyz, index = cloud_points([t.mask for t in lisa.targets], answer.depth, max_cloud_points)
        messages.append((topics.target_cloud, _cloud(store, xyz, index, point_header)))
    return messages


def _point(store, xyz) -> Any:
    return new_message(store, "geometry_msgs/msg/Point", x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))


def _mono8(store, mask: np.ndarray, header) -> Any:
    height, width = mask.shape
    return new_message(store, IMAGE, header=header, height=height, width=width, encoding="mono8", step=width,
                       data=(mask.astype(np.uint8) * 255).reshape(-1))


def _target_message(store, target: Target, geometry: TargetGeometry, header) -> Any:
    message = new_message(store, "lisa_ros/msg/Target", mask=_mono8(store, target.mask, header),
                          confidence=float(target.confidence), area_px=int(target.area),
                          depth_error=geometry.depth_error)
    if target.centroid is not None:
        message.centroid_px = _point(store, (*target.centroid, 0.0))
        x0, y0, x1, y1 = target.box
        message.box = new_message(store, "sensor_msgs/msg/RegionOfInterest", x_offset=x0, y_offset=y0,
                                  width=x1 - x0 + 1, height=y1 - y0 + 1)
    if geometry.interior_px is not None:
        message.interior_px = _point(store, (*geometry.interior_px, 0.0))
        message.interior_clearance_px = float(geometry.interior_clearance_px)
    if geometry.centroid_3d is not None:
        message.centroid_3d, message.centroid_3d_valid = _point(store, geometry.centroid_3d), True
    if geometry.interior_3d is not None:
        message.interior_3d, message.interior_3d_valid = _point(store, geometry.interior_3d), True
    if geometry.box_3d_center is not None:
        message.box_3d_center = new_message(store, "geometry_msgs/msg/Pose",
                                            position=_point(store, geometry.box_3d_center))
        x, y, z = geometry.box_3d_size
        message.box_3d_size = new_message(store, "geometry_msgs/msg/Vector3", x=x, y=y, z=z)
        message.box_3d_valid = True
    return message


def _cloud(store, xyz: np.ndarray, index: np.ndarray, header) -> Any:
    points = np.empty(len(index), CLOUD_POINT)
    points["x"], points["y"], points["z"], points["target"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], index
    datatypes = {np.dtype("<f4"): 7, np.dtype("<u4"): 6}  # sensor_msgs/PointField FLOAT32, UINT32
    point_fields = [new_message(store, "sensor_msgs/msg/PointField", name=name, offset=offset,
                                datatype=datatypes[dtype], count=1)
                    for name, (dtype, offset) in CLOUD_POINT.fields.items()]
    return new_message(store, POINT_CLOUD2, header=header, height=1, width=len(points), fields=point_fields,
                       point_step=CLOUD_POINT.itemsize, row_step=CLOUD_POINT.itemsize * len(points),
                       data=points.view(np.uint8).reshape(-1), is_dense=True)


def outcome_record(answer: Answer, time_s: float) -> dict:
    """One JSON line of --jsonl: the query, its status and answer, and each target's 2D and 3D values."""
    outcome = answer.outcome
    targets = []
    if outcome.success:
        for target, geometry in zip(outcome.result.targets, answer.geometries):
            targets.append({
                "confidence": target.confidence,
                "area_px": target.area,
                "centroid_px": list(target.centroid) if target.centroid is not None else None,
                "box": list(target.box) if target.box is not None else None,
                "interior_px": list(geometry.interior_px) if geometry.interior_px is not None else None,
                "interior_clearance_px": geometry.interior_clearance_px,
                "centroid_3d": _listed(geometry.centroid_3d),
                "interior_3d": _listed(geometry.interior_3d),
                "box_3d_center": _listed(geometry.box_3d_center),
                "box_3d_size": _listed(geometry.box_3d_size),
                "depth_error": geometry.depth_error,
            })
    return {"time_s": round(time_s, 9), "query_id": outcome.query.id, "query": outcome.query.text,
            "status": outcome.status.label, "error": outcome.error or "",
            "answer": outcome.result.answer if outcome.success else "",
            "frame_stamp_ns": stamp_ns(answer.header) if outcome.frame is not None else None,
            "targets": targets}


def _listed(values) -> Optional[list]:
    return None if values is None else [float(v) for v in values]


# ---- reading the bag ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputTopics:
    image: str
    depth: Optional[str]
    camera_info: Optional[str]
    query: Optional[str]  # None: the instructions come from a file


@dataclass
class Moment:
    """What the node holds when a query arrives: the newest frame, recent depth, the camera info."""

    query_ns: int
    text: str
    frame: Optional[tuple[int, int, Any]]  # (log time ns, index, image message)
    depth_images: list[tuple[int, np.ndarray, str]]  # (header stamp ns, array, encoding)
    camera_info: Optional[Any]


def read_queries(path: Path) -> list[tuple[float, str]]:
    """`<seconds from the bag's start> <instruction>` lines; blank lines and # comments are skipped."""
    if not path.is_file():
        raise BagError(f"queries file {path} not found")
    queries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        seconds, _, text = line.partition(" ")
        try:
            offset = float(seconds)
        except ValueError:
            offset = -1.0
        if not offset >= 0.0 or not text.strip():
            raise BagError(f"{path}:{number}: expected '<seconds from the bag's start> <instruction>' with "
                           f"seconds >= 0, got {line!r}")
        queries.append((offset, text.strip()))
    return queries


class BagReader:
    """A rosbag2 (folder, .db3 or .mcap) opened with rosbags; errors name the bag and the problem."""

    def __init__(self, path: Path, store):
        if not path.exists():
            raise BagError(f"bag {path} not found")
        self.path, self.store = path, store
        try:
            self.reader = Reader(path)
            self.reader.open()
        except (ReaderError, sqlite3.DatabaseError, FileNotFoundError) as error:
            raise self._corrupt(error) from error

    def close(self) -> None:
        self.reader.close()

    def _corrupt(self, error: Exception) -> BagError:
        return BagError(f"bag {self.path} is truncated or corrupt: {error}")

    @property
    def storage(self) -> str:
        files = [self.path] if self.path.is_file() else list(self.path.iterdir())
        return "mcap" if any(".mcap" in f.suffixes for f in files) else "sqlite3"

    def listed_topics(self) -> str:
        return ", ".join(f"{name} ({info.msgtype})" for name, info in sorted(self.reader.topics.items())) or "none"

    def topic_type(self, topic: str, accepted: Sequence[str], option: str) -> str:
        """The message type of `topic`, which must be in the bag and of an accepted type."""
        if topic not in self.reader.topics:
            raise BagError(f"topic {topic} ({option}) is not in bag {self.path}; its topics: {self.listed_topics()}")
        msgtype = self.reader.topics[topic].msgtype
        if msgtype not in accepted:
            raise BagError(f"topic {topic} ({option}) carries {msgtype}; expected {' or '.join(accepted)}")
        return msgtype

    def messages(self, topics: Optional[set[str]]) -> Iterator[tuple[Any, int, bytes]]:
        """(connection, log time ns, raw data) in log-time order; all topics when `topics` is None."""
        connections = [c for c in self.reader.connections if topics is None or c.topic in topics]
        try:
            yield from self.reader.messages(connections=connections)
        except (ReaderError, sqlite3.DatabaseError, EOFError, OSError) as error:
            raise self._corrupt(error) from error

    def count(self, topics: Optional[set[str]]) -> int:
        return sum(c.msgcount for c in self.reader.connections if topics is None or c.topic in topics)

    def deserialize(self, raw: bytes, connection, log_ns: int):
        try:
            return self.store.deserialize_cdr(raw, connection.msgtype)
        except Exception as error:  # rosbags raises several kinds on bytes that do not parse
            raise self._corrupt(ValueError(
                f"the {connection.msgtype} message on {connection.topic} at "
                f"{(log_ns - self.reader.start_time) / 1e9:.3f} s does not parse: {type(error).__name__}: {error}"
            )) from error


def moments(bag: BagReader, topics: InputTopics, file_queries: Optional[list[tuple[float, str]]],
            messages: Iterator[tuple[Any, int, bytes]]) -> Iterator[Moment]:
    """Replays `messages` (in log-time order) and yields the node's state at each query's time.

    A query at time t sees every frame, depth image and camera info logged at or before t.
    """
    start = bag.reader.start_time
    pending = deque(sorted((start + round(s * 1e9), text) for s, text in file_queries or ()))
    frame, frame_count, camera_info = None, 0, None
    depth_images: deque = deque(maxlen=DEPTH_BUFFER_LENGTH)

    def due(before_ns: Optional[int]) -> Iterator[Moment]:
        while pending and (before_ns is None or pending[0][0] < before_ns):
            query_ns, text = pending.popleft()
            yield Moment(query_ns, text, frame, list(depth_images), camera_info)

    for connection, log_ns, raw in messages:
        yield from due(log_ns)
        if connection.topic == topics.image:
            frame_count += 1
            frame = (log_ns, frame_count, bag.deserialize(raw, connection, log_ns))
        elif connection.topic == topics.depth:
            message = bag.deserialize(raw, connection, log_ns)
            try:
                depth = imgmsg_to_cv2(message)
            except InputError as error:
                raise BagError(f"bad depth image on {topics.depth} at {(log_ns - start) / 1e9:.3f} s: "
                               f"{error}") from error
            depth_images.append((stamp_ns(message.header), depth, message.encoding))
        elif connection.topic == topics.camera_info:
            camera_info = bag.deserialize(raw, connection, log_ns)
        elif connection.topic == topics.query:
            pending.append((log_ns, bag.deserialize(raw, connection, log_ns).data))
    yield from due(None)


def frame_image(message, topic: str, log_s: float) -> np.ndarray:
    """The frame as HxWx3 RGB; a frame that cannot be converted stops the run, naming it."""
    try:
        if message.__msgtype__ == COMPRESSED_IMAGE:
            return compressed_imgmsg_to_cv2(message)
        return imgmsg_to_cv2(message, "rgb8")
    except InputError as error:
        raise BagError(f"frame on {topic} at {log_s:.3f} s cannot be used: {error}") from error


# ---- the run ----------------------------------------------------------------------------------------------

class Answerer:
    """The node's InferenceWorker, asked one query at a time."""

    def __init__(self, model: ModelSource, device: str, precision: str, settings: WorkerSettings,
                 image_topic: str, log):
        self.model = model
        self._device, self._precision = device, precision
        self._outcomes: "queue.Queue[Outcome]" = queue.Queue()
        self.worker = InferenceWorker(load_pipeline=self._load_pipeline, on_outcome=self._outcomes.put,
                                      on_state=lambda event: None, settings=settings,
                                      frame_source=lambda camera: image_topic, log_error=log)
        self.worker.start()

    def _load_pipeline(self):
        from lisa_core.pipeline import LisaPipeline

        if self.model.needs_writing:
            write_tiny_preset(self.model.path)
        return LisaPipeline.from_pretrained(self.model.path, device=self._device, dtype=self._precision)

    def answer(self, moment: Moment, number: int, image: Optional[np.ndarray]) -> Outcome:
        """The outcome of the query at `moment`, whose frame is `image`. The query carries its frame (as
        the segment service's use_image does) unless the frame is too old: then the worker gets that
        frame as its newest, received as long ago as its bag age, and refuses it in the node's words.
        Without a frame the worker has none yet (queries come in time order) and says so."""
        query = Query(f"q-{number}", moment.text, time.monotonic())
        if moment.frame is not None:
            log_ns, key, message = moment.frame
            age_s = (moment.query_ns - log_ns) / 1e9
            max_age = self.worker.settings.max_image_age
            if 0 < max_age < age_s:
                self.worker.submit_frame(Frame(image, message.header, time.monotonic() - age_s, key))
            else:
                query.image = Frame(image, message.header, time.monotonic(), key)
        self.worker.submit(query)
        return self._outcomes.get()

    def close(self) -> None:
        self.worker.stop(timeout=1.0)


class VideoOut:
    """The overlays of answered frames as an mp4 (opened on the first frame, at its size)."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self.writer, self.size, self.frames = path, fps, None, None, 0

    def add(self, image_rgb: np.ndarray) -> None:
        if self.writer is None:
            self.size = (image_rgb.shape[1], image_rgb.shape[0])
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*VIDEO_CODEC), self.fps, self.size)
            if not self.writer.isOpened():
                raise BagError(f"cannot write video {self.path} (OpenCV's {VIDEO_CODEC} writer did not open)")
        if (image_rgb.shape[1], image_rgb.shape[0]) != self.size:  # a camera that changed resolution
            image_rgb = cv2.resize(image_rgb, self.size)
        self.writer.write(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lisa-bag", description="Answer instructions on a rosbag2's frames as the lisa_ros perception "
                                     "node would, and write the node's outputs into a new bag. No ROS needed.")
    parser.add_argument("bag", type=Path, help="rosbag2 folder (sqlite3 or mcap), or a .db3 / .mcap file")
    parser.add_argument("--out", type=Path, required=True, help="output bag folder (must not exist)")
    parser.add_argument("--storage", choices=tuple(STORAGES), default=None,
                        help="storage of the output bag (default: the input's)")
    parser.add_argument("--image-topic", default=absolute_topic(node_default("image_topic")),
                        help="sensor_msgs/Image or CompressedImage frames (default: %(default)s)")
    parser.add_argument("--depth-topic", nargs="?", const=absolute_topic(node_default("depth_topic")),
                        default=None, help="16UC1/mono16/32FC1 depth registered to the frames; without a "
                                           "value: %(const)s (default: no depth)")
    parser.add_argument("--camera-info-topic", default=absolute_topic(node_default("camera_info_topic")),
                        help="CameraInfo of the frames, used with --depth-topic (default: %(default)s)")
    parser.add_argument("--query-topic", default=absolute_topic(node_default("query_topic")),
                        help="std_msgs/String instructions in the bag (default: %(default)s)")
    parser.add_argument("--queries", type=Path, default=None,
                        help="file of '<seconds from the bag's start> <instruction>' lines (# comments "
                             "allowed), used instead of the query topic")
    parser.add_argument("--max-image-age", type=float, default=node_default("max_image_age"),
                        help="seconds; older frames give 'frame too old', 0 accepts any (default: %(default)s)")
    parser.add_argument("--depth-max-offset", type=float, default=node_default("depth_max_offset"),
                        help="seconds between frame and depth stamps, at most (default: %(default)s)")
    parser.add_argument("--max-cloud-points", type=int, default=node_default("max_cloud_points"),
                        help="points in each target cloud, at most (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: the node's default model)")
    parser.add_argument("--device", default=node_default("device"), help="cpu, cuda or cuda:<index>")
    parser.add_argument("--precision", choices=PRECISIONS, default=node_default("precision"))
    parser.add_argument("--max-new-tokens", type=int, default=node_default("max_new_tokens"),
                        help="longest answer in tokens; 0: the model's default")
    parser.add_argument("--copy-input", action="store_true", help="also copy every input topic to the output")
    parser.add_argument("--video", type=Path, default=None, help="mp4 of the overlays of the answered frames")
    parser.add_argument("--video-fps", type=float, default=2.0, help="frames per second of --video")
    parser.add_argument("--jsonl", type=Path, default=None, help="one JSON line per query")
    return parser.parse_args(argv)


def _check_options(args: argparse.Namespace) -> None:
    problems = [PARAMETERS_BY_NAME["device"].problem(args.device)]
    for name, value in (("max_image_age", args.max_image_age), ("depth_max_offset", args.depth_max_offset),
                        ("max_new_tokens", args.max_new_tokens), ("max_cloud_points", args.max_cloud_points)):
        low, high = PARAMETERS_BY_NAME[name].limits
        if not low <= value <= high:
            problems.append(f"--{name.replace('_', '-')} must be within {low:g}..{high:g}; got {value}")
    if args.video_fps <= 0:
        problems.append(f"--video-fps must be > 0; got {args.video_fps}")
    if args.out.exists():
        problems.append(f"output {args.out} exists already (give a new folder)")
    if args.model is not None and not is_model_dir(args.model):
        problems.append(f"--model {args.model} is not a model folder (no lisa_config.json or config.json)")
    problems = [problem for problem in problems if problem]
    if problems:
        raise BagError(problems[0])


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    store = typestore()
    bag = BagReader(args.bag, store)
    try:
        return _run(args, store, bag)
    finally:
        bag.close()


def _inputs(args: argparse.Namespace, bag: BagReader) -> tuple[InputTopics, Optional[list[tuple[float, str]]]]:
    """The input topics, checked against the bag, and the queries file's queries (None: the query topic)."""
    bag.topic_type(args.image_topic, (IMAGE, COMPRESSED_IMAGE), "--image-topic")
    if args.depth_topic:
        bag.topic_type(args.depth_topic, (IMAGE,), "--depth-topic")
        bag.topic_type(args.camera_info_topic, (CAMERA_INFO,), "--camera-info-topic")
    file_queries = read_queries(args.queries) if args.queries is not None else None
    if file_queries is None:
        if args.query_topic not in bag.reader.topics:
            raise BagError(f"no queries: topic {args.query_topic} (--query-topic) is not in bag {args.bag} and "
                           f"no --queries FILE was given; its topics: {bag.listed_topics()}")
        bag.topic_type(args.query_topic, (STRING,), "--query-topic")
        if bag.count({args.query_topic}) == 0:
            raise BagError(f"no queries: topic {args.query_topic} in bag {args.bag} has no messages "
                           "(give --queries FILE)")
    elif not file_queries:
        raise BagError(f"no queries: {args.queries} holds no '<seconds> <instruction>' line")
    topics = InputTopics(args.image_topic, args.depth_topic, args.camera_info_topic if args.depth_topic else None,
                         None if file_queries is not None else args.query_topic)
    return topics, file_queries


def _run(args: argparse.Namespace, store, bag: BagReader) -> int:
    topics, file_queries = _inputs(args, bag)
    outputs = OutputTopics.node_defaults()
    if args.copy_input and (taken := sorted(set(vars(outputs).values()) & set(bag.reader.topics))):
        raise BagError(f"bag {args.bag} already has the output topics {', '.join(taken)}: "
                       "--copy-input would mix them with the new ones")

    model = resolve_model(str(args.model) if args.model is not None else "")
    settings = WorkerSettings(max_image_age=args.max_image_age, max_new_tokens=args.max_new_tokens)
    print(f"lisa-bag: model: {model.label}; loading from {model.path} on {args.device} ({args.precision})",
          file=sys.stderr, flush=True)
    answerer = Answerer(model, args.device, args.precision, settings, args.image_topic,
                        log=lambda text: tqdm.write(f"lisa-bag: {text}", file=sys.stderr))
    wanted = None if args.copy_input else {t for t in vars(topics).values() if t}
    storage = STORAGES[args.storage or bag.storage]
    video = VideoOut(args.video, args.video_fps) if args.video is not None else None
    jsonl = open(args.jsonl, "w", encoding="utf-8") if args.jsonl is not None else None
    counts = {status: 0 for status in Status}
    try:
        with Writer(args.out, version=BAG_VERSION, storage_plugin=storage) as writer:
            connections = _output_connections(writer, store, outputs, bool(args.depth_topic))
            progress = tqdm(bag.messages(wanted), total=bag.count(wanted), unit="msg", file=sys.stderr,
                            desc="lisa-bag")
            for number, moment in enumerate(moments(bag, topics, file_queries,
                                                    _copied(progress, writer, store, args.copy_input)), 1):
                image = None if moment.frame is None else frame_image(
                    moment.frame[2], args.image_topic, (moment.frame[0] - bag.reader.start_time) / 1e9)
                outcome = answerer.answer(moment, number, image)
                answer = _answer(store, outcome, moment, args)
                counts[outcome.status] += 1
                for topic, message in outcome_messages(store, answer, outputs, args.max_cloud_points):
                    msgtype = message.__msgtype__
                    writer.write(connections[topic], moment.query_ns, store.serialize_cdr(message, msgtype))
                if jsonl is not None:
                    jsonl.write(json.dumps(outcome_record(answer, (moment.query_ns - bag.reader.start_time) / 1e9))
                                + "\n")
                if video is not None and outcome.success:
                    caption = overlay_caption(outcome.query.id, outcome.result.answer,
                                              untrained=model.label == UNTRAINED_TINY_LABEL)
                    video.add(draw_overlay(outcome.frame.image, outcome.result.targets, caption))
                progress.set_postfix(queries=number, answered=counts[Status.OK])
            progress.close()
    except BaseException as error:
        shutil.rmtree(args.out, ignore_errors=True)  # created by this run: no half-written bag is left
        if isinstance(error, WriterError):
            raise BagError(f"cannot write bag {args.out}: {error}") from error
        raise
    finally:
        answerer.close()
        if video is not None:
            video.close()
        if jsonl is not None:
            jsonl.close()
    queries = sum(counts.values())
    summary = ", ".join(f"{n} {status.label}" for status, n in counts.items() if n)
    print(f"lisa-bag: {queries} queries ({summary}); wrote {args.out}"
          + (f", {args.video} ({video.frames} frames)" if video is not None else "")
          + (f", {args.jsonl}" if jsonl is not None else ""), file=sys.stderr)
    if answerer.worker.model_error:
        print(f"lisa-bag: the model failed to load: {answerer.worker.model_error}", file=sys.stderr)
        return 1
    return 0


def _output_connections(writer, store, outputs: OutputTopics, with_depth: bool) -> dict:
    types = {outputs.result: RESULT, outputs.mask: IMAGE, outputs.centroid: POINT_STAMPED,
             outputs.target_point: POINT_STAMPED, outputs.explanation: STRING}
    if with_depth:
        types[outputs.target_cloud] = POINT_CLOUD2
    return {topic: writer.add_connection(topic, msgtype, typestore=store) for topic, msgtype in types.items()}


def _copied(messages, writer, store, copy: bool) -> Iterator[tuple[Any, int, bytes]]:
    """`messages`, each also written to the output when `copy` is set (one output connection per input one)."""
    copies: dict = {}
    for connection, log_ns, raw in messages:
        if copy:
            if connection.id not in copies:
                known = bool(connection.msgdef.data and connection.digest)
                copies[connection.id] = writer.add_connection(
                    connection.topic, connection.msgtype, typestore=None if known else store,
                    msgdef=connection.msgdef.data if known else None, rihs01=connection.digest if known else None,
                    serialization_format=connection.ext.serialization_format,
                    offered_qos_profiles=connection.ext.offered_qos_profiles)
            writer.write(copies[connection.id], log_ns, raw)
        yield connection, log_ns, raw


def _answer(store, outcome: Outcome, moment: Moment, args: argparse.Namespace) -> Answer:
    """The outcome with its header, and with depth paired and each target's geometry computed."""
    if outcome.frame is None:
        header = new_message(store, "std_msgs/msg/Header")
        header.stamp.sec, header.stamp.nanosec = divmod(moment.query_ns, 1_000_000_000)
    else:
        header = outcome.frame.header
    if not outcome.success:
        return Answer(outcome, header, [], None, header.frame_id)
    info = moment.camera_info
    depth, reason = pair_depth(moment.depth_images, stamp_ns(header), tuple(outcome.result.image_size),
                               args.depth_max_offset, info.k if info is not None else None)
    geometries = [target_geometry(t.mask, t.centroid, depth, reason) for t in outcome.result.targets]
    point_frame_id = (info.header.frame_id if info is not None else "") or header.frame_id
    return Answer(outcome, header, geometries, depth, point_frame_id)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (BagError, ConfigurationError, InputError) as error:
        print(f"lisa-bag: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
