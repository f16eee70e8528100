"""Grasp point, 3D box, target cloud, depth pairing and their ROS messages, against scenes worked out by
hand: a box-shaped object at 0.8 m on a 1.5 m background, seen by the test camera (node_support.K)."""

import time

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from lisa_core.errors import InputError
from lisa_ros.geometry import (MIN_BOX_POINTS, DepthView, Intrinsics, TargetGeometry, cloud_points,
                               depth_in_metres, interior_point, pair_depth, target_geometry, target_point)
from lisa_ros.msg import Target
from lisa_ros.ros_outputs import cloud_arrays, cloud_message, fill_target_geometry, marker_array
from node_support import K

HEIGHT, WIDTH = 120, 160
INTRINSICS = Intrinsics.from_k(K)
OBJECT = np.s_[40:70, 50:100]  # rows 40..69, columns 50..99: 1500 pixels
OUTLIERS = [(41, 51, 5000), (55, 70, 5000), (69, 99, 5000), (60, 52, 5000), (45, 90, 5000),
            (50, 60, 100), (65, 80, 100)]  # (row, column, mm): far and near readings inside the object


def object_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[OBJECT] = True
    return mask


def object_depth(outliers: bool = True) -> np.ndarray:
    """16UC1: the object at 800 mm, the background at 1500 mm, holes (0) in the object's middle."""
    depth = np.full((HEIGHT, WIDTH), 1500, np.uint16)
    depth[OBJECT] = 800
    depth[52:54, 60:90] = 0
    for row, column, millimetres in OUTLIERS if outliers else []:
        depth[row, column] = millimetres
    return depth


def view(depth_mm: np.ndarray) -> DepthView:
    return DepthView(depth_in_metres(depth_mm, "16UC1"), INTRINSICS)


def centroid_of(mask: np.ndarray) -> tuple[float, float]:
    rows, columns = np.nonzero(mask)
    return float(columns.mean()), float(rows.mean())


# ---- interior point -------------------------------------------------------------------------------

def l_shape() -> np.ndarray:
    mask = np.zeros((60, 60), bool)
    mask[5:55, 5:15] = True  # the upright
    mask[45:55, 5:55] = True  # the foot
    return mask


def ring() -> np.ndarray:
    rows, columns = np.mgrid[:61, :61]
    radius = np.hypot(rows - 30, columns - 30)
    return (radius >= 18) & (radius <= 27)


def two_parts() -> np.ndarray:
    mask = np.zeros((40, 80), bool)
    mask[10:30, 5:25] = True
    mask[12:28, 55:75] = True
    return mask


def brute_force_clearance(mask: np.ndarray) -> np.ndarray:
    """For each mask pixel, the distance to the nearest pixel off the mask, beyond the edge included."""
    padded = np.pad(mask, 1)
    inside = np.argwhere(padded)
    outside = np.argwhere(~padded)
    distances = np.sqrt(((inside[:, None, :] - outside[None, :, :]) ** 2).sum(axis=2)).min(axis=1)
    clearance = np.zeros(mask.shape)
    clearance[inside[:, 0] - 1, inside[:, 1] - 1] = distances
    return clearance


@pytest.mark.parametrize("shape", [l_shape, ring, two_parts], ids=["L", "ring", "two parts"])
def test_interior_point_lies_well_inside_masks_whose_centroid_does_not(shape):
    mask = shape()
    column, row = (int(round(value)) for value in centroid_of(mask))
    assert not mask[row, column], "the centroid must fall off this mask for the test to mean anything"

    x, y, clearance = interior_point(mask)
    assert x == int(x) and y == int(y) and mask[int(y), int(x)]
    expected = brute_force_clearance(mask)
    assert clearance == pytest.approx(expected.max(), abs=1e-3)
    assert expected[int(y), int(x)] == pytest.approx(expected.max(), abs=1e-3)


def test_interior_point_of_a_ring_is_midway_across_the_ring():
    x, y, clearance = interior_point(ring())
    assert 18 <= np.hypot(x - 30, y - 30) <= 27
    assert clearance >= 4.0


def test_interior_point_counts_the_image_edge_as_border():
    assert interior_point(np.ones((5, 5), bool)) == (2.0, 2.0, 3.0)
    one = np.zeros((5, 7), bool)
    one[4, 6] = True
    assert interior_point(one) == (6.0, 4.0, 1.0)


def test_empty_mask_has_no_interior_point():
    assert interior_point(np.zeros((5, 7), bool)) is None
    with pytest.raises(InputError, match="2-D"):
        interior_point(np.zeros((5, 7, 1), bool))


# ---- target geometry ------------------------------------------------------------------------------

def corners_box(rows: tuple[int, int], columns: tuple[int, int], z: float):
    """Centre and size of the box between the deprojected corner pixels of a flat rectangle at z."""
    lower = INTRINSICS.deproject(columns[0], rows[0], z)
    upper = INTRINSICS.deproject(columns[1], rows[1], z)
    return (tuple((a + b) / 2 for a, b in zip(lower, upper)), tuple(b - a for a, b in zip(lower, upper)))


def test_box_of_a_flat_object_equals_its_deprojected_corners_with_outliers_rejected():
    mask = object_mask()
    geometry = target_geometry(mask, centroid_of(mask), view(object_depth()))
    centre, size = corners_box((40, 69), (50, 99), 0.8)
    assert geometry.box_3d_center == pytest.approx(centre, abs=1e-3)
    assert geometry.box_3d_size == pytest.approx(size, abs=1e-3)
    assert geometry.box_3d_size[2] == pytest.approx(0.0, abs=1e-6)  # the 5 m and 0.1 m readings are out
    assert geometry.depth_error == ""


def test_centroid_and_interior_points_at_the_objects_depth():
    mask = object_mask()
    depth = view(object_depth())
    geometry = target_geometry(mask, centroid_of(mask), depth)
    assert geometry.centroid_3d == pytest.approx(target_point(mask, centroid_of(mask), depth.depth_m,
                                                              INTRINSICS), abs=1e-6)
    assert geometry.interior_px == interior_point(mask)[:2]
    assert geometry.interior_clearance_px == interior_point(mask)[2]
    assert geometry.interior_3d == pytest.approx(INTRINSICS.deproject(*geometry.interior_px, 0.8), abs=1e-6)


def test_interior_depth_comes_from_the_window_around_it_else_the_mask():
    mask = object_mask()
    x, y = (int(value) for value in interior_point(mask)[:2])
    depth_mm = object_depth(outliers=False)
    depth_mm[y - 2:y + 3, x - 2:x + 3] = 700  # a bump right where the grasp point is
    geometry = target_geometry(mask, centroid_of(mask), view(depth_mm))
    assert geometry.interior_3d[2] == pytest.approx(0.7)
    assert geometry.centroid_3d[2] == pytest.approx(0.8)

    depth_mm[y - 2:y + 3, x - 2:x + 3] = 0  # no depth there: the mask's median instead
    assert target_geometry(mask, centroid_of(mask), view(depth_mm)).interior_3d[2] == pytest.approx(0.8)


def test_without_depth_the_grasp_point_stays_and_the_reason_is_given():
    mask = object_mask()
    geometry = target_geometry(mask, centroid_of(mask), None, "no camera info received")
    assert geometry == TargetGeometry(interior_point(mask)[:2], interior_point(mask)[2], None, None, None,
                                      None, "no camera info received")
    assert target_geometry(mask, centroid_of(mask), None).depth_error == "no depth"


def test_empty_mask_and_mask_without_depth_have_reasons():
    empty = target_geometry(np.zeros((HEIGHT, WIDTH), bool), None, view(object_depth()))
    assert (empty.interior_px, empty.interior_clearance_px, empty.box_3d_center) == (None, 0.0, None)
    assert "empty" in empty.depth_error

    holes = object_depth()
    holes[OBJECT] = 0
    geometry = target_geometry(object_mask(), centroid_of(object_mask()), view(holes))
    assert (geometry.centroid_3d, geometry.interior_3d, geometry.box_3d_center) == (None, None, None)
    assert geometry.interior_px is not None
    assert geometry.depth_error == "no valid depth on the mask"


def test_too_few_points_give_points_but_no_box():
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[60, 70:70 + MIN_BOX_POINTS - 1] = True
    geometry = target_geometry(mask, centroid_of(mask), view(object_depth(outliers=False)))
    assert geometry.centroid_3d is not None and geometry.interior_3d is not None
    assert geometry.box_3d_center is None and geometry.box_3d_size is None
    assert "too few points" in geometry.depth_error and f"{MIN_BOX_POINTS - 1} masked pixels" in geometry.depth_error

    mask[61, 70] = True
    assert target_geometry(mask, centroid_of(mask), view(object_depth(outliers=False))).box_3d_size is not None


def test_depth_not_registered_to_the_mask_is_refused():
    with pytest.raises(InputError, match="registered"):
        target_geometry(object_mask(), (70.0, 50.0), view(object_depth()[:, :-1]))
    with pytest.raises(InputError, match="registered"):
        cloud_points([object_mask()], view(object_depth()[:-1]), 100)


# ---- cloud ----------------------------------------------------------------------------------------

def two_targets():
    """Masks of the object and of a second one at 1.2 m; their depth, without outliers."""
    depth_mm = object_depth(outliers=False)
    second = np.zeros((HEIGHT, WIDTH), bool)
    second[80:100, 110:140] = True
    depth_mm[second] = 1200
    return [object_mask(), second], depth_mm


def test_cloud_holds_every_masked_pixel_with_depth_deprojected():
    masks, depth_mm = two_targets()
    xyz, index = cloud_points(masks, view(depth_mm), max_points=10_000)
    assert xyz.dtype == np.float32 and xyz.shape[1] == 3 and index.dtype == np.uint32
    for target, (mask, z) in enumerate(zip(masks, (0.8, 1.2))):
        pixels = [(row, column) for row, column in zip(*np.nonzero(mask)) if depth_mm[row, column] > 0]
        expected = np.array([INTRINSICS.deproject(column, row, z) for row, column in pixels])
        np.testing.assert_allclose(xyz[index == target], expected, atol=1e-6)
    assert np.count_nonzero(index == 0) == 1500 - 60  # the object less its 60 holes


def test_cloud_is_downsampled_proportionally_and_deterministically():
    masks, depth_mm = two_targets()
    full, full_index = cloud_points(masks, view(depth_mm), max_points=10_000)
    xyz, index = cloud_points(masks, view(depth_mm), max_points=100)
    assert len(xyz) <= 100
    counts = np.bincount(index, minlength=2)
    assert counts.tolist() == [1440 * 100 // 2040, 600 * 100 // 2040]
    np.testing.assert_allclose(xyz[index == 0][:, 2], 0.8, atol=1e-6)
    np.testing.assert_allclose(xyz[index == 1][:, 2], 1.2, atol=1e-6)
    assert len(np.unique(xyz, axis=0)) == len(xyz)  # no point twice
    rows_of_full = {tuple(point) for point in full.tolist()}
    assert all(tuple(point) in rows_of_full for point in xyz.tolist())

    again, _ = cloud_points(masks, view(depth_mm), max_points=100)
    other, _ = cloud_points(masks, view(depth_mm), max_points=100, seed=1)
    np.testing.assert_array_equal(again, xyz)
    assert not np.array_equal(other, xyz)
    # Spread over the whole object, not one corner: both halves of its rows are sampled.
    rows = xyz[index == 0][:, 1] * INTRINSICS.fy / xyz[index == 0][:, 2] + INTRINSICS.cy
    assert rows.min() < 48 and rows.max() > 62


def test_cloud_of_nothing_is_empty():
    xyz, index = cloud_points([np.zeros((HEIGHT, WIDTH), bool)], view(object_depth()), 100)
    assert xyz.shape == (0, 3) and index.shape == (0,)
    assert cloud_points([object_mask()], view(object_depth()), 0)[0].shape == (0, 3)
    with pytest.raises(InputError, match="max_points"):
        cloud_points([object_mask()], view(object_depth()), -1)


def test_geometry_and_cloud_of_a_720p_mask_are_fast():
    height, width = 720, 1280
    k = (900.0, 0.0, 640.0, 0.0, 900.0, 360.0, 0.0, 0.0, 1.0)
    rows, columns = np.mgrid[:height, :width]
    mask = np.hypot((rows - 360) / 300, (columns - 640) / 500) <= 1.0  # 470k pixels
    depth = DepthView(depth_in_metres(np.where(mask, 900, 2000).astype(np.uint16), "16UC1"),
                      Intrinsics.from_k(k))
    start = time.perf_counter()
    geometry = target_geometry(mask, centroid_of(mask), depth)
    xyz, _ = cloud_points([mask], depth, 5000)
    elapsed = time.perf_counter() - start
    assert geometry.depth_error == "" and len(xyz) == 5000
    assert elapsed < 0.5, f"720p target geometry and cloud took {elapsed:.3f} s"


# ---- depth pairing --------------------------------------------------------------------------------

FRAME_NS = 1_000_000_000_000


def depth_items(*offsets_ms: int, shape=(HEIGHT, WIDTH), encoding="16UC1"):
    return [(FRAME_NS + offset * 1_000_000, np.full(shape, 1000 + offset, np.uint16), encoding)
            for offset in offsets_ms]


def test_pair_depth_picks_the_closest_stamp():
    depth, reason = pair_depth(depth_items(-30, 5, 40), FRAME_NS, (HEIGHT, WIDTH), 0.05, K)
    assert reason == ""
    assert depth.intrinsics == INTRINSICS
    np.testing.assert_allclose(depth.depth_m, 1.005)


@pytest.mark.parametrize("items, k, words", [
    ([], K, ["no depth image received"]),
    (depth_items(0), None, ["no camera info received"]),
    (depth_items(-500, 80), K, ["0.080 s", "depth_max_offset"]),
    (depth_items(0, shape=(HEIGHT, WIDTH + 2)), K, ["162x120", "160x120", "registered"]),
    (depth_items(0, encoding="8UC1"), K, ["depth encoding", "'8UC1'"]),
    (depth_items(0), [0.0] * 9, ["intrinsics"]),
], ids=["no depth", "no camera info", "too far in time", "another size", "bad encoding", "bad intrinsics"])
def test_pair_depth_refuses_with_the_reason(items, k, words):
    depth, reason = pair_depth(items, FRAME_NS, (HEIGHT, WIDTH), 0.05, k)
    assert depth is None
    for word in words:
        assert word in reason


# ---- ROS messages ---------------------------------------------------------------------------------

def header(frame_id: str = "camera_optical", sec: int = 7) -> Header:
    result = Header(frame_id=frame_id)
    result.stamp.sec = sec
    return result


def test_target_message_carries_the_geometry():
    mask = object_mask()
    geometry = target_geometry(mask, centroid_of(mask), view(object_depth()))
    message = Target()
    fill_target_geometry(message, geometry)
    assert (message.interior_px.x, message.interior_px.y) == geometry.interior_px
    assert message.interior_clearance_px == pytest.approx(geometry.interior_clearance_px)
    point = message.centroid_3d
    assert message.centroid_3d_valid and (point.x, point.y, point.z) == pytest.approx(geometry.centroid_3d)
    point = message.interior_3d
    assert message.interior_3d_valid and (point.x, point.y, point.z) == pytest.approx(geometry.interior_3d)
    centre, size = message.box_3d_center, message.box_3d_size
    assert message.box_3d_valid
    assert (centre.position.x, centre.position.y, centre.position.z) == pytest.approx(geometry.box_3d_center)
    assert (centre.orientation.x, centre.orientation.y, centre.orientation.z, centre.orientation.w) == (0, 0, 0, 1)
    assert (size.x, size.y, size.z) == pytest.approx(geometry.box_3d_size)
    assert message.depth_error == ""

    fill_target_geometry(message, target_geometry(mask, centroid_of(mask), None, "no depth image received"))
    assert not (message.centroid_3d_valid or message.interior_3d_valid or message.box_3d_valid)
    assert (message.centroid_3d.z, message.box_3d_size.x) == (0.0, 0.0)
    assert message.depth_error == "no depth image received"
    assert deserialize_message(serialize_message(message), Target) == message


def test_cloud_message_round_trip():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-2, 2, (1000, 3)).astype(np.float32)
    index = rng.integers(0, 4, 1000).astype(np.uint32)
    message = cloud_message(xyz, index, header())
    assert (message.height, message.width, message.point_step, message.row_step) == (1, 1000, 16, 16000)
    assert message.is_dense and not message.is_bigendian
    assert [(f.name, f.offset, f.datatype, f.count) for f in message.fields] == [
        ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1), ("z", 8, PointField.FLOAT32, 1),
        ("target", 12, PointField.UINT32, 1)]
    assert message.header.frame_id == "camera_optical"
    for read in (message, deserialize_message(serialize_message(message), PointCloud2),
                 get_typestore(Stores.ROS2_JAZZY).deserialize_cdr(serialize_message(message),
                                                                   "sensor_msgs/msg/PointCloud2")):
        back_xyz, back_index = cloud_arrays(read)
        np.testing.assert_array_equal(back_xyz, xyz)
        np.testing.assert_array_equal(back_index, index)
    empty = cloud_arrays(cloud_message(np.empty((0, 3), np.float32), np.empty(0, np.uint32), header()))
    assert empty[0].shape == (0, 3) and empty[1].shape == (0,)


def test_cloud_arrays_reads_other_layouts():
    # Big-endian, fields in another order with a padded point_step of 20 and padded rows: 2 x 3 points.
    xyz = np.arange(18, dtype=np.float32).reshape(6, 3)
    index = np.arange(6, dtype=np.uint32) * 7
    records = np.zeros(6, np.dtype({"names": ["target", "z", "x", "y"], "formats": [">u4", ">f4", ">f4", ">f4"],
                                    "offsets": [0, 4, 8, 12], "itemsize": 20}))
    records["target"], records["x"], records["y"], records["z"] = index, xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rows = np.zeros((2, 64), np.uint8)
    rows[:, :60] = records.view(np.uint8).reshape(2, 60)
    message = PointCloud2(height=2, width=3, point_step=20, row_step=64, is_bigendian=True, data=rows.tobytes(),
                          fields=[PointField(name=name, offset=offset, datatype=datatype, count=1)
                                  for name, offset, datatype in [("target", 0, PointField.UINT32),
                                                                 ("z", 4, PointField.FLOAT32),
                                                                 ("x", 8, PointField.FLOAT32),
                                                                 ("y", 12, PointField.FLOAT32)]])
    back_xyz, back_index = cloud_arrays(message)
    np.testing.assert_array_equal(back_xyz, xyz)
    np.testing.assert_array_equal(back_index, index)

    message.fields = message.fields[1:]
    with pytest.raises(InputError, match="no 'target' field"):
        cloud_arrays(message)


@pytest.mark.parametrize("xyz, index, words", [
    (np.zeros((3, 2), np.float32), np.zeros(3, np.uint32), ["(N, 3)", "(3, 2)"]),
    (np.zeros((3, 3), np.float32), np.zeros(2, np.uint32), ["(3,)", "(2,)"]),
    (np.array([[0, 0, np.nan]], np.float32), np.zeros(1, np.uint32), ["finite"]),
])
def test_bad_clouds_are_refused(xyz, index, words):
    with pytest.raises(InputError) as error:
        cloud_message(xyz, index, header())
    for word in words:
        assert word in str(error.value)


def displayed(*arrays: MarkerArray) -> dict:
    """What a MarkerArray display shows after these arrays, by (namespace, id): DELETEALL clears it."""
    shown = {}
    for array_ in arrays:
        for marker in array_.markers:
            if marker.action == Marker.DELETEALL:
                shown.clear()
            elif marker.action == Marker.ADD:
                shown[(marker.ns, marker.id)] = marker
    return shown


def scene_geometries():
    masks, depth_mm = two_targets()
    full = target_geometry(masks[0], centroid_of(masks[0]), view(depth_mm))
    few = np.zeros((HEIGHT, WIDTH), bool)
    few[90, 10:14] = True  # 4 pixels: a point but no box
    point_only = target_geometry(few, centroid_of(few), view(depth_mm))
    no_3d = target_geometry(masks[1], centroid_of(masks[1]), None)
    return full, point_only, no_3d


def test_markers_per_target_with_stable_ids_in_the_headers_frame():
    full, point_only, no_3d = scene_geometries()
    markers = marker_array([(0, full), (1, no_3d), (2, point_only)], "the red mug", header()).markers
    assert markers[0].action == Marker.DELETEALL
    assert all(marker.header.frame_id == "camera_optical" and marker.header.stamp.sec == 7 for marker in markers)
    assert [(m.ns, m.id, m.type) for m in markers[1:]] == [
        ("lisa/point", 0, Marker.SPHERE), ("lisa/box", 1, Marker.CUBE), ("lisa/label", 2, Marker.TEXT_VIEW_FACING),
        ("lisa/point", 6, Marker.SPHERE), ("lisa/label", 8, Marker.TEXT_VIEW_FACING)]
    sphere, cube, label = markers[1:4]
    position = sphere.pose.position
    assert (position.x, position.y, position.z) == pytest.approx(full.interior_3d)
    position = cube.pose.position
    assert (position.x, position.y, position.z) == pytest.approx(full.box_3d_center)
    assert (cube.scale.x, cube.scale.y) == pytest.approx(full.box_3d_size[:2])
    assert cube.scale.z > 0 and 0 < cube.color.a < 1
    assert "the red mug" in label.text and "target 0" in label.text
    assert label.pose.position.y < full.box_3d_center[1] - full.box_3d_size[1] / 2  # above the box
    assert "target 2" in markers[5].text
    assert all((m.lifetime.sec, m.lifetime.nanosec) == (0, 0) for m in markers)
    assert {m.ns for m in marker_array([(0, full)], "x", header(), namespace="arm").markers[1:]} == {
        "arm/point", "arm/box", "arm/label"}
    sent = deserialize_message(serialize_message(MarkerArray(markers=markers)), MarkerArray).markers
    assert [(m.ns, m.id, m.type, m.text) for m in sent] == [(m.ns, m.id, m.type, m.text) for m in markers]


def test_a_new_answers_markers_replace_the_previous_ones():
    full, point_only, _ = scene_geometries()
    first = marker_array([(0, full), (1, point_only)], "two mugs", header(sec=7))
    second = marker_array([(0, point_only)], "the small one", header(sec=8))
    shown = displayed(first, second)
    assert sorted(shown) == [("lisa/label", 2), ("lisa/point", 0)]
    assert all(marker.header.stamp.sec == 8 for marker in shown.values())
    assert "the small one" in shown[("lisa/label", 2)].text
    assert displayed(first, marker_array([], "nothing", header())) == {}
