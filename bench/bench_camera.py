"""The camera path a robot has: a camera process publishing large frames at 30 Hz to the node with its
default parameters, in Fast DDS's default environment.

    tools/with_env.sh python bench/bench_camera.py [--seconds 15] [--queries 8] [--out bench/results_node.md]
    tools/with_env.sh python bench/bench_camera.py --quick --out /tmp/results.md --json /tmp/numbers.json
    tools/with_env.sh python bench/bench_camera.py --rows "rgb8 | reliable" --queries 24   (some rows only)

A camera process (rgb8 or bgr8 frames, or jpeg ones on `<image_topic>/compressed` as image_transport's
compressed transport publishes them, the node then set to `image_transport: compressed`: the first
demo scene scaled to fit; its 16UC1 depth at the same size and CameraInfo; one stamp for the three) publishes 1280x720 and 1920x1080 at 30 Hz, best effort
(keep last 1) or reliable (keep last 10: rmw_qos_profile_default, what image_transport publishers and
most drivers use by default). No Fast DDS profile and no FASTDDS_BUILTIN_TRANSPORTS in any process,
except in the rows whose transports column says `camera: fastdds_large_frames.xml`: that profile
(a 32 MB shared-memory segment) in the camera's process only, the node and the client on defaults, as
README asks of camera drivers; or `node: fastdds_large_frames.xml`: the profile in the node's process
only, which publishes the large messages of the answers (a frame-size mask per target). The node runs as its own
process, default parameters (image_reliability auto, max_image_age 1.0) except the model (the tests'
tiny model that always segments, max_new_tokens 2: two targets per answer) and cpu_threads 1 (on a
shared machine torch's default of every core is slower). A client here asks instructions spread over
the run on the query topic and reads the node's /diagnostics. Per row:
- frames received by the node (its diagnostics' frame count) of those the camera sent;
- the same camera, run again, to a bare rclpy subscriber process keeping the last 10 frames (no model
  running): what the transport delivered, and what rclpy alone takes in time;
- queries answered, by status, of those asked; 3D points (targets with centroid_3d_valid) of the
  targets of the successful answers, and why the others have none;
- query latency: the node's own (result.latency_s) and wall (instruction sent to result here);
- node CPU (user + system of its process while the camera sent), per frame received and as a share
  of one core (the answers included), next to the bare subscriber's;
- node memory: its resident set when it was ready and the most it reached while the camera sent
  (sampled every RSS_PERIOD_S; the camera history of CAMERA_HISTORY_DEPTH frames included).
Each row gets a freshly started node, so that `auto` chooses for that camera. Appends a dated
section to the results file (--quick: only with --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(ROOT / "tests"), str(BENCH_DIR)]

from ros_support import ChildProcess, child_env, reserved_domain_id, start_python, stop_process  # noqa: E402

CAMERA_RATE_HZ = 30.0
RELIABLE_CAMERA_DEPTH = 10  # rmw_qos_profile_default, image_transport's default publisher QoS
# Environment variables that choose Fast DDS transports: the default environment has none of them.
TRANSPORT_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE",
                       "FASTDDS_BUILTIN_TRANSPORTS")
# The large-frames profile in one process only (transports values), and that process.
CAMERA_PROFILE = "camera: fastdds_large_frames.xml"
NODE_PROFILE = "node: fastdds_large_frames.xml"
PROFILE_PROCESSES = {CAMERA_PROFILE: "camera", NODE_PROFILE: "node"}
MAX_NEW_TOKENS = 2
CPU_THREADS = 1  # as the other node benchmarks: torch's default (every core) is slower on a shared machine
QUERY_TIMEOUT_S = 30.0
NODE_READY_TIMEOUT_S = 120.0
CAMERA_MATCH_TIMEOUT_S = 60.0
CAMERA_CODE = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import bench_camera; "
               "bench_camera.camera_main(sys.argv[1:])")
SUBSCRIBER_CODE = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import bench_camera; "
                   "bench_camera.subscriber_main(sys.argv[1:])")
SIZES = {"320x240": (240, 320), "1280x720": (720, 1280), "1920x1080": (1080, 1920)}
# The bare subscriber's history depth; it keeps whatever the
# transport delivered even when frames come in bursts faster than the executor takes them.
BARE_DEPTH = 10
RSS_PERIOD_S = 0.1
COMPRESSED = "jpeg"  # the encoding name of the compressed rows
DEPTH_OFFSET = re.compile(r"closest depth image is ([0-9.]+) s from the frame")


# ---- the camera process ------------------------------------------------------------------------------
def camera_qos(reliable: bool):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    if reliable:
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=RELIABLE_CAMERA_DEPTH,
                          reliability=ReliabilityPolicy.RELIABLE)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


def scaled_k(k: Sequence[float], scale: float, left: float = 0.0, top: float = 0.0) -> list[float]:
    """Intrinsics of an image scaled by `scale`, then placed at (left, top) in a larger one."""
    fx, _, cx, _, fy, cy, *_ = k
    return [fx * scale, 0.0, cx * scale + left, 0.0, fy * scale, cy * scale + top, 0.0, 0.0, 1.0]


def demo_scene(index: int):
    """The demo scene camera number `index` shows (lisa_ros.demo's scenes, in turn)."""
    from lisa_ros.demo import load_scenes, scenes_dir

    scenes = load_scenes(scenes_dir())
    return scenes[index % len(scenes)]


def demo_view(index: int, height: int, width: int) -> tuple[object, object, list[float]]:
    """Camera `index`'s demo scene scaled to fit height x width, the rest filled with its background:
    (rgb8 image, 16UC1 depth, K)."""
    import cv2
    import numpy as np

    scene = demo_scene(index)
    scale = min(height / scene.image.shape[0], width / scene.image.shape[1])
    size = (round(scene.image.shape[1] * scale), round(scene.image.shape[0] * scale))
    top, left = (height - size[1]) // 2, (width - size[0]) // 2
    image = np.empty((height, width, 3), np.uint8)
    image[:] = scene.image[0, 0]
    image[top:top + size[1], left:left + size[0]] = cv2.resize(scene.image, size, interpolation=cv2.INTER_AREA)
    depth = np.full((height, width), scene.depth[0, 0], np.uint16)
    depth[top:top + size[1], left:left + size[0]] = cv2.resize(scene.depth, size, interpolation=cv2.INTER_NEAREST)
    return image, depth, scaled_k(scene.k, scale, left, top)


def camera_main(argv: Sequence[str]) -> None:
    """A camera process: per camera name, rgb8 (or --encoding bgr8) frames, 16UC1 depth and CameraInfo with one stamp, at
    --rate, once every topic has a subscriber; for --seconds, or until SIGINT. A tick it is too late
    for is skipped, as a driver drops a frame. Writes JSON lines to --report: {"started": time} when it
    starts sending, then {"sent": {camera: frames}, "seconds": s}."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image

    from lisa_ros.image_conv import cv2_to_compressed_imgmsg, cv2_to_imgmsg
    from lisa_ros.parameters import COMPRESSED_SUFFIX, DEFAULT_NAMES

    parser = argparse.ArgumentParser()
    parser.add_argument("--cameras", default="", help="comma-separated camera names; '' for the single camera")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--rate", type=float, default=CAMERA_RATE_HZ)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--reliable", action="store_true")
    parser.add_argument("--encoding", choices=("rgb8", "bgr8", COMPRESSED), default="rgb8")
    parser.add_argument("--report", type=Path, required=True)
    arguments = parser.parse_args(argv)
    compressed = arguments.encoding == COMPRESSED
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    node = rclpy.create_node("bench_camera")
    qos = camera_qos(arguments.reliable)
    cameras = []
    for index, name in enumerate(arguments.cameras.split(",")):
        prefix = f"{name}/" if name else ""
        image, depth, k = demo_view(index, arguments.height, arguments.width)
        if compressed:
            frame = cv2_to_compressed_imgmsg(image, COMPRESSED)
        else:
            frame = cv2_to_imgmsg(image if arguments.encoding == "rgb8" else image[:, :, ::-1].copy(), arguments.encoding)
        image_kind, image_topic = ((CompressedImage, f"{prefix}{DEFAULT_NAMES['image_topic']}/{COMPRESSED_SUFFIX}")
                                   if compressed else (Image, prefix + DEFAULT_NAMES["image_topic"]))
        cameras.append(dict(
            name=name, sent=0, image=frame,
            depth=cv2_to_imgmsg(depth, "16UC1"),
            info=CameraInfo(width=arguments.width, height=arguments.height, k=k, distortion_model="plumb_bob",
                            d=[0.0] * 5),
            frame_id=f"{name or 'bench'}_camera_optical",
            publishers=[node.create_publisher(image_kind, image_topic, qos)]
            + [node.create_publisher(kind, prefix + DEFAULT_NAMES[topic], qos) for kind, topic in
               ((Image, "depth_topic"), (CameraInfo, "camera_info_topic"))]))
    for camera in cameras:
        for message in (camera["image"], camera["depth"], camera["info"]):
            message.header.frame_id = camera["frame_id"]
    deadline = time.monotonic() + CAMERA_MATCH_TIMEOUT_S
    while not all(p.get_subscription_count() > 0 for c in cameras for p in c["publishers"]):
        if time.monotonic() > deadline or stop:
            raise SystemExit(f"no subscriber on every camera topic after {CAMERA_MATCH_TIMEOUT_S} s")
        time.sleep(0.05)
    time.sleep(0.5)  # matched both ways before the first frame counts
    with open(arguments.report, "a") as report:
        report.write(json.dumps({"started": time.time()}) + "\n")
        report.flush()
        period, tick = 1.0 / arguments.rate, 0
        started = time.monotonic()
        while not stop and time.monotonic() - started < arguments.seconds:
            stamp = time.time_ns()
            for camera in cameras:
                messages = (camera["image"], camera["depth"], camera["info"])
                for publisher, message in zip(camera["publishers"], messages):
                    message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
                    publisher.publish(message)
                camera["sent"] += 1
            tick = max(tick + 1, int((time.monotonic() - started) / period))
            time.sleep(max(0.0, started + tick * period - time.monotonic()))
        report.write(json.dumps({"sent": {c["name"]: c["sent"] for c in cameras},
                                 "seconds": time.monotonic() - started}) + "\n")
    node.destroy_node()
    rclpy.try_shutdown()


def subscriber_main(argv: Sequence[str]) -> None:
    """A bare rclpy subscriber to the camera's image, depth and camera info (keep last --depth), spun as
    the node spins (SingleThreadedExecutor.spin_once); on SIGINT writes its callback counts to --report."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image

    from lisa_ros.parameters import COMPRESSED_SUFFIX, DEFAULT_NAMES

    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--reliable", action="store_true")
    parser.add_argument("--compressed", action="store_true")
    parser.add_argument("--report", type=Path, required=True)
    arguments = parser.parse_args(argv)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    node = rclpy.create_node("bench_bare_subscriber")
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=arguments.depth, reliability=(
        ReliabilityPolicy.RELIABLE if arguments.reliable else ReliabilityPolicy.BEST_EFFORT))
    counts = {"image": 0, "depth": 0, "camera_info": 0}
    image_input = ((CompressedImage, f"{DEFAULT_NAMES['image_topic']}/{COMPRESSED_SUFFIX}") if arguments.compressed
                   else (Image, DEFAULT_NAMES["image_topic"]))
    for key, (kind, topic) in (("image", image_input), ("depth", (Image, DEFAULT_NAMES["depth_topic"])),
                               ("camera_info", (CameraInfo, DEFAULT_NAMES["camera_info_topic"]))):
        node.create_subscription(kind, topic, lambda _message, key=key: counts.__setitem__(key, counts[key] + 1), qos)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    while not stop:
        executor.spin_once(timeout_sec=0.1)
    arguments.report.write_text(json.dumps(counts))
    node.destroy_node()
    rclpy.try_shutdown()


def read_report(path: Path) -> dict:
    """The camera's report lines merged into one dict."""
    merged: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            merged.update(json.loads(line))
    return merged


# ---- this process: the node, the camera, the client ----------------------------------------------------
@contextlib.contextmanager
def environment(updates: dict, removals: Sequence[str] = ()) -> Iterator[None]:
    """os.environ with `updates` set and `removals` gone, restored when the block ends."""
    saved = dict(os.environ)
    for name in removals:
        os.environ.pop(name, None)
    os.environ.update(updates)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def transport_env(env: dict, transports: str) -> dict:
    """`env` without any Fast DDS transport choice, plus FASTDDS_BUILTIN_TRANSPORTS when `transports`
    names one ("" and the PROFILE_PROCESSES rows keep the default)."""
    env = {key: value for key, value in env.items() if key not in TRANSPORT_VARIABLES}
    if transports and transports not in PROFILE_PROCESSES:
        env["FASTDDS_BUILTIN_TRANSPORTS"] = transports
    return env


def process_env(env: dict, transports: str, process: str) -> dict:
    """The environment of `process` ("camera" or "node"): `env`, with the large-frames profile when
    `transports` puts it in that process."""
    from lisa_ros.process import use_large_frames_profile

    env = dict(env)
    if PROFILE_PROCESSES.get(transports) == process:
        use_large_frames_profile(env)
    return env


def start_node(parameters: dict, work: Path, env: dict, namespace: str = "") -> ChildProcess:
    """The installed node executable with `parameters`, its log in `work`."""
    from lisa_ros.process import node_command, start_node as start

    folder = work / f"node_{namespace or 'root'}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "node.log"
    return ChildProcess(start(node_command([parameters], folder, namespace=namespace), env, log), log)


def start_camera(env: dict, report: Path, log: Path, height: int, width: int, seconds: float, reliable: bool,
                 cameras: Sequence[str] = ("",), rate: float = CAMERA_RATE_HZ, encoding: str = "rgb8") -> ChildProcess:
    args = ["--cameras", ",".join(cameras), "--width", str(width), "--height", str(height), "--rate", str(rate),
            "--seconds", str(seconds), "--report", str(report), "--encoding", encoding]
    return start_python(CAMERA_CODE, env, log, args=tuple(args + (["--reliable"] if reliable else [])))


def wait_started(camera: ChildProcess, report: Path, timeout_s: float) -> float:
    """When the camera began sending (time.time()); RuntimeError with its output if it did not."""
    deadline = time.monotonic() + timeout_s
    while "started" not in read_report(report):
        if camera.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the camera did not start sending:\n{camera.output()[-3000:]}")
        time.sleep(0.05)
    return read_report(report)["started"]


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class PeakMemory:
    """The most resident memory (MB) process `pid` reaches while the block runs, sampled every RSS_PERIOD_S."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.start_mb = self.peak_mb = self._rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss_mb(self) -> float:
        return self.process.memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(RSS_PERIOD_S):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


def wait_for_new_statuses(client, count: int, timeout_s: float) -> None:
    """Waits until `count` more diagnostics reports have arrived (each carries the node's counts then)."""
    with client.lock:
        seen = len(client.statuses)
    client.wait_for(lambda: len(client.statuses) >= seen + count, timeout_s)


def status_counts(results: list, missing: int = 0) -> dict:
    """Results by status label, plus "no result" for queries that got none in time."""
    from lisa_ros.status import Status

    counts: dict = {}
    for result in results:
        label = Status(result.status).label
        counts[label] = counts.get(label, 0) + 1
    if missing:
        counts["no result"] = missing
    return counts


def format_statuses(counts: dict) -> str:
    return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


@dataclass
class CameraRun:
    size: str
    reliable: bool
    transports: str  # "" (default), a PROFILE_PROCESSES key or a FASTDDS_BUILTIN_TRANSPORTS value
    encoding: str = "rgb8"

    @property
    def label(self) -> str:
        qos = f"reliable, keep last {RELIABLE_CAMERA_DEPTH}" if self.reliable else "best effort, keep last 1"
        return f"{self.size} {self.encoding} | {qos} | {self.transports or 'default'}"


def measure_bare(run: CameraRun, depth: int, work: Path, domain_id: int, seconds: float) -> dict:
    """The same camera to a bare rclpy subscriber keeping `depth` messages: frames it got, and its CPU."""
    height, width = SIZES[run.size]
    work.mkdir(parents=True)
    env = transport_env(child_env(domain_id, work / "ros_log"), run.transports)
    counts_path, report = work / "counts.json", work / "camera.jsonl"
    subscriber = start_python(SUBSCRIBER_CODE, env, work / "subscriber.log", args=(
        "--depth", str(depth), "--report", str(counts_path), *(["--reliable"] if run.reliable else []),
        *(["--compressed"] if run.encoding == COMPRESSED else [])))
    camera: Optional[ChildProcess] = None
    try:
        camera = start_camera(process_env(env, run.transports, "camera"), report, work / "camera.log", height, width,
                              seconds, run.reliable, encoding=run.encoding)
        wait_started(camera, report, CAMERA_MATCH_TIMEOUT_S + 30)
        cpu_before = cpu_seconds(subscriber.pid)
        camera.process.wait(seconds + 60)
        cpu = cpu_seconds(subscriber.pid) - cpu_before
        time.sleep(0.5)  # the last frames in flight
    finally:
        if camera is not None:
            stop_process(camera)
        stop_process(subscriber)
    if not counts_path.exists():
        raise RuntimeError(f"the bare subscriber wrote no counts:\n{subscriber.output()[-3000:]}")
    counts = json.loads(counts_path.read_text())
    return dict(depth=depth, sent=read_report(report)["sent"][""], received=counts["image"],
                depth_received=counts["depth"], cpu_s=cpu)


def measure(run: CameraRun, model_dir: Path, work: Path, domain_id: int, seconds: float, queries: int) -> dict:
    """One combination: a fresh node, the camera for `seconds`, `queries` instructions spread over it."""
    import rclpy
    from rclpy.context import Context

    from lisa_ros.client import PerceptionClient

    height, width = SIZES[run.size]
    work.mkdir(parents=True)
    env = transport_env(child_env(domain_id, work / "ros_log"), run.transports)
    node_started = time.monotonic()
    node = start_node({"model_path": str(model_dir), "max_new_tokens": MAX_NEW_TOKENS, "max_image_age": 1.0,
                       "cpu_threads": CPU_THREADS}
                      | ({"image_transport": "compressed"} if run.encoding == COMPRESSED else {}), work,
                      process_env(env, run.transports, "node"))
    camera: Optional[ChildProcess] = None
    context = Context()
    with environment({key: env[key] for key in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR")}
                     | {key: env[key] for key in TRANSPORT_VARIABLES if key in env},
                     TRANSPORT_VARIABLES):
        rclpy.init(context=context, domain_id=domain_id)
        client = PerceptionClient(context, name="bench_camera_client", camera=False)
    try:
        client.wait_for_node(NODE_READY_TIMEOUT_S)
        node_ready_s = time.monotonic() - node_started
        frames_before = client.frames_received()
        report = work / "camera.jsonl"
        camera = start_camera(process_env(env, run.transports, "camera"), report, work / "camera.log", height, width,
                              seconds, run.reliable, encoding=run.encoding)
        wait_started(camera, report, CAMERA_MATCH_TIMEOUT_S + 30)
        started, cpu_before = time.monotonic(), cpu_seconds(node.pid)
        results, walls, missing = [], [], 0
        instruction = demo_scene(0).instruction
        with PeakMemory(node.pid) as memory:
            for index in range(queries):
                time.sleep(max(0.0, started + (index + 0.5) * seconds / queries - time.monotonic()))
                sent = time.monotonic()
                try:
                    results.append(client.query(instruction, QUERY_TIMEOUT_S))
                    walls.append(time.monotonic() - sent)
                except TimeoutError:
                    missing += 1
            camera.process.wait(seconds + 60)
        cpu = cpu_seconds(node.pid) - cpu_before
        window = time.monotonic() - started
        wait_for_new_statuses(client, 2, 10.0)
        frames = client.frames_received() - frames_before
        with client.lock:
            reliability = client.statuses[-1].get("image_reliability", "")
        camera_report = read_report(report)
    finally:
        if camera is not None:
            stop_process(camera)
        client.close()
        context.try_shutdown()
        node_exit = stop_process(node, 20)
    successes = [r for r in results if r.success]
    targets = [t for r in successes for t in r.targets]
    sent_frames = camera_report["sent"][""]
    return dict(run=asdict(run), label=run.label, sent=sent_frames,
                sent_hz=sent_frames / camera_report["seconds"], received=frames,
                received_share=frames / sent_frames if sent_frames else 0.0, reliability=reliability,
                asked=queries, answered=len(results), ok=len(successes), statuses=status_counts(results, missing),
                targets=len(targets), points_3d=sum(1 for t in targets if t.centroid_3d_valid),
                depth_errors=[t.depth_error for t in targets if not t.centroid_3d_valid],
                latency_node=[r.latency_s for r in successes], latency_wall=walls,
                node_cpu_s=cpu, window_s=window, node_ready_s=node_ready_s, node_exit=node_exit,
                node_rss_start_mb=memory.start_mb, node_rss_peak_mb=memory.peak_mb)


def missing_3d(errors: list[str]) -> str:
    """Why targets had no 3D point, in short: the depth offsets found, and any other reasons."""
    offsets = [float(match.group(1)) for match in map(DEPTH_OFFSET.search, errors) if match]
    parts = [f"{len(offsets)} with the closest depth image {min(offsets):.2f}-{max(offsets):.2f} s from the "
             "frame (over depth_max_offset)"] if offsets else []
    others = [error for error in errors if not DEPTH_OFFSET.search(error)]
    parts += [f"{others.count(error)} with '{error}'" for error in sorted(set(others))]
    return "; ".join(parts)


def _share(received: int, sent: int) -> str:
    return f"{received} ({100 * received / sent:.1f} %)" if sent else f"{received}"


def format_report(machine: str, seconds: float, queries: int, rows: list[dict]) -> str:
    from bench_node import _ms

    depths = [bare["depth"] for bare in rows[0]["bare"]]
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the camera path, default environment "
        "(bench/bench_camera.py)\n",
        f"Machine: {machine}.",
        f"Camera in its own process: rgb8, bgr8 or {COMPRESSED} on the compressed topic (a demo scene) + 16UC1 depth + CameraInfo (one stamp) at "
        f"{CAMERA_RATE_HZ:.0f} Hz, {seconds:.0f} s per row; best effort keep last 1, or reliable keep last "
        f"{RELIABLE_CAMERA_DEPTH} (rmw_qos_profile_default, image_transport's default). Node: a fresh process "
        "per row, default parameters (image_reliability auto, max_image_age 1.0) except the tests' tiny "
        f"segmenting model with max_new_tokens {MAX_NEW_TOKENS} and cpu_threads {CPU_THREADS}; {queries} "
        "instructions spread over each row. No Fast DDS profile and no FASTDDS_BUILTIN_TRANSPORTS, except "
        f"where the transports column says `{CAMERA_PROFILE}` or `{NODE_PROFILE}` (the 32 MB shared-memory "
        "profile in that process only; the client always on defaults) or names a FASTDDS_BUILTIN_TRANSPORTS "
        "value (set in every process). Bare rclpy "
        "subscriber: the same camera again, to a process that only counts image, depth and camera info "
        "callbacks (same reliability, SingleThreadedExecutor like the node), keeping "
        + " or ".join(f"the last {depth}" for depth in depths) + "; each its own run of the camera.\n",
        "### Frames\n",
        "| frames | camera QoS | transports | node subscribed (auto) | sent (Hz) | received by the node | "
        + " | ".join(f"bare subscriber, keep last {depth}" for depth in depths)
        + " | node CPU per frame received | node CPU (% of a core) | bare keep last "
        f"{depths[0]}: CPU per frame | node memory MB (ready, peak) |",
        "|---|---|---|---|---|---|" + "---|" * len(depths) + "---|---|---|---|",
    ]
    for row in rows:
        reliability = sorted({part.split(": ")[-1] for part in row["reliability"].split(", ") if part})
        per_frame = f"{1000 * row['node_cpu_s'] / row['received']:.1f} ms" if row["received"] else "n/a"
        first = row["bare"][0]
        bare_per_frame = f"{1000 * first['cpu_s'] / first['received']:.1f} ms" if first["received"] else "n/a"
        lines.append(
            f"| {row['label']} | {', '.join(reliability) or 'n/a'} | {row['sent']} ({row['sent_hz']:.1f}) | "
            f"{_share(row['received'], row['sent'])} | "
            + " | ".join(_share(bare["received"], bare["sent"]) for bare in row["bare"])
            + f" | {per_frame} | {100 * row['node_cpu_s'] / row['window_s']:.0f} | {bare_per_frame} | "
            f"{row['node_rss_start_mb']:.0f}, {row['node_rss_peak_mb']:.0f} |")
    lines += [
        "",
        "### Queries (latency in ms, median / p95: `node` = result.latency_s, `wall` = instruction sent to "
        "result here)\n",
        "| frames | camera QoS | transports | answered / asked (statuses) | 3D points / targets | latency node | "
        "latency wall | why no 3D point |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['answered']} / {row['asked']} ({format_statuses(row['statuses'])}) | "
            f"{row['points_3d']} / {row['targets']} | {_ms(row['latency_node'])} | {_ms(row['latency_wall'])} | "
            f"{missing_3d(row['depth_errors']) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="camera time per row")
    parser.add_argument("--queries", type=int, default=8, help="instructions per row")
    parser.add_argument("--quick", action="store_true", help="320x240, both QoS, a few seconds each (for CI)")
    parser.add_argument("--out", type=Path, help="results file to append to (default bench/results_node.md; "
                        "--quick: none)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--rows", default="", help="only the rows whose label (frames | camera QoS | transports) "
                        "contains this, e.g. 'rgb8 | reliable'")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        seconds, queries = 3.0, 2
        runs = [CameraRun("320x240", False, ""), CameraRun("320x240", True, "", COMPRESSED)]
    else:
        seconds, queries = arguments.seconds, arguments.queries
        runs = [CameraRun(size, reliable, "") for size in ("1280x720", "1920x1080") for reliable in (False, True)]
        runs += [CameraRun("1920x1080", True, "", "bgr8")]
        runs += [CameraRun(size, True, "", COMPRESSED) for size in ("1280x720", "1920x1080")]
        runs += [CameraRun(size, False, CAMERA_PROFILE) for size in ("1280x720", "1920x1080")]
        runs += [CameraRun("1920x1080", True, CAMERA_PROFILE)]
        runs += [CameraRun(size, True, NODE_PROFILE) for size in ("1280x720", "1920x1080")]
    if arguments.rows:
        runs = [run for run in runs if arguments.rows in run.label]
        if not runs:
            parser.error(f"no row's label contains {arguments.rows!r}")
    out = arguments.out or (None if arguments.quick else ROOT / "bench" / "results_node.md")
    from bench_node import versions
    from node_support import write_segmenting_model

    machine = versions()

    with tempfile.TemporaryDirectory(prefix="bench_camera_") as work, reserved_domain_id() as domain_id:
        model_dir = write_segmenting_model(Path(work) / "model")
        rows = []
        for index, run in enumerate(runs):
            row = measure(run, model_dir, Path(work) / f"run_{index}", domain_id, seconds, queries)
            row["bare"] = [measure_bare(run, BARE_DEPTH, Path(work) / f"run_{index}_bare", domain_id, seconds)]
            rows.append(row)
            print(f"{run.label}: node ready after {row['node_ready_s']:.1f} s, {row['received']} of "
                  f"{row['sent']} frames received; bare subscribers: "
                  + ", ".join(f"keep last {b['depth']}: {b['received']} of {b['sent']}" for b in row["bare"]),
                  file=sys.stderr)
    report = format_report(machine, seconds, queries, rows)
    print(report)
    if out is not None:
        with open(out, "a") as file:
            file.write(report)
    numbers = dict(machine=machine, seconds=seconds, queries=queries, rows=rows)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(numbers, indent=1))
    return numbers


if __name__ == "__main__":
    main()
    sys.exit(0)
