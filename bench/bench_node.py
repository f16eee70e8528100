"""What the perception node costs over calling lisa_core directly, and what frame rate it sustains.

    tools/with_env.sh python bench/bench_node.py [--seconds 20] [--queries 10] [--out bench/results_node.md]

Runs the real node as its own process with the tiny test model that always segments (two [SEG],
two masks per answer, so every output is published), talks to it over DDS from this process, and
compares with the same pipeline called directly, same thread count:
Node and client use config/fastdds_large_frames.xml (a 640x480 frame does not fit Fast DDS's default
shared-memory segment, and best effort then loses most of them), except in the one run that shows
what the default transports do.
1. per query: frame published, then an instruction; wall time from the instruction to its result here,
   the node's own latency (receipt to publish), and the direct `segment` on a new frame;
2. per frame: tracking at 640x480 and 10 Hz; the node's latency per tracked frame (receipt to
   publish), camera stamp to result here, and the direct `track` on a new frame;
3. 1280x720 rgb8 published at 30 Hz while tracking: frames published, received by the node, tracked,
   dropped, and whether latency grows (a backlog), with the default Fast DDS transports and with
   config/fastdds_large_frames.xml.
Appends a dated section to the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from node_support import write_segmenting_model  # noqa: E402  (the model the node tests use)

CPU_THREADS = 1
MAX_NEW_TOKENS = 2


def _frame(index: int, height: int, width: int) -> np.ndarray:
    """A grey frame with a red box that moves a little each frame."""
    image = np.full((height, width, 3), 90, np.uint8)
    left = width // 4 + (index * 3) % (width // 4)
    image[height // 4:height // 2, left:left + width // 5] = (220, 30, 30)
    return image


def _ms(values) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return f"{1000 * statistics.median(values):.1f} / {1000 * p95:.1f}"


def direct_timings(model_dir: Path, queries: int) -> dict:
    import torch

    from lisa_core.pipeline import LisaPipeline

    torch.set_num_threads(CPU_THREADS)
    pipeline = LisaPipeline.from_pretrained(model_dir)
    pipeline.segment(_frame(0, 480, 640), "warm up", frame_key="warm", max_new_tokens=MAX_NEW_TOKENS)
    segment, track, prompts = [], [], None
    for index in range(queries):
        started = time.perf_counter()
        result = pipeline.segment(_frame(index, 480, 640), "Where is the red box?", frame_key=("q", index),
                                  max_new_tokens=MAX_NEW_TOKENS)
        segment.append(time.perf_counter() - started)
        prompts = [t.prompt_embedding for t in result.targets]
    for index in range(3 * queries):
        started = time.perf_counter()
        pipeline.track(_frame(index, 480, 640), prompts, frame_key=("t", index))
        track.append(time.perf_counter() - started)
    for index in range(queries):
        started = time.perf_counter()
        pipeline.track(_frame(index, 720, 1280), prompts, frame_key=("t720", index))
        track.append(time.perf_counter() - started)
    return {"segment": segment, "track_480": track[:3 * queries], "track_720": track[3 * queries:]}


class NodeUnderTest:
    def __init__(self, model_dir: Path, work: Path, env: dict, parameters: dict):
        from lisa_ros.process import node_command, start_node

        command = node_command([{"model_path": str(model_dir), "cpu_threads": CPU_THREADS,
                                 "max_new_tokens": MAX_NEW_TOKENS, **parameters}], work)
        self.process = start_node(command, env, work / "node.log")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _stamp(header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def _set_parameter(client, name, value) -> None:
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    from lisa_ros.process import NODE_NAME

    service = client.node.create_client(SetParameters, f"/{NODE_NAME}/set_parameters")
    service.wait_for_service(timeout_sec=10)
    kind = ParameterType.PARAMETER_BOOL if isinstance(value, bool) else ParameterType.PARAMETER_DOUBLE
    parameter = Parameter(name=name, value=ParameterValue(type=kind, bool_value=value if isinstance(value, bool) else False,
                                                         double_value=float(value) if not isinstance(value, bool) else 0.0))
    future = service.call_async(SetParameters.Request(parameters=[parameter]))
    client.wait_for(future.done, 10)
    assert future.result().results[0].successful, future.result().results[0].reason
    client.node.destroy_client(service)


def _publish_until_received(client, image: np.ndarray, attempts: int = 20) -> bool:
    """Publishes `image` until the node's diagnostics count a new frame (best effort may lose some)."""
    for _ in range(attempts):
        frames_before = client.frames_received()
        client.publish_frame(image, time.time_ns())
        if client.wait_for(lambda: client.frames_received() > frames_before, 0.5):
            return True
    return False


def node_query_and_track(client, queries: int) -> dict:
    """Instructions on fresh 640x480 frames, then tracking at 10 Hz."""
    query_wall, query_node = [], []
    for index in range(queries):
        if not _publish_until_received(client, _frame(index, 480, 640)):
            raise TimeoutError("the node receives no 640x480 frames")
        started = time.perf_counter()
        result = client.query("Where is the red box?")
        query_wall.append(time.perf_counter() - started)
        query_node.append(result.latency_s)
        assert result.success, result.error
    _set_parameter(client, "tracking", True)
    result = client.query("Track the red box")
    first = len(client.results)
    sent = []
    for index in range(3 * queries):
        sent.append(client.publish_frame(_frame(index, 480, 640), time.time_ns()))
        time.sleep(0.1)
    time.sleep(0.5)
    client.stop_tracking()
    _set_parameter(client, "tracking", False)
    with client.lock:
        tracked = [(r, t) for r, t in zip(client.results[first:], client.result_times[first:]) if r.tracked]
    return {"query_wall": query_wall, "query_node": query_node,
            "track_node": [r.latency_s for r, _ in tracked],
            "track_wall": [(t - _stamp(r.header)) / 1e9 for r, t in tracked],
            "frames_sent": len(sent), "frames_tracked": len(tracked)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# A bare rclpy subscription to the same frames, same QoS: the baseline for the node's cost per frame.
BARE_SUBSCRIBER = """
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from lisa_ros.parameters import PARAMETERS_BY_NAME
rclpy.init()
node = rclpy.create_node("bare_subscriber")
node.create_subscription(Image, PARAMETERS_BY_NAME["image_topic"].default, lambda message: None,
                         QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
try:
    rclpy.spin(node)
except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
    pass
"""


def node_idle_720p(client, node_pid: int, seconds: float) -> dict:
    """1280x720 rgb8 at 30 Hz with no query: what receiving and converting a frame costs the node,
    next to a bare rclpy subscription to the same frames."""
    bare = subprocess.Popen([sys.executable, "-c", BARE_SUBSCRIBER], env=dict(os.environ))
    client.wait_for(lambda: client.image_pub.get_subscription_count() >= 2, 30)
    time.sleep(1.0)
    frame = _frame(0, 720, 1280)
    if not _publish_until_received(client, frame):
        raise TimeoutError("the node receives no 720p frames")
    received_before = client.frames_received()
    cpu_before, bare_before = _cpu_seconds(node_pid), _cpu_seconds(bare.pid)
    published, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        client.publish_frame(frame, time.time_ns())
        published += 1
        time.sleep(max(0.0, started + published / 30 - time.monotonic()))
    time.sleep(0.5)
    cpu, bare_cpu = _cpu_seconds(node_pid) - cpu_before, _cpu_seconds(bare.pid) - bare_before
    received = client.frames_received() - received_before
    bare.send_signal(signal.SIGINT)
    bare.wait(10)
    return {"published": published, "received": received, "cpu_s": cpu, "bare_cpu_s": bare_cpu,
            "seconds": seconds}


def node_stream_720p(client, seconds: float) -> dict:
    """1280x720 rgb8 at 30 Hz while tracking; counts and latency over time."""
    _set_parameter(client, "tracking", True)
    _set_parameter(client, "track_rate_hz", 30.0)
    # With lossy transports no frame may arrive; the query then fails and nothing is tracked.
    _publish_until_received(client, _frame(0, 720, 1280), attempts=4)
    received_before = client.frames_received()
    client.query("Track the red box")
    first = len(client.results)
    frames = [_frame(index, 720, 1280) for index in range(8)]
    published, period = 0, 1.0 / 30
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        client.publish_frame(frames[published % len(frames)], time.time_ns())
        published += 1
        time.sleep(max(0.0, started + published * period - time.monotonic()))
    elapsed = time.monotonic() - started
    time.sleep(1.5)  # the last heartbeat carries the final frame count
    client.stop_tracking()
    received = client.frames_received() - received_before
    with client.lock:
        tracked = [(r, t) for r, t in zip(client.results[first:], client.result_times[first:]) if r.tracked]
    _set_parameter(client, "tracking", False)
    latencies = [(t - _stamp(r.header)) / 1e9 for r, t in tracked]
    half = len(latencies) // 2
    return {"published_hz": published / elapsed, "published": published, "received": received,
            "tracked": len(tracked), "tracked_hz": len(tracked) / elapsed,
            "latency": latencies, "first_half": latencies[:half], "second_half": latencies[half:]}


def run_node_benchmarks(model_dir: Path, work: Path, queries: int, seconds: float, large_frames: bool) -> dict:
    """The node measurements, in this process; its environment decides the Fast DDS transports (Fast DDS
    reads the profile once per process, so each transport setting needs its own process)."""
    import rclpy

    from lisa_ros.client import PerceptionClient

    work.mkdir(parents=True, exist_ok=True)
    node = NodeUnderTest(model_dir, work, dict(os.environ), {"max_image_age": 5.0, "diagnostics_rate_hz": 5.0})
    rclpy.init()
    client = PerceptionClient(rclpy.get_default_context(), name="bench_client")
    try:
        client.wait_for_node(120)
        client.wait_for(lambda: client.image_pub.get_subscription_count() > 0, 10)
        time.sleep(0.5)
        measured = {}
        if large_frames:
            measured = node_query_and_track(client, queries)
            measured["idle"] = node_idle_720p(client, node.process.pid, min(seconds, 10.0))
        measured["stream"] = node_stream_720p(client, seconds)
    finally:
        client.close()
        rclpy.try_shutdown()
        measured_exit = node.stop()
    measured["node_exit"] = measured_exit
    return measured


def run_in_child(arguments, model_dir: Path, transport: str) -> dict:
    """Runs this script's node part in a new process with the given transports; its measurements."""
    from lisa_ros.process import PROFILE_VARIABLES, use_large_frames_profile

    env = dict(os.environ)
    for name in PROFILE_VARIABLES:
        env.pop(name, None)
    if transport == "large_frames":
        use_large_frames_profile(env)
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        subprocess.run([sys.executable, __file__, "--child", transport, "--model", str(model_dir),
                        "--seconds", str(arguments.seconds), "--queries", str(arguments.queries),
                        "--child-output", output.name], env=env, check=True)
        return json.loads(Path(output.name).read_text())


def versions() -> str:
    import torch
    import transformers

    try:
        from importlib.metadata import version
        rclpy_version = version("ros-jazzy-rclpy")
    except Exception:
        rclpy_version = "unknown"
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, rclpy (ros-jazzy-rclpy) {rclpy_version}, "
            f"RMW {os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp (default)')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each 720p stream")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_node.md")
    parser.add_argument("--child", choices=("default", "large_frames"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        measured = run_node_benchmarks(arguments.model, ROOT / "out" / "bench_node" / arguments.child,
                                       arguments.queries, arguments.seconds, arguments.child == "large_frames")
        arguments.child_output.write_text(json.dumps(measured))
        return 0
    machine = versions()
    with tempfile.TemporaryDirectory(prefix="bench_node_") as work:
        model_dir = write_segmenting_model(Path(work) / "model")
        direct = direct_timings(model_dir, arguments.queries)
        default_transport = run_in_child(arguments, model_dir, "default")
        large_frames = run_in_child(arguments, model_dir, "large_frames")
    report = format_report(machine, arguments, direct, default_transport, large_frames)
    print(report)
    with open(arguments.out, "a") as out:
        out.write(report)
    return 0


def format_report(machine, arguments, direct, default_transport, large_frames) -> str:
    d, n = direct, large_frames
    overhead_query = statistics.median(n["query_node"]) - statistics.median(d["segment"])
    overhead_frame = statistics.median(n["track_node"]) - statistics.median(d["track_480"])
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: tiny model, CPU, {CPU_THREADS} torch thread\n",
        f"Machine: {machine}.",
        f"Model: the tests' tiny model that always answers {MAX_NEW_TOKENS} [SEG] (two masks published per answer).",
        "Times in ms, median / p95. `node` = the node's own latency (frame or query receipt to publish);",
        "`wall` = measured in the client process (query sent, or camera stamp, to result received).\n",
        "### Per query and per frame (640x480 rgb8, config/fastdds_large_frames.xml)\n",
        "| path | direct lisa_core | node | wall | node overhead (median) |",
        "|---|---|---|---|---|",
        f"| query ({arguments.queries} instructions, each on a new frame) | {_ms(d['segment'])} | "
        f"{_ms(n['query_node'])} | {_ms(n['query_wall'])} | {1000 * overhead_query:+.1f} ms |",
        f"| tracked frame ({n['frames_tracked']} of {n['frames_sent']} frames at 10 Hz) | {_ms(d['track_480'])} | "
        f"{_ms(n['track_node'])} | {_ms(n['track_wall'])} | {1000 * overhead_frame:+.1f} ms |",
        "",
        f"Direct `track` on 1280x720: {_ms(d['track_720'])} ms.\n",
        f"Receiving 1280x720 rgb8 at 30 Hz with no query ({n['idle']['seconds']:.0f} s): the node took "
        f"{n['idle']['received']} of {n['idle']['published']} frames; CPU per published frame: node "
        f"{1000 * n['idle']['cpu_s'] / n['idle']['published']:.1f} ms, a bare rclpy subscription "
        f"{1000 * n['idle']['bare_cpu_s'] / n['idle']['published']:.1f} ms (DDS and deserialization; the "
        "difference is the node's conversion and executor).\n",
        f"### 1280x720 rgb8 at 30 Hz while tracking ({arguments.seconds:.0f} s)\n",
        "| Fast DDS transports | published | received by the node | not received (transport loss, or replaced "
        "by a newer frame before the node took it) | tracked "
        "| camera to result (ms) | first half / second half median (ms) | node exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, measured in (("default (UDP + 0.5 MB SHM)", default_transport),
                           ("config/fastdds_large_frames.xml (32 MB SHM)", large_frames)):
        s = measured["stream"]
        first = 1000 * statistics.median(s["first_half"]) if s["first_half"] else float("nan")
        second = 1000 * statistics.median(s["second_half"]) if s["second_half"] else float("nan")
        lines.append(f"| {name} | {s['published']} ({s['published_hz']:.1f} Hz) | {s['received']} | "
                     f"{s['published'] - s['received']} | {s['tracked']} ({s['tracked_hz']:.1f} Hz) | "
                     f"{_ms(s['latency'])} | {first:.1f} / {second:.1f} | {measured['node_exit']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
