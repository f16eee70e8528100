"""Depth is paired with the frame the worker took, however long the answer takes: a depth camera that
keeps publishing (newer stamps, other depths) while the model answers does not take the 3D point away
or change it, also when the frame's own depth image arrives after the worker took the frame.
"""

import time

import numpy as np
import pytest

from hardening_support import end_process, start_perception_node
from node_support import FRAME_ID, K, depth_image, scene, write_segmenting_model
from ros_support import ros_session
from lisa_ros.outputs import DEPTH_BUFFER_LENGTH
from lisa_ros.status import Status

FRAME_DEPTH_MM = 1500  # depth_image()'s valid depth: the frame's own depth image
LATER_DEPTH_MM = 3000  # the depth images published while the model answers
LATER_STAMP_OFFSET_NS = 200_000_000  # later depth images are at least this far from the frame (> depth_max_offset)
LONG_ANSWER = 24  # tokens, each a [SEG]: long enough for many depth images to arrive meanwhile
DEPTH_PERIOD_S = 0.005
DEPTH_WRITER_HISTORY = 100
DEPTH_WAIT_S = 5.0  # the node's depth_wait here: far longer than a one-token answer takes
DEPTH_DELAY_S = 1.5  # the frame's depth image comes this long after the query


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("depth_pairing")) as session:
        yield session


@pytest.fixture(scope="module")
def client(ros):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from lisa_ros.client import PerceptionClient
    from lisa_ros.parameters import DEFAULT_NAMES

    model = write_segmenting_model(ros["tmp"] / "segmenting_model")
    process, log = start_perception_node(ros, {"model_path": str(model), "max_image_age": 0.0, "cpu_threads": 1,
                                               "depth_wait": DEPTH_WAIT_S})
    client = PerceptionClient(ros["context"], name="depth_pairing_user")
    # A burst from the client's keep-last-1 depth writer would replace images not yet acknowledged (the
    # frame's own among them); a deep history delivers every one, as a driver's queue would.
    client.node.destroy_publisher(client.depth_pub)
    client.depth_pub = client.node.create_publisher(Image, DEFAULT_NAMES["depth_topic"], QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=DEPTH_WRITER_HISTORY, reliability=ReliabilityPolicy.RELIABLE))
    try:
        client.wait_for_node(60)
        assert client.wait_for(lambda: all(p.get_subscription_count() > 0 for p in
                                           (client.image_pub, client.depth_pub, client.camera_info_pub)), 30), \
            log.read_text()[-3000:]
        yield client
    finally:
        client.close()
        end_process(process)


def _answer_while_depth_streams(client, depth_late: bool):
    """Publishes a frame (with its depth image first, or only once the model answers) and asks a long
    query; while it is answered, publishes more than DEPTH_BUFFER_LENGTH later depth images. The main
    target of the result."""
    from lisa_ros.action import Query

    stamp = time.time_ns()
    header = client.publish_frame(scene(0), stamp, FRAME_ID)
    if not depth_late:
        client.publish_depth(depth_image(), header)
    client.publish_camera_info(header, K, 160, 120)
    frames = client.frames_received()
    assert client.wait_for(lambda: client.frames_received() > frames, 10), "the node has the frame"

    feedback = []
    handle = client.send_goal(Query.Goal(query="Where is the red box?", max_new_tokens=LONG_ANSWER), feedback)
    result_future = handle.get_result_async()

    def generating():
        with client.lock:
            return any(message.stage == message.STAGE_GENERATING for _, message in feedback)
    assert client.wait_for(generating, 30), "the model took the query"
    if depth_late:
        client.publish_depth(depth_image(), header)
    later = np.where(depth_image() > 0, LATER_DEPTH_MM, 0).astype(np.uint16)
    published = 0
    while not result_future.done():
        later_header = type(header)(frame_id=FRAME_ID)
        later_header.stamp.sec, later_header.stamp.nanosec = divmod(
            stamp + LATER_STAMP_OFFSET_NS + published * 1_000_000, 1_000_000_000)
        client.publish_depth(later, later_header)
        published += 1
        if published > DEPTH_BUFFER_LENGTH + 5:  # a burst first: more than the buffer holds, however quick the answer
            time.sleep(DEPTH_PERIOD_S)
    assert published > DEPTH_BUFFER_LENGTH, f"only {published} depth images during the answer: it was too quick"

    result = client.goal_result(handle)
    assert result.status == Status.OK, result.error
    assert (result.header.stamp.sec, result.header.stamp.nanosec) == (header.stamp.sec, header.stamp.nanosec)
    return max((t for t in result.targets if t.area_px > 0), key=lambda t: t.confidence)


def test_the_3d_point_comes_from_the_frames_own_depth_however_long_the_answer_takes(client):
    main = _answer_while_depth_streams(client, depth_late=False)
    assert main.centroid_3d_valid, main.depth_error
    assert main.centroid_3d.z == pytest.approx(FRAME_DEPTH_MM / 1000.0), "the frame's own depth image"


def test_a_depth_image_that_arrives_after_the_frame_was_taken_still_pairs_with_it(client):
    """The frame's depth comes once the model is answering and is then pushed out of the buffer by
    newer ones: the taken frame was offered it on arrival."""
    main = _answer_while_depth_streams(client, depth_late=True)
    assert main.centroid_3d_valid, main.depth_error
    assert main.centroid_3d.z == pytest.approx(FRAME_DEPTH_MM / 1000.0), "the frame's own depth image"


def test_an_answer_waits_for_a_depth_image_still_in_transit(client):
    """A one-token answer is ready long before the frame's depth image comes: the result waits for it
    (depth_wait) instead of going out without a 3D point."""
    stamp = time.time_ns()
    header = client.publish_frame(scene(0), stamp, FRAME_ID)
    client.publish_camera_info(header, K, 160, 120)
    frames = client.frames_received()
    assert client.wait_for(lambda: client.frames_received() > frames, 10), "the node has the frame"
    from lisa_ros.action import Query

    sent = time.monotonic()
    handle = client.send_goal(Query.Goal(query="Where is the red box?", max_new_tokens=1))
    time.sleep(DEPTH_DELAY_S)
    client.publish_depth(depth_image(), header)
    result = client.goal_result(handle)
    assert result.status == Status.OK, result.error
    assert time.monotonic() - sent >= DEPTH_DELAY_S
    main = max((t for t in result.targets if t.area_px > 0), key=lambda t: t.confidence)
    assert main.centroid_3d_valid, main.depth_error
    assert main.centroid_3d.z == pytest.approx(FRAME_DEPTH_MM / 1000.0)
