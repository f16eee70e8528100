"""`lisa-bag` as a real process on bags written here with rosbags (sqlite3 and mcap, raw and compressed
frames, depth and camera info, a query topic or a queries file); outputs read back, and masks compared
with the perception node's answers to its segment service on the same frames.

The tool runs with every ROS Python package blocked (an import of one fails), so it is shown to need
no ROS install; the test process itself reads the output with rclpy's deserializer.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hardening_support import end_process, start_perception_node
from node_support import FRAME_ID, K, depth_image, scene, write_segmenting_model

from lisa_ros.bag import new_message, typestore
from lisa_ros.parameters import DEFAULT_NAMES
from lisa_ros.status import Status

TOPICS = {name: "/" + DEFAULT_NAMES[f"{name}_topic"] for name in (
    "image", "depth", "camera_info", "query", "result", "mask", "centroid", "target_point", "explanation",
    "target_cloud")}  # the node's defaults in the root namespace, as bags record them
MAX_NEW_TOKENS = 2  # the test model answers '[SEG][SEG]': two targets
START_NS = 1_700_000_000 * 1_000_000_000  # log time of the bag's first message
STAMP_LAG_NS = 20_000_000  # frames are stamped 20 ms before they are logged, as a camera's are
# Imports the tool must not need: blocked in its process, so that importing any of them fails there.
ROS_MODULES = ("rclpy", "rosidl_runtime_py", "rosidl_parser", "sensor_msgs", "std_msgs", "geometry_msgs",
               "builtin_interfaces", "lisa_ros.msg", "lisa_ros.srv", "cv_bridge", "ament_index_python")
RUN_WITHOUT_ROS = ("import sys\n"
                   f"for name in {ROS_MODULES!r}: sys.modules[name] = None\n"
                   "from lisa_ros.bag import main\n"
                   "sys.exit(main())\n")
INSTRUCTION = "Where is the red box?"
# (seconds from the bag's start, instruction): before any frame; on the frame at 0.3 s; on the frame
# logged at the same time as the query (0.5 s); 2.5 s after the last frame (too old for 1 s).
QUERIES = [(0.0, INSTRUCTION), (0.35, INSTRUCTION), (0.5, "What should I pick up?"), (3.0, INSTRUCTION)]
FRAMES = [(0.1, 0), (0.3, 5), (0.5, 9)]  # (seconds from the start, scene index)
EXPECTED_STATUS = [Status.NO_FRAME, Status.OK, Status.OK, Status.FRAME_TOO_OLD]
ANSWERED_ON = [None, 0.3, 0.5, 0.5]  # the frame each query is answered on (or refused with)


def _ns(seconds: float) -> int:
    return START_NS + round(seconds * 1e9)


def _stamp(header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def _header(store, stamp_ns: int):
    header = new_message(store, "std_msgs/msg/Header", frame_id=FRAME_ID)
    header.stamp.sec, header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    return header


def _frame_message(store, image: np.ndarray, header, compression: str):
    if compression == "raw":
        height, width = image.shape[:2]
        return new_message(store, "sensor_msgs/msg/Image", header=header, height=height, width=width,
                           encoding="rgb8", step=3 * width, data=image.reshape(-1))
    ok, encoded = cv2.imencode("." + compression, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return new_message(store, "sensor_msgs/msg/CompressedImage", header=header,
                       format=f"rgb8; {compression} compressed bgr8", data=encoded.reshape(-1))


def write_bag(path: Path, storage: str, compression: str, query_topic: bool = True) -> None:
    """FRAMES on the image topic with depth and camera info beside each (same stamps), a camera info
    at the start, and QUERIES on the query topic when `query_topic`."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = typestore()
    frame_type = "sensor_msgs/msg/Image" if compression == "raw" else "sensor_msgs/msg/CompressedImage"
    depth = depth_image()
    with Writer(path, version=8, storage_plugin=StoragePlugin[storage.upper()]) as writer:
        def add(topic, msgtype):
            return writer.add_connection(topic, msgtype, typestore=store), msgtype
        image_c, depth_c, info_c = (add(TOPICS["image"], frame_type),
                                    add(TOPICS["depth"], "sensor_msgs/msg/Image"),
                                    add(TOPICS["camera_info"], "sensor_msgs/msg/CameraInfo"))

        def camera_info(header):
            return new_message(store, "sensor_msgs/msg/CameraInfo", header=header, height=120, width=160,
                               distortion_model="plumb_bob", d=np.zeros(5), k=np.array(K, dtype=np.float64))
        messages = [(START_NS, info_c, camera_info(_header(store, START_NS)))]
        for seconds, index in FRAMES:
            header = _header(store, _ns(seconds) - STAMP_LAG_NS)
            messages.append((_ns(seconds), image_c, _frame_message(store, scene(index), header, compression)))
            messages.append((_ns(seconds), depth_c, new_message(
                store, "sensor_msgs/msg/Image", header=header, height=120, width=160, encoding="16UC1",
                step=320, data=depth.view(np.uint8).reshape(-1))))
            messages.append((_ns(seconds), info_c, camera_info(header)))
        if query_topic:
            # The 0.5 s query is written before that frame: same log time, and it must still see it.
            query_c = add(TOPICS["query"], "std_msgs/msg/String")
            messages += [(_ns(s), query_c, new_message(store, "std_msgs/msg/String", data=text))
                         for s, text in QUERIES]
        messages.sort(key=lambda item: (item[0], item[1][0].topic != TOPICS["query"]))
        for log_ns, (connection, msgtype), message in messages:
            writer.write(connection, log_ns, store.serialize_cdr(message, msgtype))


def start_tool(output: Path, *args) -> subprocess.Popen:
    """The tool as its own process, stdout and stderr into `output`."""
    with open(output, "wb") as log:
        return subprocess.Popen([sys.executable, "-c", RUN_WITHOUT_ROS, *map(str, args)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def read_bag(path: Path) -> dict:
    """topic -> (message type, type hash, [(log ns, raw bytes)])."""
    from rosbags.rosbag2 import Reader

    topics: dict = {}
    with Reader(path) as reader:
        for connection in reader.connections:
            topics[connection.topic] = (connection.msgtype, connection.digest, [])
        for connection, log_ns, raw in reader.messages():
            topics[connection.topic][2].append((log_ns, raw))
    return topics


def ros_messages(topic: tuple) -> list:
    """The messages of one output topic, deserialized by rclpy (so ROS reads what the tool wrote)."""
    from rclpy.serialization import deserialize_message

    msgtype, _, messages = topic
    package, _, name = msgtype.rpartition("/")
    message_class = getattr(importlib.import_module(package.replace("/", ".")), name)
    return [deserialize_message(bytes(raw), message_class) for _, raw in messages]


def _installed_type_hash(name: str) -> str:
    """The type hash that the colcon build of the package computed for lisa_ros/msg/<name>."""
    from ament_index_python.packages import get_package_share_directory

    description = Path(get_package_share_directory("lisa_ros")) / "msg" / f"{name}.json"
    return json.loads(description.read_text())["type_hashes"][0]["hash_string"]


def _mask(image_msg) -> np.ndarray:
    from lisa_ros.image_conv import imgmsg_to_cv2

    return imgmsg_to_cv2(image_msg) > 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_segmenting_model(tmp_path_factory.mktemp("bag_model") / "segmenting_model")


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """The tool started on two bags at once: sqlite3 with raw rgb8 frames and depth, answered from its
    query topic; mcap with png frames, answered from a queries file, input copied over."""
    folder = tmp_path_factory.mktemp("bags")
    write_bag(folder / "raw_in", "sqlite3", "raw")
    write_bag(folder / "png_in", "mcap", "png", query_topic=False)
    queries = folder / "queries.txt"
    queries.write_text("# seconds from the bag's start, then the instruction\n\n"
                       + "".join(f"{s} {text}\n" for s, text in QUERIES))
    common = ("--model", model, "--depth-topic", "--max-new-tokens", MAX_NEW_TOKENS)
    processes = {
        "raw": start_tool(folder / "raw.log", folder / "raw_in", "--out", folder / "raw_out", *common,
                          "--video", folder / "overlays.mp4", "--jsonl", folder / "queries.jsonl"),
        "png": start_tool(folder / "png.log", folder / "png_in", "--out", folder / "png_out", *common,
                          "--queries", queries, "--copy-input"),
    }
    yield dict(folder=folder, processes=processes, queries=queries, model=model, finished={})
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finished(runs: dict, name: str) -> dict:
    """The run's folder and output bag, once its process has ended well."""
    if name not in runs["finished"]:
        folder, process = runs["folder"], runs["processes"][name]
        assert process.wait(timeout=180) == 0, (folder / f"{name}.log").read_text()
        runs["finished"][name] = dict(folder=folder, out=folder / f"{name}_out",
                                      output=read_bag(folder / f"{name}_out"))
    return runs["finished"][name]


@pytest.fixture(scope="module")
def raw_run(runs):
    return finished(runs, "raw")


def test_masks_equal_the_nodes_answers_on_the_same_frames(runs, model, tmp_path_factory):
    """First in the file: the node starts while the tool runs."""
    from lisa_ros.client import PerceptionClient
    from lisa_ros.image_conv import cv2_to_imgmsg
    from lisa_ros.srv import Segment
    from ros_support import ros_session

    with ros_session(tmp_path_factory.mktemp("bag_node")) as ros:
        process, log = start_perception_node(ros, {"model_path": str(model), "max_new_tokens": MAX_NEW_TOKENS})
        client = PerceptionClient(ros["context"], name="bag_test_user", camera=False)
        try:
            raw = finished(runs, "raw")["output"]
            bag_results = [r for r in ros_messages(raw[TOPICS["result"]]) if r.success]
            assert client.wait_for_node(timeout_s=60)["model_loaded"], log.read_text()
            frames = {_ns(s) - STAMP_LAG_NS: index for s, index in FRAMES}
            for bag_result in bag_results:
                header = bag_result.header
                response = client.segment(Segment.Request(
                    query=bag_result.query, use_image=True,
                    image=cv2_to_imgmsg(scene(frames[_stamp(header)]), "rgb8", header)))
                assert response.success, response.error
                assert response.answer == bag_result.answer
                assert len(response.targets) == len(bag_result.targets) == MAX_NEW_TOKENS
                for node_target, bag_target in zip(response.targets, bag_result.targets):
                    assert (_mask(node_target.mask) == _mask(bag_target.mask)).all()
                    assert node_target.confidence == pytest.approx(bag_target.confidence, abs=1e-6)
        finally:
            client.close()
            end_process(process)


def test_outputs_have_the_node_types_and_one_result_per_query(raw_run):
    output = raw_run["output"]
    assert {topic: kind for topic, (kind, _, _) in output.items()} == {
        TOPICS["result"]: "lisa_ros/msg/SegmentationResult", TOPICS["mask"]: "sensor_msgs/msg/Image",
        TOPICS["centroid"]: "geometry_msgs/msg/PointStamped",
        TOPICS["target_point"]: "geometry_msgs/msg/PointStamped",
        TOPICS["explanation"]: "std_msgs/msg/String", TOPICS["target_cloud"]: "sensor_msgs/msg/PointCloud2"}
    assert output[TOPICS["result"]][1] == _installed_type_hash("SegmentationResult"), "ros2 bag play matches it"
    results = ros_messages(output[TOPICS["result"]])
    assert [log_ns for log_ns, _ in output[TOPICS["result"]][2]] == [_ns(s) for s, _ in QUERIES]
    assert [r.status for r in results] == [int(s) for s in EXPECTED_STATUS], [r.error for r in results]
    assert [r.success for r in results] == [s == Status.OK for s in EXPECTED_STATUS]
    assert [r.query for r in results] == [text for _, text in QUERIES]
    assert results[0].error.startswith("no frame yet") and TOPICS["image"] in results[0].error
    assert results[3].error.startswith("frame too old") and "max_image_age 1.0" in results[3].error
    for result, frame_s, (query_s, _) in zip(results, ANSWERED_ON, QUERIES):
        expected = _ns(query_s) if frame_s is None else _ns(frame_s) - STAMP_LAG_NS
        assert _stamp(result.header) == expected, "the frame's header, or the query's time without one"
        if frame_s is not None:
            assert result.header.frame_id == FRAME_ID
    for result in results[1:3]:
        assert result.answer == "[SEG]" * MAX_NEW_TOKENS and len(result.targets) == MAX_NEW_TOKENS
        assert all(t.area_px == _mask(t.mask).sum() > 0 for t in result.targets)
        assert all(_stamp(t.mask.header) == _stamp(result.header) for t in result.targets)


def test_mask_centroid_and_explanation_follow_each_answer(raw_run):
    output = raw_run["output"]
    results = [r for r in ros_messages(output[TOPICS["result"]]) if r.success]
    masks, centroids = ros_messages(output[TOPICS["mask"]]), ros_messages(output[TOPICS["centroid"]])
    assert [_stamp(m.header) for m in masks] == [_stamp(r.header) for r in results]
    assert [_stamp(c.header) for c in centroids] == [_stamp(r.header) for r in results]
    assert [m.data for m in ros_messages(output[TOPICS["explanation"]])] == [r.answer for r in results]
    assert [log_ns for log_ns, _ in output[TOPICS["mask"]][2]] == [_ns(0.35), _ns(0.5)], "at the queries' times"
    for result, mask, centroid in zip(results, masks, centroids):
        assert (_mask(mask) == np.logical_or.reduce([_mask(t.mask) for t in result.targets])).all()
        main = max(result.targets, key=lambda t: t.confidence)
        rows, columns = np.nonzero(_mask(main.mask))
        assert (centroid.point.x, centroid.point.y) == pytest.approx((columns.mean(), rows.mean()))
        assert (main.centroid_px.x, main.centroid_px.y) == (centroid.point.x, centroid.point.y)
        assert (main.box.x_offset, main.box.width) == (columns.min(), columns.max() - columns.min() + 1)


def test_depth_gives_3d_points_boxes_and_the_target_cloud(raw_run):
    from lisa_ros.ros_outputs import CLOUD_FIELDS, CLOUD_POINT_STEP, cloud_arrays

    output = raw_run["output"]
    results = [r for r in ros_messages(output[TOPICS["result"]]) if r.success]
    points = ros_messages(output[TOPICS["target_point"]])
    clouds = ros_messages(output[TOPICS["target_cloud"]])
    assert len(points) == len(clouds) == len(results) == 2
    fx, cx, fy, cy = K[0], K[2], K[4], K[5]
    for result, point, cloud in zip(results, points, clouds):
        for target in result.targets:
            # Depth is 1500 mm wherever it is valid.
            u, v = target.centroid_px.x, target.centroid_px.y
            expected = ((u - cx) * 1.5 / fx, (v - cy) * 1.5 / fy, 1.5)
            assert target.centroid_3d_valid and target.interior_3d_valid and target.box_3d_valid, \
                target.depth_error
            assert (target.centroid_3d.x, target.centroid_3d.y, target.centroid_3d.z) == \
                pytest.approx(expected, abs=1e-5)
            assert target.interior_3d.z == pytest.approx(1.5) and target.box_3d_size.z == pytest.approx(0.0)
            assert target.box_3d_center.orientation.w == 1.0 and target.depth_error == ""
            assert _mask(target.mask)[int(target.interior_px.y), int(target.interior_px.x)]
        main = max(result.targets, key=lambda t: t.confidence)
        assert (point.point.x, point.point.y, point.point.z) == \
            (main.centroid_3d.x, main.centroid_3d.y, main.centroid_3d.z)
        assert _stamp(point.header) == _stamp(cloud.header) == _stamp(result.header)
        assert point.header.frame_id == cloud.header.frame_id == FRAME_ID
        assert [(f.name, f.offset, f.datatype) for f in cloud.fields] == list(CLOUD_FIELDS), "the node's layout"
        xyz, index = cloud_arrays(cloud)
        assert cloud.width == len(xyz) > 0 and cloud.point_step == CLOUD_POINT_STEP
        assert np.allclose(xyz[:, 2], 1.5) and set(index) == {0, 1}


def test_video_has_one_overlay_per_answered_query_and_jsonl_lines_parse(raw_run):
    capture = cv2.VideoCapture(str(raw_run["folder"] / "overlays.mp4"))
    assert capture.isOpened()
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 2 and frames[0].shape == (120, 160, 3)
    records = [json.loads(line) for line in (raw_run["folder"] / "queries.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == [s.label for s in EXPECTED_STATUS]
    assert [r["time_s"] for r in records] == [s for s, _ in QUERIES]
    answered = records[1]
    assert answered["answer"] == "[SEG]" * MAX_NEW_TOKENS and len(answered["targets"]) == MAX_NEW_TOKENS
    target = answered["targets"][0]
    assert target["centroid_3d"][2] == pytest.approx(1.5) and len(target["box"]) == 4
    assert 0.0 <= target["confidence"] <= 1.0 and target["box_3d_size"] is not None
    assert records[0]["targets"] == [] and records[0]["frame_stamp_ns"] is None


def test_compressed_frames_in_mcap_answered_from_a_queries_file(runs, raw_run, tmp_path):
    from lisa_ros.bag import main

    png = finished(runs, "png")
    # jpeg in this process (the real command ran twice already), written as sqlite3.
    write_bag(tmp_path / "jpg_in", "mcap", "jpg", query_topic=False)
    assert main([str(tmp_path / "jpg_in"), "--out", str(tmp_path / "jpg_out"), "--model", str(runs["model"]),
                 "--depth-topic", "--queries", str(runs["queries"]), "--storage", "sqlite3",
                 "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    raw_results = ros_messages(raw_run["output"][TOPICS["result"]])
    for out, storage in ((png["out"], ".mcap"), (tmp_path / "jpg_out", ".db3")):
        assert any(p.suffix == storage for p in out.iterdir()), "the input's storage, or --storage"
        results = ros_messages(read_bag(out)[TOPICS["result"]])
        assert [r.status for r in results] == [int(s) for s in EXPECTED_STATUS], [r.error for r in results]
        assert [_stamp(r.header) for r in results] == [_stamp(r.header) for r in raw_results]
        assert all(len(r.targets) == MAX_NEW_TOKENS and r.targets[0].centroid_3d_valid
                   for r in results if r.success)
    for topic, count in ((TOPICS["image"], len(FRAMES)), (TOPICS["depth"], len(FRAMES)),
                         (TOPICS["camera_info"], len(FRAMES) + 1)):
        assert len(png["output"][topic][2]) == count, f"--copy-input copies {topic}"
    assert TOPICS["query"] not in png["output"]
    # png is lossless: the same pixels as the raw frames, so the same masks.
    for from_png, raw in zip(ros_messages(png["output"][TOPICS["result"]]), raw_results):
        assert [(_mask(a.mask) == _mask(b.mask)).all() for a, b in zip(from_png.targets, raw.targets)] == \
               [True] * len(raw.targets)


def test_a_truncated_bag_gets_one_clear_error(tmp_path, capsys):
    from lisa_ros.bag import main

    for storage in ("sqlite3", "mcap"):
        bag = tmp_path / f"{storage}_cut"
        write_bag(bag, storage, "raw")
        data_file = next(p for p in bag.iterdir() if p.suffix in (".db3", ".mcap"))
        data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 2])
        assert main([str(bag), "--out", str(tmp_path / f"{storage}_out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"lisa-bag: error: bag {bag} is truncated or corrupt: "), lines
        assert not (tmp_path / f"{storage}_out").exists()


def test_a_missing_topic_lists_the_bags_topics(raw_run, tmp_path, capsys):
    from lisa_ros.bag import main

    bag = raw_run["folder"] / "raw_in"
    assert main([str(bag), "--out", str(tmp_path / "o1"), "--image-topic", "/camera/color"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lisa-bag: error: topic /camera/color (--image-topic) is not in bag")
    assert f"{TOPICS['image']} (sensor_msgs/msg/Image)" in error
    assert f"{TOPICS['query']} (std_msgs/msg/String)" in error

    assert main([str(bag), "--out", str(tmp_path / "o2"), "--query-topic", "/planner/ask"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lisa-bag: error: no queries: topic /planner/ask") and TOPICS["camera_info"] in error

    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3")]) == 2
    assert capsys.readouterr().err.strip() == f"lisa-bag: error: bag {tmp_path / 'nowhere'} not found"

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing to ask\n")
    assert main([str(bag), "--out", str(tmp_path / "o4"), "--queries", str(empty)]) == 2
    assert "no queries" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))


def test_an_unknown_image_encoding_names_the_frame(model, tmp_path, capsys):
    from rosbags.rosbag2 import StoragePlugin, Writer

    from lisa_ros.bag import main

    store = typestore()
    bag = tmp_path / "yuv"
    with Writer(bag, version=8, storage_plugin=StoragePlugin.SQLITE3) as writer:
        image_c = writer.add_connection(TOPICS["image"], "sensor_msgs/msg/Image", typestore=store)
        query_c = writer.add_connection(TOPICS["query"], "std_msgs/msg/String", typestore=store)
        frame = new_message(store, "sensor_msgs/msg/Image", header=_header(store, START_NS), height=120,
                            width=160, encoding="yuv422", step=320, data=np.zeros(120 * 320, np.uint8))
        writer.write(image_c, START_NS, store.serialize_cdr(frame, "sensor_msgs/msg/Image"))
        writer.write(query_c, START_NS + 1, store.serialize_cdr(
            new_message(store, "std_msgs/msg/String", data=INSTRUCTION), "std_msgs/msg/String"))
    assert main([str(bag), "--out", str(tmp_path / "out"), "--model", str(model)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"lisa-bag: error: frame on {TOPICS['image']} at 0.000 s cannot be used: ")
    assert "'yuv422'" in error and not (tmp_path / "out").exists()
