"""Hardening: bad images, bad depth, bad instructions, a model fault, a camera that stops and comes back,
SIGINT during an inference. One real node process serves the module, over real DDS; this test process
publishes frames and instructions (small frames: Fast DDS's default shared memory carries them), a
child process publishes the 8000x8000 frames and, later, the camera stream.

Each bad input must be named on /diagnostics (last_error, and counted) and in the node's log, each bad
instruction must get its outcome with the status code naming the kind, and the next good query must
get a normal result. The tests run in file order; SIGINT comes last.
"""

import os
import signal
import time

import numpy as np
import pytest

from hardening_support import (collect_every_result, end_process, error_reported, keep_all_query_publisher,
                               new_results, set_parameters, start_perception_node, wait_for_status)
from node_support import CAMERA_CODE, K, scene, write_segmenting_model
from lisa_ros.status import Status
from ros_support import ros_session, start_python, stop_process

MAX_NEW_TOKENS = 2  # the test model answers '[SEG][SEG]'
IMAGE_TOPIC = "/camera/image_raw"

# Publishes one huge frame again and again until killed. Its own Fast DDS profile gives it a shared
# memory segment the frame fits in (the default 0.5 MB segment would send it as ~150k UDP fragments).
HUGE_FRAME_CODE = """
import sys, time, numpy as np, rclpy
from lisa_ros.client import PerceptionClient
rclpy.init()
camera = PerceptionClient(rclpy.get_default_context(), name="huge_camera")
side = int(sys.argv[1])
image = np.zeros((side, side, 3), np.uint8)
while camera.image_pub.get_subscription_count() == 0:
    time.sleep(0.05)
try:
    while rclpy.ok():
        camera.publish_frame(image, time.time_ns())
        time.sleep(0.5)
except KeyboardInterrupt:
    pass
"""
HUGE_FRAME_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<profiles xmlns="http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles">
  <transport_descriptors>
    <transport_descriptor><transport_id>huge_shm</transport_id><type>SHM</type>
      <segment_size>419430400</segment_size></transport_descriptor>
    <transport_descriptor><transport_id>huge_udp</transport_id><type>UDPv4</type></transport_descriptor>
  </transport_descriptors>
  <participant profile_name="huge_frames" is_default_profile="true">
    <rtps><userTransports><transport_id>huge_shm</transport_id><transport_id>huge_udp</transport_id>
      </userTransports><useBuiltinTransports>false</useBuiltinTransports></rtps>
  </participant>
</profiles>
"""


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("hardening_inputs")) as session:
        yield session


@pytest.fixture(scope="module")
def node(ros):
    model = write_segmenting_model(ros["tmp"] / "segmenting_model")
    process, log = start_perception_node(ros, {
        "model_path": str(model), "max_new_tokens": MAX_NEW_TOKENS, "max_image_age": 2.0,
        "diagnostics_rate_hz": 2.0, "cpu_threads": 1})
    yield dict(process=process, log=log)
    end_process(process)


@pytest.fixture(scope="module")
def client(ros, node):
    from lisa_ros.client import PerceptionClient

    client = PerceptionClient(ros["context"], name="hardening_user")
    status = client.wait_for_node(timeout_s=90)
    assert status["model_loaded"], (status, node["log"].read_text())
    assert client.wait_for(lambda: client.image_pub.get_subscription_count() > 0
                           and client.depth_pub.get_subscription_count() > 0, 20)
    yield client
    client.close()


def _now_header(client, image=None):
    """Publishes a frame stamped now (three times: best effort may lose one); its header."""
    header = None
    for _ in range(3):
        header = client.publish_frame(scene(0) if image is None else image, time.time_ns())
        time.sleep(0.03)
    return header


def _query(client, text):
    """Publishes an instruction; the first outcome that follows (queries here go one at a time)."""
    from std_msgs.msg import String

    with client.lock:
        seen = len(client.results)
    client.query_pub.publish(String(data=text))
    assert client.wait_for(lambda: len(new_results(client, seen)) > 0, 60), f"no outcome for {text!r}"
    return new_results(client, seen)[0]


def _good_query(client, text="Where is the red box?"):
    _now_header(client)
    result = _query(client, text)
    assert result.success and result.status == Status.OK, result.error
    assert len(result.targets) == MAX_NEW_TOKENS and result.targets[0].area_px > 0
    return result


def _count(client, key):
    """The node's latest diagnostic count `key` (frames, bad_frames, bad_depth or a status label)."""
    with client.lock:
        return client.statuses[-1]["counts"][key]


def _counted(key, above):
    """A condition for wait_for_status: the count `key` is above `above`."""
    return lambda status: status["counts"][key] > above


def _bad_image(width=160, height=120, encoding="rgb8", step=None, size=None):
    from sensor_msgs.msg import Image

    channels = {"rgb8": 3, "mono8": 1, "16UC1": 2, "32FC1": 4}.get(encoding, 3)
    step = width * channels if step is None else step
    size = height * step if size is None else size
    message = Image(width=width, height=height, encoding=encoding, step=step)
    message.header.stamp.sec = int(time.time())
    message.data = bytes(index % 251 for index in range(size))
    return message


BAD_IMAGES = {
    "data shorter than height*step": (dict(size=120 * 480 - 7), "image data has 57593 bytes, but height 120 x step 480 needs 57600"),
    "data longer than height*step": (dict(size=120 * 480 + 480), "image data has 58080 bytes, but height 120 x step 480 needs 57600"),
    "step smaller than a row": (dict(step=479), "step 479 is shorter than one row of 160 rgb8 pixels (480 bytes)"),
    "zero width": (dict(width=0), "image is empty: width 0, height 120"),
    "zero height": (dict(height=0), "image is empty: width 160, height 0"),
    "unknown encoding": (dict(encoding="yuv422_yuy2"), "encoding 'yuv422_yuy2' is not a colour or mono8 image"),
    "depth encoding on the colour topic": (dict(encoding="32FC1"), "encoding '32FC1' is not a colour or mono8 image"),
    "extreme aspect ratio": (dict(width=20000, height=1), "20000x1: one side is more than 50 times the other"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_named_on_status_and_in_the_log_and_the_node_keeps_serving(client, node, case):
    fields, expected = BAD_IMAGES[case]
    message = _bad_image(**fields)
    bad_frames = _count(client, "bad_frames")
    status = wait_for_status(client, lambda s: error_reported(expected)(s) and _counted("bad_frames", bad_frames)(s),
                             10, repeat=lambda: client.image_pub.publish(message))
    assert status is not None, (case, node["log"].read_text()[-3000:])
    assert status["last_error"].startswith(f"bad image on {IMAGE_TOPIC}: ")
    assert client.wait_for(lambda: expected in node["log"].read_text(), 5), "a log line names it"
    _good_query(client)


def test_8000x8000_frame_is_refused_before_conversion(ros, client, node):
    profile = ros["tmp"] / "huge_frames.xml"
    profile.write_text(HUGE_FRAME_PROFILE)
    env = dict(ros["env"], FASTDDS_DEFAULT_PROFILES_FILE=str(profile), FASTRTPS_DEFAULT_PROFILES_FILE=str(profile))
    huge = start_python(HUGE_FRAME_CODE, env, ros["tmp"] / "huge_camera.log", args=("8000",))
    try:
        expected = "8000x8000 is 64000000 pixels, more than max_image_pixels (16777216)"
        status = wait_for_status(client, error_reported(expected), 60)
        assert status is not None, (huge.output(), node["log"].read_text()[-3000:])
        assert expected in node["log"].read_text()
    finally:
        stop_process(huge)
    # The node's image subscription keeps the last CAMERA_HISTORY_DEPTH frames while it is busy: a loaded
    # host may still be taking huge frames after the camera has gone, and a query taken before the frames
    # behind them finds the newest accepted frame stale. So: quiet for a second (every huge frame taken),
    # then a frame of ours counted (best effort may lose the first ones), then the query.
    with client.lock:
        seen = len(client.statuses)
    quiet = wait_for_status(client, lambda s: float(s["seconds_since_frame"]) >= 1.0, 60, since=seen)
    assert quiet is not None, node["log"].read_text()[-3000:]
    assert wait_for_status(client, lambda s: s["counts"]["frames"] > quiet["counts"]["frames"], 10,
                           repeat=lambda: client.publish_frame(scene(0), time.time_ns()), since=seen) is not None
    _good_query(client)


def _publish_depth(client, header, depth=None, encoding="16UC1"):
    from lisa_ros.image_conv import cv2_to_imgmsg

    depth = np.full((120, 160), 1500, np.uint16) if depth is None else depth
    for _ in range(3):
        client.depth_pub.publish(cv2_to_imgmsg(depth, encoding, header))
        time.sleep(0.03)


def _query_with_depth(client, depth=None, encoding="16UC1"):
    """A frame and its depth image with one stamp, then a query; the query's result."""
    header = _now_header(client)
    _publish_depth(client, header, depth, encoding)
    result = client.query("What should I pick up?")
    assert result.success, result.error
    return result


def test_depth_without_camera_info_is_named_and_the_answer_still_comes(client, node):
    result = _query_with_depth(client)
    assert not any(t.centroid_3d_valid for t in result.targets)
    expected = f"{result.query_id}: no 3D point: no camera info received"
    assert wait_for_status(client, error_reported(expected), 5) is not None
    assert expected in node["log"].read_text()


def test_camera_info_with_zero_focal_length_is_named(client, node):
    def publish_info():
        client.publish_camera_info(_now_header(client), [0.0] * 9, 160, 120)
    publish_info()
    time.sleep(0.2)
    result = _query_with_depth(client)
    assert not any(t.centroid_3d_valid for t in result.targets)
    expected = f"{result.query_id}: no 3D point: camera intrinsics unusable: fx=0.0, fy=0.0"
    assert wait_for_status(client, error_reported(expected), 5) is not None, client.statuses[-1]
    assert expected in node["log"].read_text()


BAD_DEPTH = {
    "colour encoding": (lambda: _bad_image(encoding="rgb8"), "unsupported depth encoding 'rgb8'"),
    "8-bit mono": (lambda: _bad_image(encoding="mono8"), "unsupported depth encoding 'mono8'"),
    "unknown encoding": (lambda: _bad_image(encoding="depth_in_furlongs"), "unsupported depth encoding 'depth_in_furlongs'"),
    "short data": (lambda: _bad_image(encoding="32FC1", size=100), "image data has 100 bytes, but height 120 x step 640 needs 76800"),
    "step smaller than a row": (lambda: _bad_image(encoding="16UC1", step=100), "step 100 is shorter than one row of 160 16UC1 pixels"),
}


@pytest.mark.parametrize("case", list(BAD_DEPTH))
def test_bad_depth_image_is_named_and_the_node_keeps_serving(client, node, case):
    make, expected = BAD_DEPTH[case]
    message = make()
    bad_depth = _count(client, "bad_depth")
    status = wait_for_status(client, lambda s: error_reported(expected)(s) and _counted("bad_depth", bad_depth)(s),
                             10, repeat=lambda: client.depth_pub.publish(message))
    assert status is not None, (case, node["log"].read_text()[-3000:])
    assert status["last_error"].startswith("bad depth image: ")
    assert expected in node["log"].read_text()
    _good_query(client)


def test_depth_of_another_size_is_named_then_good_depth_gives_the_3d_point(client, node):
    client.publish_camera_info(_now_header(client), K, 160, 120)
    time.sleep(0.2)
    result = _query_with_depth(client, depth=np.full((60, 80), 1500, np.uint16))
    expected = f"{result.query_id}: no 3D point: depth is 80x60, the frame 160x120"
    assert wait_for_status(client, error_reported(expected), 5) is not None
    result = _query_with_depth(client)
    main = max(result.targets, key=lambda t: t.confidence)
    assert main.centroid_3d_valid and main.centroid_3d.z == pytest.approx(1.5)


# ---- instructions ----------------------------------------------------------------------------------

def _outcomes_of(client, seen, count, timeout_s=30):
    assert client.wait_for(lambda: len(new_results(client, seen)) >= count, timeout_s), \
        f"{len(new_results(client, seen))} of {count} outcomes"
    time.sleep(0.3)  # any extra outcome would show up now
    return new_results(client, seen)


BAD_INSTRUCTIONS = {
    "empty": ("", "bad query: the instruction is empty"),
    "whitespace only": (" \t\n  \r\n ", "bad query: the instruction is empty (only whitespace or control characters)"),
    "control characters only": ("\x01\x07\x1b\x7f\x85", "bad query: the instruction is empty (only whitespace or control characters)"),
    "100,000 characters": ("find the box " * 7693, "bad query: 100009 characters, more than max_query_chars (2000)"),
}


@pytest.mark.parametrize("case", list(BAD_INSTRUCTIONS))
def test_bad_instruction_is_refused_with_a_clear_error(client, node, case):
    from std_msgs.msg import String

    text, expected = BAD_INSTRUCTIONS[case]
    bad_queries = _count(client, Status.BAD_QUERY.label)
    with client.lock:
        seen = len(client.results)
    client.query_pub.publish(String(data=text))
    (outcome,) = _outcomes_of(client, seen, 1)
    assert not outcome.success and outcome.status == Status.BAD_QUERY and outcome.error == expected
    assert outcome.query == text[:2000], "a refused text is echoed up to max_query_chars"
    reported = error_reported(f"{outcome.query_id}: {expected}")
    assert wait_for_status(client, lambda s: reported(s) and _counted(Status.BAD_QUERY.label, bad_queries)(s),
                           5) is not None
    assert f"{outcome.query_id} " in node["log"].read_text()
    _good_query(client)


def test_control_characters_inside_an_instruction_become_spaces(client):
    result = _good_query(client, "find\x1b[31m the\x07 red\x00box")
    assert result.query == "find [31m the  red"  # a NUL ends a ROS string on the wire


def test_instruction_with_invalid_utf8_is_refused(client):
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String

    with pytest.raises(UnicodeEncodeError):  # rclpy refuses lone surrogates: they never reach the wire
        client.query_pub.publish(String(data="the \ud800 box"))
    # Another client library may send any bytes (rclpy decodes them to U+FFFD): here the serialized
    # message itself.
    wire = serialize_message(String(data="the XXXX box")).replace(b"XXXX", b"\xff\xfe\xc3\x28")
    _now_header(client)
    with client.lock:
        seen = len(client.results)
    client.query_pub.publish(wire)
    (outcome,) = _outcomes_of(client, seen, 1)
    assert not outcome.success and outcome.status == Status.BAD_QUERY
    assert outcome.error == "bad query: the instruction is not valid UTF-8 (undecodable bytes at character 4)"
    _good_query(client)


def test_undecodable_instruction_message_is_logged_and_the_node_keeps_serving(client, node):
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String

    wire = serialize_message(String(data="abc"))
    broken = wire[:4] + (10_000).to_bytes(4, "little") + wire[8:]  # a string length past the end
    client.query_pub.publish(broken)
    time.sleep(0.5)
    assert node["process"].poll() is None, node["log"].read_text()[-3000:]
    _good_query(client)


def test_a_flood_of_bad_instructions_gets_one_outcome_each(client, node):
    from std_msgs.msg import String

    every_result = collect_every_result(client)
    publisher = keep_all_query_publisher(client)
    time.sleep(0.5)  # the new subscription and publisher match the node's
    texts = ["", "   ", "\x01\x02", "x" * 5000] * 100
    started = time.monotonic()
    for text in texts:
        publisher.publish(String(data=text))
    sent_in = time.monotonic() - started

    def outcomes():
        with client.lock:
            return [r for r in every_result if r.status == Status.BAD_QUERY and r.error.startswith("bad query: ")]
    client.wait_for(lambda: len(outcomes()) >= len(texts), 20)
    time.sleep(0.3)  # any extra outcome would show up now
    ids = [o.query_id for o in outcomes()]
    assert len(ids) == len(texts) and len(set(ids)) == len(ids), (len(ids), len(set(ids)), sent_in)
    assert node["process"].poll() is None
    _good_query(client)


# ---- faults ----------------------------------------------------------------------------------------

def test_model_fault_fails_that_query_and_the_next_one_is_answered(client):
    # Room for 1000 new tokens leaves the 1024-token model no room for its prompt: the pipeline raises.
    assert all(r.successful for r in set_parameters(client, max_new_tokens=1000))
    try:
        _now_header(client)
        failed = client.query("Where is the red box?")
    finally:
        assert all(r.successful for r in set_parameters(client, max_new_tokens=MAX_NEW_TOKENS))
    assert not failed.success and failed.status == Status.BAD_QUERY and failed.error.startswith("bad query: ") \
        and "max_new_tokens" in failed.error, failed.error
    _good_query(client)


def test_frame_the_model_cannot_take_is_refused_and_the_next_query_answered(client, node):
    from lisa_ros.image_conv import cv2_to_imgmsg
    from lisa_ros.srv import Segment

    # 1 x 20000 px: few pixels, but CLIP scales the short side to 224 px (20000 x 224 x 3 floats):
    # the model would need gigabytes. Through the service, which takes the image with the query.
    request = Segment.Request(query="the box", use_image=True,
                              image=cv2_to_imgmsg(np.zeros((1, 20000, 3), np.uint8), "rgb8"))
    started = time.monotonic()
    response = client.segment(request)
    assert not response.success and response.status == Status.BAD_IMAGE, response.error
    assert response.error.startswith("bad image in the request: 20000x1: one side is more than"), response.error
    assert time.monotonic() - started < 5
    _good_query(client)


def test_camera_stopping_and_restarting_is_survived(ros, client, node):
    stamps_file = ros["tmp"] / "camera_stamps.jsonl"
    stamps_file.touch()

    def start_camera(run):
        return start_python(CAMERA_CODE, ros["env"], ros["tmp"] / f"camera_{run}.log",
                            args=("--rate", "10", "--stamps-file", str(stamps_file)))

    def frames_published():
        return len(stamps_file.read_text().splitlines())

    camera = start_camera(1)
    try:
        assert client.wait_for(lambda: frames_published() >= 3, 30), camera.output()
        assert client.query("Where is the red box?").success
    finally:
        os.kill(camera.pid, signal.SIGKILL)  # a camera driver that dies: no goodbye
        camera.process.wait()
    time.sleep(2.5)  # longer than max_image_age
    stale = client.query("Where is the red box?")
    assert not stale.success and stale.status == Status.FRAME_TOO_OLD and stale.error.startswith("frame too old"), \
        stale.error
    camera = start_camera(2)
    try:
        before = frames_published()
        assert client.wait_for(lambda: frames_published() >= before + 3, 30), camera.output()
        result = client.query("Where is the red box?")
        assert result.success, result.error
    finally:
        stop_process(camera)
    assert node["process"].poll() is None


def test_sigint_during_an_inference_ends_the_node_within_2_s_without_a_traceback(client, node):
    from std_msgs.msg import String

    process = node["process"]
    # 600 [SEG] tokens (and 600 masks) take seconds; the 1024-token context still has room for the prompt.
    # min_confidence 1 leaves the masks out of the result, which stays small.
    assert all(r.successful for r in set_parameters(client, max_new_tokens=600, max_image_age=0.0,
                                                    min_confidence=1.0))
    _now_header(client)
    with client.lock:
        seen, results_seen = len(client.statuses), len(client.results)
    client.query_pub.publish(String(data="Where is it?"))
    assert client.wait_for(lambda: any(s["busy"] for s in client.statuses[seen:]), 10), "no inference started"
    time.sleep(0.2)
    assert not new_results(client, results_seen), "still inside the inference when the signal comes"
    started = time.monotonic()
    os.kill(process.pid, signal.SIGINT)
    process.wait(10)
    elapsed = time.monotonic() - started
    log = node["log"].read_text()
    assert elapsed < 2.0, elapsed
    print(f"\nSIGINT during an inference: node ended in {elapsed:.2f} s")
    assert process.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    client.wait_for(lambda: new_results(client, results_seen), 2)
    # Exactly one: its answer, or that the generation was stopped (or abandoned when it did not stop in time).
    (outcome,) = new_results(client, results_seen)
    assert outcome.status == Status.OK or (outcome.status == Status.SHUTTING_DOWN and (
        outcome.error.startswith("node shutting down: generation cancelled after ")
        or outcome.error == "node shutting down: inference abandoned")), outcome.error
