"""The demo `make demo` runs: the perception node as its own process, fed through real ROS topics.

    python -m lisa_ros.demo [--scenes 4] [--out out/demo] [--model-path DIR] [--device cpu]

It starts the installed node with the embedded demo model (models/demo when present, else the
untrained tiny preset, which it says loudly), plays the scenes shipped beside the demo model
(models/demo/scenes: frame, depth and CameraInfo as a 5 Hz camera; see training.demo_scenes), asks
each scene's instruction on /lisa/query, prints each answer with the main target's pixel and 3D
centroid and the IoU with the scene's ground truth, writes the node's overlay images as PNGs, asks the
last instruction again through the /lisa/segment service, and stops the node with SIGINT.
Exit code 0 when every instruction got its answer, 1 otherwise (or after --timeout seconds), 2 when
the scenes cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lisa_core.errors import InputError
from lisa_ros.model_source import demo_model_dirs

CAMERA_RATE_HZ = 5.0
SCENES_FOLDER = "scenes"  # beside the demo model
SCENES_FILE = "scenes.json"


@dataclass(frozen=True)
class DemoScene:
    """One scene as the camera shows it, with the instruction to ask and its ground truth."""

    image: np.ndarray  # RGB uint8 (H, W, 3)
    depth: np.ndarray  # 16UC1 millimetres (H, W), registered to the image
    truth: np.ndarray  # bool (H, W): the union of the targets
    instruction: str
    k: tuple[float, ...]  # the 3x3 intrinsics row by row, pixels


def scenes_dir() -> Path:
    """The scenes folder beside the demo model, looked up where the model is (demo_model_dirs)."""
    candidates = [folder / SCENES_FOLDER for folder in demo_model_dirs()]
    for candidate in candidates:
        if (candidate / SCENES_FILE).is_file():
            return candidate
    raise InputError(f"no demo scenes: {SCENES_FILE} is in none of {', '.join(map(str, candidates))} "
                     "(write them with python -m training.demo_scenes)")


def _read_png(path: Path, flags: int, dtype, channels: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise InputError(f"{path}: missing or not a readable image")
    if image.dtype != dtype or (image.shape[2] if image.ndim == 3 else 1) != channels:
        raise InputError(f"{path}: expected {channels}-channel {np.dtype(dtype)}, got {image.dtype} {image.shape}")
    return image


def load_scenes(folder: Path) -> list[DemoScene]:
    """The scenes listed in `folder`/scenes.json (the format training.demo_scenes writes)."""
    index_path = folder / SCENES_FILE
    try:
        entries = json.loads(index_path.read_text())["scenes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{index_path}: not a readable scene list ({type(error).__name__}: {error})") from error
    if not entries:
        raise InputError(f"{index_path}: lists no scenes")
    return [_load_scene(folder, number, entry) for number, entry in enumerate(entries)]


def _load_scene(folder: Path, number: int, entry: dict) -> DemoScene:
    try:
        files = {name: folder / entry[name] for name in ("image", "depth", "mask")}
        instruction = str(entry["instruction"])
        k = tuple(float(value) for value in entry["camera"]["k"])
        size = (int(entry["camera"]["height"]), int(entry["camera"]["width"]))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{folder / SCENES_FILE}: scene {number}: a field is missing or malformed "
                         f"({type(error).__name__}: {error})") from error
    if len(k) != 9:
        raise InputError(f"{folder / SCENES_FILE}: scene {number}: camera k has {len(k)} values, not 9")
    arrays = {
        "image": _read_png(files["image"], cv2.IMREAD_COLOR, np.uint8, 3),
        "depth": _read_png(files["depth"], cv2.IMREAD_UNCHANGED, np.uint16, 1),
        "mask": _read_png(files["mask"], cv2.IMREAD_GRAYSCALE, np.uint8, 1),
    }
    for name, array in arrays.items():
        if array.shape[:2] != size:
            raise InputError(f"{files[name]}: {array.shape[1]}x{array.shape[0]}, but the camera is "
                             f"{size[1]}x{size[0]}")
    image = cv2.cvtColor(arrays["image"], cv2.COLOR_BGR2RGB)
    return DemoScene(image, arrays["depth"], arrays["mask"] > 0, instruction, k)


class Camera:
    """Publishes one scene's image (new stamp each time), depth and CameraInfo at CAMERA_RATE_HZ."""

    def __init__(self, client):
        self._client = client
        self._scene = None
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def show(self, scene: DemoScene) -> None:
        with self._lock:
            self._scene = scene

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)

    def _run(self) -> None:
        while self._running:
            with self._lock:
                scene = self._scene
            if scene is not None:
                height, width = scene.image.shape[:2]
                header = self._client.publish_frame(scene.image, time.time_ns(), "demo_camera_optical")
                self._client.publish_depth(scene.depth, header)
                self._client.publish_camera_info(header, scene.k, width, height)
            time.sleep(1.0 / CAMERA_RATE_HZ)


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

    try:
        scenes = load_scenes(scenes_dir())
    except InputError as error:
        print(f"[demo] {error}")
        return 2
    if not 1 <= arguments.scenes <= len(scenes):
        print(f"[demo] --scenes must be between 1 and {len(scenes)}, the number of demo scenes")
        return 2
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
        for index, scene in enumerate(scenes[:arguments.scenes]):
            instruction = scene.instruction
            frames_before = client.frames_received()
            camera.show(scene)
            if not client.wait_for(lambda: client.frames_received() >= frames_before + 2, 10):
                raise TimeoutError("the node receives no camera frames")
            asked += 1
            result = client.query(instruction, timeout_s=max(1.0, deadline - time.monotonic()))
            answered += result.success
            print(f"\n[demo] scene {index}: {result.query_id}: {instruction!r}")
            print(f"       answer: {result.answer!r}" if result.success else "       (no answer)")
            print(f"       {_describe(result)}  [{result.latency_s:.2f} s]")
            if result.success and scene.truth.any():
                predicted = np.zeros(scene.truth.shape, bool)
                for target in result.targets:
                    predicted |= imgmsg_to_cv2(target.mask) > 0
                print(f"       IoU with the ground truth: {_iou(predicted, scene.truth):.2f}")
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
    parser.add_argument("--scenes", type=int, default=4, help="how many of the demo scenes to play")
    parser.add_argument("--out", default="out/demo", help="folder for the overlay PNGs and the node log")
    parser.add_argument("--model-path", default="", help="model folder; empty: the embedded demo model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
