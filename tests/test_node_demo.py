"""`python -m lisa_ros.demo` (what `make demo` runs), end to end: node process, topics, PNGs, exit code."""

import subprocess
import sys

import cv2

from node_support import write_segmenting_model
from ros_support import child_env, reserved_domain_id


def test_demo_answers_every_instruction_and_writes_overlays(tmp_path):
    model = write_segmenting_model(tmp_path / "model")
    out = tmp_path / "demo"
    log_dir = tmp_path / "ros_log"
    log_dir.mkdir()
    with reserved_domain_id() as domain_id:
        completed = subprocess.run(
            [sys.executable, "-m", "lisa_ros.demo", "--scenes", "2", "--out", str(out), "--model-path", str(model),
             "--timeout", "120"],
            env=child_env(domain_id, log_dir), capture_output=True, text=True, timeout=180)
    printed = completed.stdout + completed.stderr
    assert completed.returncode == 0, printed
    assert "3 of 3 instructions answered" in printed and "node exit code 0" in printed
    assert printed.count("main target: pixel (") == 3, "each answer prints its target's centroid"
    assert "3D (" in printed, "the demo camera's depth gives a 3D point"
    assert "UNTRAINED" not in printed, "a given model is not labelled as the tiny preset"
    overlays = sorted(out.glob("scene_*.png"))
    assert len(overlays) == 2
    image = cv2.imread(str(overlays[0]))
    assert image.shape == (720, 1280, 3)  # the first demo scene: a 16:9 camera
    assert "Traceback" not in (out / "node.log").read_text()
