"""Several cameras, one node, one model: each camera's queries answered on its own topics with its own
frames; a camera without frames does not hold the others up; tracking on two cameras at once."""

import json
import time

import pytest

from hardening_support import end_process, new_results, set_parameters, start_perception_node
from node_support import CAMERA_CODE, write_segmenting_model
from ros_support import ros_session, start_python, stop_process
from lisa_ros.status import Status

CAMERAS = ("cam_a", "cam_b", "cam_c")
WITH_FRAMES = ("cam_a", "cam_b")  # cam_c stays dark
# cam_b's inputs are set by its own parameters (cam_b.image_topic, ...), as a robot's driver names them.
CAM_B_INPUTS = {"image_topic": "/elsewhere/cam_b/image_raw", "depth_topic": "/elsewhere/cam_b/depth",
                "camera_info_topic": "/elsewhere/cam_b/info"}


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("cameras")) as session:
        yield session


@pytest.fixture(scope="module")
def node(ros):
    model = write_segmenting_model(ros["tmp"] / "segmenting_model")
    process, log = start_perception_node(ros, {
        "model_path": str(model), "cameras": list(CAMERAS), "max_new_tokens": 1, "max_image_age": 10.0,
        "cpu_threads": 1, "track_rate_hz": 30.0,
        **{f"cam_b.{name}": topic for name, topic in CAM_B_INPUTS.items()}})
    yield dict(process=process, log=log)
    end_process(process)


@pytest.fixture(scope="module")
def clients(ros, node):
    from lisa_ros.client import PerceptionClient

    clients = {}
    for camera in CAMERAS:
        topics = CAM_B_INPUTS if camera == "cam_b" else None
        clients[camera] = PerceptionClient(ros["context"], name=f"user_{camera}", camera=False,
                                           camera_name=camera, topics=topics)
    for client in clients.values():
        client.wait_for_node(timeout_s=60)
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def cameras(ros, clients):
    processes, stamp_files = [], {}
    for camera in WITH_FRAMES:
        stamp_files[camera] = ros["tmp"] / f"{camera}_stamps.jsonl"
        stamp_files[camera].touch()
        args = ["--rate", "10", "--stamps-file", str(stamp_files[camera]), "--camera-name", camera]
        if camera == "cam_b":  # published where cam_b's own topic parameters point
            args += ["--topics", json.dumps(CAM_B_INPUTS)]
        processes.append(start_python(CAMERA_CODE, ros["env"], ros["tmp"] / f"{camera}.log", args=tuple(args)))

    def stamps(camera):
        return [json.loads(line) for line in stamp_files[camera].read_text().splitlines() if line]
    for camera in WITH_FRAMES:
        assert clients[camera].wait_for(lambda: len(stamps(camera)) >= 3, 30), (ros["tmp"] / f"{camera}.log").read_text()
    yield stamps
    for process in processes:
        stop_process(process)


def _stamp(header):
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def test_one_model_serves_every_camera(node, clients):
    log = node["log"].read_text()
    assert log.count("loading from") == 1, log
    for camera, client in clients.items():
        status = client.statuses[-1]
        assert status["camera"] == camera and status["model_loaded"]


def test_each_query_is_answered_on_its_own_cameras_frames_and_topics(clients, cameras):
    from std_msgs.msg import String

    seen = {camera: len(client.results) for camera, client in clients.items()}
    for camera, client in clients.items():  # all at once: the waiting ones share one model call
        client.query_pub.publish(String(data=f"where is the box for {camera}?"))
    for camera, client in clients.items():
        assert client.wait_for(lambda: len(new_results(client, seen[camera])) >= 1, 30), camera
    for camera, client in clients.items():
        result = new_results(client, seen[camera])[0]
        assert result.camera == camera and result.query == f"where is the box for {camera}?"
        if camera in WITH_FRAMES:
            assert result.status == Status.OK, result.error
            assert _stamp(result.header) in cameras(camera), "answered on this camera's frame"
            assert all(_stamp(result.header) not in cameras(other) for other in WITH_FRAMES if other != camera)
            assert result.targets[0].centroid_3d_valid
        else:
            assert result.status == Status.NO_FRAME and "cam_c/camera/image_raw" in result.error, result.error


def test_a_dark_camera_does_not_delay_the_others(clients, cameras):
    from std_msgs.msg import String

    single = clients["cam_a"].query("Where is the red box?")
    assert single.success
    seen = len(clients["cam_a"].results)
    for _ in range(3):
        clients["cam_c"].query_pub.publish(String(data="dark"))
    answered = clients["cam_a"].query("Where is the red box now?")
    assert answered.success and len(new_results(clients["cam_a"], seen)) >= 1
    # The dark camera's queries are refused without a model call, so cam_a waits at most one call.
    assert answered.latency_s < single.latency_s + 2.0, (answered.latency_s, single.latency_s)


def test_tracking_on_two_cameras_at_once(clients, cameras):
    client_a, client_b = clients["cam_a"], clients["cam_b"]
    assert all(r.successful for r in set_parameters(client_a, tracking=True))
    try:
        first_a = client_a.query("Track the red box")
        first_b = client_b.query("Track the red box")
        assert first_a.success and first_b.success
        time.sleep(2.0)
        tracked = {camera: [r for r in new_results(client, 0) if r.tracked]
                   for camera, client in (("cam_a", client_a), ("cam_b", client_b))}
        for camera, results in tracked.items():
            assert len(results) >= 3, (camera, len(results))
            assert all(_stamp(r.header) in cameras(camera) and r.camera == camera for r in results)
    finally:
        client_a.stop_tracking()
        client_b.stop_tracking()
        assert all(r.successful for r in set_parameters(client_a, tracking=False))
