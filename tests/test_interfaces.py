"""The generated interfaces: they import, have the documented fields and status codes, and carry every
field intact between two processes over DDS."""

import textwrap

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import Point, Pose, Vector3
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import RegionOfInterest
from std_msgs.msg import Header

from lisa_ros.action import Query
from lisa_ros.image_conv import cv2_to_imgmsg, imgmsg_to_cv2
from lisa_ros.msg import SegmentationResult, Target
from lisa_ros.srv import ResetConversation, Segment
from lisa_ros.status import Status
from ros_support import ros_env, start_python, stop_process, wait_for_publishers, wait_until  # noqa: F401

QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def sample_result() -> SegmentationResult:
    """A result with two targets whose masks hold real, different pixel data, every field set (the
    second target without 3D values, as without depth); same on every call."""
    header = Header(frame_id="camera_color_optical_frame")
    header.stamp.sec, header.stamp.nanosec = 1764230400, 123456789
    rng = np.random.default_rng(7)
    targets = []
    for index, (height, width) in enumerate([(48, 64), (48, 64)]):
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[5 + index:30, 10:40 - index] = 255
        mask[rng.random((height, width)) < 0.05] = 255
        rows, cols = np.nonzero(mask)
        box_3d_center = Pose()
        box_3d_center.position = Point(x=0.0625, y=-0.125, z=1.5 + index)
        targets.append(Target(
            mask=cv2_to_imgmsg(mask, "mono8", header),
            confidence=0.875 - 0.25 * index,
            centroid_px=Point(x=float(cols.mean()), y=float(rows.mean())),
            interior_px=Point(x=float(cols[0]), y=float(rows[0])),
            interior_clearance_px=3.5 - index,
            centroid_3d=Point(x=0.125, y=-0.25, z=1.5 + index),
            centroid_3d_valid=index == 0,
            interior_3d=Point(x=0.25, y=-0.125, z=1.25 + index),
            interior_3d_valid=index == 0,
            box_3d_center=box_3d_center,
            box_3d_size=Vector3(x=0.5, y=0.25, z=0.125),
            box_3d_valid=index == 0,
            depth_error="" if index == 0 else "no depth image received",
            box=RegionOfInterest(x_offset=int(cols.min()), y_offset=int(rows.min()),
                                 width=int(cols.max() - cols.min() + 1),
                                 height=int(rows.max() - rows.min() + 1)),
            area_px=int(rows.size),
        ))
    return SegmentationResult(
        status=SegmentationResult.STATUS_OK, header=header, camera="head", query_id="q-42",
        query="I'm thirsty, what can I drink?", conversation_id="kitchen", history_turns=2, turns_dropped=1,
        notes="1 earlier turn left out (conversation_max_turns 2)",
        answer="Sure, it is the bottle [SEG] and the cup [SEG].", targets=targets,
        tracked=False, success=True, error="", latency_s=0.75,
    )


PUBLISHER_CHILD = textwrap.dedent("""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from lisa_ros.msg import SegmentationResult
    from ros_support import wait_for_subscribers
    from test_interfaces import sample_result

    rclpy.init()
    node = rclpy.create_node("result_publisher")
    publisher = node.create_publisher(
        SegmentationResult, "/lisa/result", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    wait_for_subscribers(publisher)
    publisher.publish(sample_result())
    print("published", flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
""")

# Answers a Segment request by echoing it: the query, its id and conversation, max_new_tokens (as
# history_turns), and the request's image as a target.
SERVICE_CHILD = textwrap.dedent("""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from lisa_ros.msg import SegmentationResult, Target
    from lisa_ros.srv import Segment

    def answer(request, response):
        targets = [Target(mask=request.image, area_px=len(request.image.data))] if request.use_image else []
        response.result = SegmentationResult(
            header=request.image.header, query_id=request.query_id, query=request.query,
            conversation_id=request.conversation_id, history_turns=request.max_new_tokens,
            answer="echo", targets=targets, success=request.use_image,
            status=SegmentationResult.STATUS_OK if request.use_image else SegmentationResult.STATUS_NO_FRAME,
            error="" if request.use_image else "no camera frame yet")
        return response

    rclpy.init()
    node = rclpy.create_node("segment_server")
    node.create_service(Segment, "/lisa/segment", answer)
    print("serving", flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
""")


def test_generated_types_have_the_documented_fields():
    assert Target.get_fields_and_field_types() == {
        "mask": "sensor_msgs/Image", "confidence": "float", "centroid_px": "geometry_msgs/Point",
        "interior_px": "geometry_msgs/Point", "interior_clearance_px": "float",
        "centroid_3d": "geometry_msgs/Point", "centroid_3d_valid": "boolean",
        "interior_3d": "geometry_msgs/Point", "interior_3d_valid": "boolean",
        "box_3d_center": "geometry_msgs/Pose", "box_3d_size": "geometry_msgs/Vector3", "box_3d_valid": "boolean",
        "depth_error": "string", "box": "sensor_msgs/RegionOfInterest", "area_px": "uint32",
    }
    assert SegmentationResult.get_fields_and_field_types() == {
        "status": "uint8", "header": "std_msgs/Header", "camera": "string", "query_id": "string",
        "query": "string", "conversation_id": "string", "history_turns": "uint32", "turns_dropped": "uint32",
        "notes": "string", "answer": "string", "targets": "sequence<lisa_ros/Target>", "tracked": "boolean",
        "success": "boolean", "error": "string", "latency_s": "float",
    }
    request = {"query": "string", "query_id": "string", "conversation_id": "string", "use_image": "boolean",
               "image": "sensor_msgs/Image", "max_new_tokens": "uint32"}
    assert Segment.Request.get_fields_and_field_types() == request
    assert Segment.Response.get_fields_and_field_types() == {"result": "lisa_ros/SegmentationResult"}
    assert Query.Goal.get_fields_and_field_types() == request, "the action's goal is the service's request"
    assert Query.Result.get_fields_and_field_types() == {"result": "lisa_ros/SegmentationResult"}
    assert Query.Feedback.get_fields_and_field_types() == {"stage": "uint8", "text": "string", "tokens": "uint32"}
    assert ResetConversation.Request.get_fields_and_field_types() == {"conversation_id": "string"}
    assert ResetConversation.Response.get_fields_and_field_types() == {"forgotten": "uint32"}


def test_status_codes_of_the_message_are_lisa_ros_status():
    constants = {name[len("STATUS_"):]: getattr(SegmentationResult, name)
                 for name in dir(SegmentationResult) if name.startswith("STATUS_")}
    assert constants == {status.name: status.value for status in Status}
    assert SegmentationResult().status == Status.OK, "a message's default status is OK"


def test_feedback_stages_are_the_worker_and_pipeline_stages():
    from lisa_core.result import STAGES
    from lisa_ros.worker import STAGE_QUEUED

    constants = {name[len("STAGE_"):].lower(): getattr(Query.Feedback, name)
                 for name in dir(Query.Feedback) if name.startswith("STAGE_")}
    assert set(constants) == {STAGE_QUEUED, *STAGES}
    assert sorted(constants.values()) == list(range(len(constants))), "distinct codes"


def test_segmentation_result_arrives_intact_from_another_process(ros_env):
    expected = sample_result()
    received = []
    with ros_env.context() as context:
        node = rclpy.create_node("result_listener", context=context)
        node.create_subscription(SegmentationResult, "/lisa/result", received.append, QOS)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        child = start_python(PUBLISHER_CHILD, ros_env.child_env, ros_env.tmp_path / "publisher.log")
        try:
            arrived = wait_until(lambda: received, 30.0, spin=lambda t: executor.spin_once(timeout_sec=t))
        finally:
            stop_process(child)
        assert arrived, f"no result arrived; publisher output:\n{child.output()}"

    (result,) = received
    assert result == expected  # every field; CDR bytes are not compared: their padding is uninitialised
    assert (result.header.stamp.sec, result.header.stamp.nanosec) == (1764230400, 123456789)
    assert result.header.frame_id == "camera_color_optical_frame"
    assert (result.query_id, result.query) == ("q-42", "I'm thirsty, what can I drink?")
    assert (result.status, result.camera) == (Status.OK, "head")
    assert (result.conversation_id, result.history_turns, result.turns_dropped) == ("kitchen", 2, 1)
    assert result.notes == "1 earlier turn left out (conversation_max_turns 2)"
    assert result.answer.count("[SEG]") == len(result.targets) == 2
    assert (result.tracked, result.success, result.error) == (False, True, "")
    assert result.latency_s == pytest.approx(0.75)
    for got, sent in zip(result.targets, expected.targets):
        mask = imgmsg_to_cv2(got.mask)
        np.testing.assert_array_equal(mask, imgmsg_to_cv2(sent.mask))
        rows, cols = np.nonzero(mask)
        assert got.area_px == rows.size > 0
        assert (got.centroid_px.x, got.centroid_px.y) == pytest.approx((cols.mean(), rows.mean()))
        assert (got.box.x_offset, got.box.y_offset) == (cols.min(), rows.min())
        assert (got.box.width, got.box.height) == (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
        assert got.confidence == pytest.approx(sent.confidence)
        assert (got.centroid_3d.x, got.centroid_3d.y, got.centroid_3d.z) == (
            sent.centroid_3d.x, sent.centroid_3d.y, sent.centroid_3d.z)
        assert got.centroid_3d_valid == sent.centroid_3d_valid
        assert (got.interior_px.x, got.interior_px.y) == (sent.interior_px.x, sent.interior_px.y)
        assert mask[int(got.interior_px.y), int(got.interior_px.x)] == 255
        assert got.interior_clearance_px == sent.interior_clearance_px
        assert (got.interior_3d, got.interior_3d_valid) == (sent.interior_3d, sent.interior_3d_valid)
        assert (got.box_3d_center, got.box_3d_size, got.box_3d_valid) == (
            sent.box_3d_center, sent.box_3d_size, sent.box_3d_valid)
        assert got.box_3d_center.orientation.w == 1.0, "identity orientation"
        assert got.depth_error == sent.depth_error
    assert [t.centroid_3d_valid for t in result.targets] == [True, False]
    assert [t.depth_error for t in result.targets] == ["", "no depth image received"]
    assert not np.array_equal(imgmsg_to_cv2(result.targets[0].mask), imgmsg_to_cv2(result.targets[1].mask))


def test_segment_service_round_trip_between_processes(ros_env):
    image = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    header = Header(frame_id="camera")
    with ros_env.context() as context:
        node = rclpy.create_node("segment_client", context=context)
        client = node.create_client(Segment, "/lisa/segment")
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        child = start_python(SERVICE_CHILD, ros_env.child_env, ros_env.tmp_path / "server.log")
        try:
            assert client.wait_for_service(timeout_sec=30.0), f"no service; server output:\n{child.output()}"
            responses = []
            for request in (
                Segment.Request(query="where is the mug?", query_id="a", use_image=True,
                                image=cv2_to_imgmsg(image, "rgb8", header), conversation_id="table",
                                max_new_tokens=7),
                Segment.Request(query="and the spoon?", query_id="b"),
            ):
                future = client.call_async(request)
                executor.spin_until_future_complete(future, timeout_sec=30.0)
                assert future.done(), f"no response; server output:\n{child.output()}"
                responses.append(future.result().result)
        finally:
            stop_process(child)

    with_image, without_image = responses
    assert (with_image.query_id, with_image.query, with_image.success) == ("a", "where is the mug?", True)
    assert (with_image.status, with_image.conversation_id, with_image.history_turns) == (Status.OK, "table", 7)
    assert with_image.header.frame_id == "camera"
    np.testing.assert_array_equal(imgmsg_to_cv2(with_image.targets[0].mask), image)
    assert (without_image.query_id, without_image.success, without_image.targets) == ("b", False, [])
    assert (without_image.status, without_image.conversation_id) == (Status.NO_FRAME, "")
    assert without_image.error == "no camera frame yet"
