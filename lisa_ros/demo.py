"""The demo `make demo` runs: the perception node as its own process, fed through real ROS topics.

    python -m lisa_ros.demo [--scenes 4] [--out out/demo] [--model-path DIR] [--device cpu]

It starts the installed node with the embedded demo model (models/demo when present, else the
untrained tiny preset, which it says loudly), plays synthetic scenes as a 5 Hz camera with a flat
depth image and CameraInfo, asks one instruction per scene on /lisa/query, prints each answer with the
main target's pixel and 3D centroid, writes the node's overlay images as PNGs, asks the last
instruction again through the /lisa/segment service, and stops the node with SIGINT.
Exit code 0 when every instruction got its answer, 1 otherwise (or after --timeout seconds).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

FRAME_SIDE = 384  # synthetic scenes are drawn at 128 px and shown 3x larger
CAMERA_RATE_HZ = 5.0
DEPTH_MM = 800  # a flat table 0.8 m in front of the camera
FOCAL_PX = 400.0


def demo_scenes(count: int, seed: int):
    """(image, instruction, ground-truth masks) from the synthetic benchmark's validation split."""
    from training.data.synthetic import SyntheticReasonSeg

    benchmark = SyntheticReasonSeg("val", seed=seed, kinds=("attribute", "function", "size", "multiple"))
    for index in range(count):
        sample = benchmark.eval_sample(index)
        scale = FRAME_SIDE // sample.image.shape[0]
        image = cv2.resize(sample.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        masks = [cv2.resize(m, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) == 1 for m in sample.masks]
        yield image, sample.conversations[0][0][0], masks


class Camera:
    """Publishes one image (new stamp each time), its depth and CameraInfo at CAMERA_RATE_HZ."""

    def __init__(self, client):
        self._client = client
        self._image = None
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def show(self, image: np.ndarray) -> None:
        with self._lock:
            self._image = image

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)

    def _run(self) -> None:
        k = (FOCAL_PX, 0.0, FRAME_SIDE / 2, 0.0, FOCAL_PX, FRAME_SIDE / 2, 0.0, 0.0, 1.0)
        depth = np.full((FRAME_SIDE, FRAME_SIDE), DEPTH_MM, np.uint16)
        while self._running:
            with self._lock:
                image = self._image
            if image is not None:
                header = self._client.publish_frame(image, time.time_ns(), "demo_camera_optical")
                self._client.publish_depth(depth, header)
                self._client.publish_camera_info(header, k, FRAME_SIDE, FRAME_SIDE)
            time.sleep(1.0 / CAMERA_RATE_HZ)


def _frames_received(client) -> int:
    """Camera frames the node reports having received (status heartbeat, once a second)."""
    with client.lock:
        return client.statuses[-1]["counts"]["frames"] if client.statuses else 0


def _iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def _describe(result) -> str:
    if not result.success:
        return f"error: {result.error}"
    if not result.targets:
        return "no target segmented"
    main = max((t for t in result.targets if t.area_px > 0), key=lambda t: t.confidence, default=None)
    if main is None:
        return f"{len(result.targets)} target(s), all masks empty"
    text = (f"{len(result.targets)} target(s); main target: pixel ({main.centroid_px.x:.1f}, "
            f"{main.centroid_px.y:.1f}), {main.area_px} px, confidence {main.confidence:.2f}")
    if main.centroid_3d_valid:
        p = main.centroid_3d
        text += f", 3D ({p.x:+.3f}, {p.y:+.3f}, {p.z:.3f}) m"
    return text


def run(arguments) -> int:
    import rclpy

    from lisa_ros.client import PerceptionClient, stamp_ns
    from lisa_ros.image_conv import imgmsg_to_cv2
    from lisa_ros.model_source import UNTRAINED_TINY_LABEL
    from lisa_ros.process import node_command, start_node, use_large_frames_profile
    from lisa_ros.srv import Segment

    deadline = time.monotonic() + arguments.timeout
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    use_large_frames_profile(os.environ)
    parameters = {"model_path": arguments.model_path, "device": arguments.device, "cpu_threads": 1}
    node = start_node(node_command([parameters], out), os.environ, out / "node.log")
    print(f"[demo] perception node started (pid {node.pid}); its log: {out / 'node.log'}")
    rclpy.init()
    client = PerceptionClient(rclpy.get_default_context(), name="lisa_demo", subscribe_overlay=True)
    camera = Camera(client)
    answered, asked, untrained = 0, 0, False
    try:
        status = client.wait_for_node(timeout_s=max(1.0, deadline - time.monotonic()))
        if not status["model_loaded"]:
            print(f"[demo] the model did not load: {status['model_error']}")
            return 1
        print(f"[demo] model: {status['model']} ({status['model_path']})")
        untrained = status["model"] == UNTRAINED_TINY_LABEL
        if untrained:
            print("[demo] *** UNTRAINED TINY PRESET: random weights, so the answers are arbitrary tokens and "
                  "masks are rare and meaningless. This run shows the machinery, not the model. ***")
        last_query = None
        for index, (image, instruction, truth) in enumerate(demo_scenes(arguments.scenes, arguments.seed)):
            frames_before = _frames_received(client)
            camera.show(image)
            if not client.wait_for(lambda: _frames_received(client) >= frames_before + 2, 10):
                raise TimeoutError("the node receives no camera frames")
            asked += 1
            result = client.query(instruction, timeout_s=max(1.0, deadline - time.monotonic()))
            answered += result.success
            print(f"\n[demo] scene {index}: {result.query_id}: {instruction!r}")
            print(f"       answer: {result.answer!r}" if result.success else "       (no answer)")
            print(f"       {_describe(result)}  [{result.latency_s:.2f} s]")
            if result.success and truth:
                predicted = np.zeros(truth[0].shape, bool)
                for target in result.targets:
                    predicted |= imgmsg_to_cv2(target.mask) > 0
                truth_union = np.logical_or.reduce(truth)
                print(f"       IoU with the ground truth: {_iou(predicted, truth_union):.2f}")
            if result.success and client.wait_for(
                    lambda: any(stamp_ns(o.header) == stamp_ns(result.header) for o in client.overlays), 5):
                overlay = next(o for o in client.overlays if stamp_ns(o.header) == stamp_ns(result.header))
                path = out / f"scene_{index}_{result.query_id}.png"
                cv2.imwrite(str(path), cv2.cvtColor(imgmsg_to_cv2(overlay), cv2.COLOR_RGB2BGR))
                print(f"       overlay: {path}")
            last_query = instruction
        if last_query is not None:
            asked += 1
            response = client.segment(Segment.Request(query=last_query, query_id="demo-service"),
                                      timeout_s=max(1.0, deadline - time.monotonic()))
            answered += response.success
            print(f"\n[demo] service /lisa/segment, {response.query_id}: {last_query!r}")
            print(f"       answer: {response.answer!r}; {_describe(response)}")
    except TimeoutError as error:
        print(f"[demo] gave up: {error}")
    finally:
        camera.close()
        client.close()
        rclpy.try_shutdown()
        node.send_signal(signal.SIGINT)
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    label = " (untrained tiny preset)" if untrained else ""
    print(f"\n[demo] {answered} of {asked} instructions answered{label}; node exit code {node.returncode}; "
          f"overlays in {out}/")
    return 0 if asked and answered == asked and node.returncode == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=4, help="how many scenes to play")
    parser.add_argument("--seed", type=int, default=0, help="which synthetic scenes")
    parser.add_argument("--out", default="out/demo", help="folder for the overlay PNGs and the node log")
    parser.add_argument("--model-path", default="", help="model folder; empty: the embedded demo model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
