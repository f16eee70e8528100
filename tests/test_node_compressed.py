"""Compressed camera input (`image_transport: compressed`, `<image_topic>/compressed`) through the real
node: png frames give the raw frame's masks exactly, jpeg ones nearly, corrupt data is a named bad image
and the node keeps serving."""

import numpy as np
import pytest

from hardening_support import end_process, start_perception_node, wait_for_status
from node_support import scene, write_segmenting_model
from ros_support import ros_session
from lisa_ros.status import Status

FRAME = scene(3)


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    with ros_session(tmp_path_factory.mktemp("compressed")) as session:
        yield session


@pytest.fixture(scope="module")
def node(ros):
    model = write_segmenting_model(ros["tmp"] / "segmenting_model")
    process, log = start_perception_node(ros, {"model_path": str(model), "image_transport": "compressed",
                                               "max_new_tokens": 1, "max_image_age": 0.0, "cpu_threads": 1,
                                               "diagnostics_rate_hz": 5.0})
    yield dict(process=process, log=log)
    end_process(process)


@pytest.fixture(scope="module")
def client(ros, node):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    from lisa_ros.client import PerceptionClient
    from lisa_ros.parameters import COMPRESSED_SUFFIX, DEFAULT_NAMES

    client = PerceptionClient(ros["context"], name="compressed_user", camera=False)
    client.wait_for_node(timeout_s=60)
    client.compressed_pub = client.node.create_publisher(
        CompressedImage, f"{DEFAULT_NAMES['image_topic']}/{COMPRESSED_SUFFIX}",
        QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE))
    assert client.wait_for(lambda: client.compressed_pub.get_subscription_count() > 0, 30)
    yield client
    client.close()


def _answer_on(client, message):
    from lisa_ros.image_conv import imgmsg_to_cv2

    client.compressed_pub.publish(message)
    assert client.wait_for(lambda: client.frames_received() >= 1, 10)
    result = client.query(f"the box {message.format}")
    assert result.status == Status.OK, result.error
    return imgmsg_to_cv2(result.targets[0].mask) > 0


def _raw_mask(tmp_path):
    from lisa_core.pipeline import LisaPipeline

    pipeline = LisaPipeline.from_pretrained(tmp_path, max_new_tokens=1)
    return pipeline.segment(FRAME, "the box").targets[0].mask


def test_png_frames_give_the_raw_frames_masks_and_jpeg_nearly(client, ros):
    from lisa_ros.image_conv import cv2_to_compressed_imgmsg

    raw = _raw_mask(ros["tmp"] / "segmenting_model")
    png = _answer_on(client, cv2_to_compressed_imgmsg(FRAME, "png"))
    assert (png == raw).all()
    jpeg = _answer_on(client, cv2_to_compressed_imgmsg(FRAME, "jpeg"))
    assert (jpeg != raw).mean() < 0.02


def test_corrupt_compressed_data_is_a_named_bad_image_and_the_node_keeps_serving(client):
    from lisa_ros.image_conv import cv2_to_compressed_imgmsg

    broken = cv2_to_compressed_imgmsg(FRAME, "png")
    broken.data = bytes(broken.data)[:40]
    client.compressed_pub.publish(broken)
    status = wait_for_status(client, lambda s: "bad image" in (s["last_error"] or ""), 10,
                             repeat=lambda: client.compressed_pub.publish(broken))
    assert status is not None and status["counts"]["bad_frames"] >= 1, client.statuses[-1:]
    assert "png" in status["last_error"] or "compressed" in status["last_error"], status["last_error"]
    assert _answer_on(client, cv2_to_compressed_imgmsg(FRAME, "png")).any()


def test_damage_inside_a_file_is_the_bad_image_outcome_of_the_query_that_takes_it(client):
    """Arrival checks only the format, the end marker and the size; the worker decodes the frame it
    takes, and a file that does not decode is that query's BAD_IMAGE (the node keeps serving)."""
    from lisa_ros.image_conv import cv2_to_compressed_imgmsg

    damaged = cv2_to_compressed_imgmsg(FRAME, "png")
    data = bytearray(damaged.data)
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(16)
    damaged.data = bytes(data)
    frames = client.frames_received()
    client.compressed_pub.publish(damaged)
    assert client.wait_for(lambda: client.frames_received() > frames, 10)
    result = client.query("the box")
    assert result.status == Status.BAD_IMAGE, (result.status, result.error)
    assert "corrupt" in result.error and "png" in result.error, result.error
    assert _answer_on(client, cv2_to_compressed_imgmsg(FRAME, "png")).any()


def test_a_file_whose_header_is_too_large_is_refused_before_it_is_decoded(client):
    """A png claiming 100000 x 100000 pixels (a decompression bomb) is refused from its header."""
    import struct

    from sensor_msgs.msg import CompressedImage

    header = struct.pack(">II", 100_000, 100_000) + bytes([8, 2, 0, 0, 0])
    data = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + bytes(4)
            + bytes(4) + b"IEND\xaeB`\x82")
    bomb = CompressedImage(format="png", data=data)
    client.compressed_pub.publish(bomb)
    status = wait_for_status(client, lambda s: "max_image_pixels" in (s["last_error"] or ""), 10,
                             repeat=lambda: client.compressed_pub.publish(bomb))
    assert status is not None and "100000x100000" in status["last_error"], client.statuses[-1:]
