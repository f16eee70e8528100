"""The node's 3D outputs as ROS messages: a Target's geometry fields, the targets' point cloud, and
RViz markers for each target's grasp point, box and label.

The geometry itself is computed by lisa_ros.geometry, without ROS; this module only lays it out.
"""

from __future__ import annotations

import array
from typing import Optional, Sequence

import numpy as np
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from lisa_core.errors import InputError
from lisa_core.overlay import TARGET_COLOURS
from lisa_ros.geometry import TargetGeometry
from lisa_ros.image_conv import byte_array
from lisa_ros.msg import Target
from lisa_ros.outputs import CLOUD_POINT

_FIELD_TYPES = {PointField.FLOAT32: "f4", PointField.UINT32: "u4"}
_POINT_FIELDS = {"f4": PointField.FLOAT32, "u4": PointField.UINT32}
# The cloud's PointFields, from lisa_ros.outputs.CLOUD_POINT: (name, offset, datatype).
CLOUD_FIELDS = tuple((name, offset, _POINT_FIELDS[dtype.str[1:]])
                     for name, (dtype, offset) in CLOUD_POINT.fields.items())
CLOUD_POINT_STEP = CLOUD_POINT.itemsize
_CLOUD_DTYPE = CLOUD_POINT

POINT_DIAMETER_M = 0.02
LABEL_HEIGHT_M = 0.04
BOX_ALPHA = 0.35
MIN_BOX_SCALE_M = 0.002  # RViz draws nothing for a zero-thickness cube (a flat object's box)


def fill_target_geometry(message: Target, geometry: TargetGeometry) -> None:
    """Sets the grasp point, 3D centroid, 3D grasp point, 3D box and depth_error fields of `message`;
    a missing value is zeroed with its valid flag false."""
    interior = geometry.interior_px or (0.0, 0.0)
    message.interior_px = Point(x=float(interior[0]), y=float(interior[1]))
    message.interior_clearance_px = float(geometry.interior_clearance_px)
    message.centroid_3d, message.centroid_3d_valid = _point(geometry.centroid_3d), geometry.centroid_3d is not None
    message.interior_3d, message.interior_3d_valid = _point(geometry.interior_3d), geometry.interior_3d is not None
    message.box_3d_center = Pose(position=_point(geometry.box_3d_center), orientation=Quaternion(w=1.0))
    size = geometry.box_3d_size or (0.0, 0.0, 0.0)
    message.box_3d_size = Vector3(x=float(size[0]), y=float(size[1]), z=float(size[2]))
    message.box_3d_valid = geometry.box_3d_center is not None and geometry.box_3d_size is not None
    message.depth_error = geometry.depth_error


def cloud_message(xyz: np.ndarray, target_index: np.ndarray, header: Header) -> PointCloud2:
    """An unordered PointCloud2 (height 1, dense, little-endian) of points (N, 3) and their target
    indices (N,), with fields x, y, z (float32) and target (uint32)."""
    xyz, target_index = np.asarray(xyz), np.asarray(target_index)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"cloud points must have shape (N, 3), got {xyz.shape}")
    if target_index.shape != (xyz.shape[0],):
        raise InputError(f"cloud target indices must have shape ({xyz.shape[0]},), got {target_index.shape}")
    if not np.isfinite(xyz).all():
        raise InputError("cloud points must be finite (the cloud is published as dense)")
    records = np.empty(xyz.shape[0], _CLOUD_DTYPE)
    records["x"], records["y"], records["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    records["target"] = target_index
    return PointCloud2(
        header=header, height=1, width=xyz.shape[0], is_bigendian=False, point_step=CLOUD_POINT_STEP,
        row_step=CLOUD_POINT_STEP * xyz.shape[0], is_dense=True,
        fields=[PointField(name=name, offset=offset, datatype=datatype, count=1)
                for name, offset, datatype in CLOUD_FIELDS],
        data=array.array("B", records.tobytes()))


def cloud_arrays(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray]:
    """(xyz float32 (N, 3), target index uint32 (N,)) from a cloud with float32 x, y, z and uint32
    target fields, at any offsets, point_step, row padding and byte order (rosbags messages too)."""
    fields = {field.name: field for field in msg.fields}
    for name, _, datatype in CLOUD_FIELDS:
        if name not in fields:
            raise InputError(f"point cloud has no {name!r} field (fields: {sorted(fields)})")
        if fields[name].datatype != datatype or fields[name].count != 1:
            raise InputError(f"point cloud field {name!r} has datatype {fields[name].datatype} and count "
                             f"{fields[name].count}; expected datatype {datatype} and count 1")
    height, width, point_step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    if row_step < width * point_step:
        raise InputError(f"point cloud row_step {row_step} is shorter than {width} points x point_step {point_step}")
    data = byte_array(msg.data)
    if data.size != height * row_step:
        raise InputError(f"point cloud data has {data.size} bytes, but height {height} x row_step "
                         f"{row_step} needs {height * row_step}")
    order = ">" if msg.is_bigendian else "<"
    dtype = np.dtype({"names": [name for name, _, _ in CLOUD_FIELDS],
                      "formats": [order + _FIELD_TYPES[datatype] for _, _, datatype in CLOUD_FIELDS],
                      "offsets": [int(fields[name].offset) for name, _, _ in CLOUD_FIELDS],
                      "itemsize": point_step})
    rows = np.ascontiguousarray(data.reshape(height, row_step)[:, :width * point_step])
    records = rows.view(dtype).reshape(-1)
    xyz = np.stack([records[name].astype(np.float32) for name in ("x", "y", "z")], axis=1)
    return xyz, records["target"].astype(np.uint32)


def marker_array(targets: Sequence[tuple[int, TargetGeometry]], answer: str, header: Header,
                 namespace: str = "lisa") -> MarkerArray:
    """RViz markers of an answer's targets, given as (index in the answer, geometry).

    First a DELETEALL marker, so the previous answer's markers vanish; then, per target i with 3D
    values, a sphere at its grasp point (interior_3d, else centroid_3d) in "<namespace>/point", its
    semi-transparent 3D box in "<namespace>/box", and a label "target i: <answer>" above them in
    "<namespace>/label", with ids 3i, 3i + 1 and 3i + 2, all in the header's frame, never expiring.
    The colours are the overlay's.
    """
    markers = [Marker(header=header, action=Marker.DELETEALL)]
    for index, geometry in targets:
        point = geometry.interior_3d or geometry.centroid_3d
        box = None
        if geometry.box_3d_center is not None and geometry.box_3d_size is not None:
            box = (geometry.box_3d_center, geometry.box_3d_size)
        if point is None and box is None:
            continue
        r, g, b = (channel / 255.0 for channel in TARGET_COLOURS[index % len(TARGET_COLOURS)])
        colour = ColorRGBA(r=r, g=g, b=b, a=1.0)
        if point is not None:
            markers.append(_marker(header, f"{namespace}/point", 3 * index, Marker.SPHERE, point,
                                   (POINT_DIAMETER_M,) * 3, colour))
        if box is not None:
            centre, size = box
            markers.append(_marker(header, f"{namespace}/box", 3 * index + 1, Marker.CUBE, centre,
                                   tuple(max(float(s), MIN_BOX_SCALE_M) for s in size),
                                   ColorRGBA(r=r, g=g, b=b, a=BOX_ALPHA)))
            # The optical frame's y points down: above the box is towards smaller y.
            anchor = (centre[0], centre[1] - size[1] / 2.0 - LABEL_HEIGHT_M, centre[2])
        else:
            anchor = (point[0], point[1] - POINT_DIAMETER_M - LABEL_HEIGHT_M, point[2])
        label = _marker(header, f"{namespace}/label", 3 * index + 2, Marker.TEXT_VIEW_FACING, anchor,
                        (0.0, 0.0, LABEL_HEIGHT_M), colour)
        label.text = f"target {index}: {answer}"
        markers.append(label)
    return MarkerArray(markers=markers)


def _marker(header: Header, namespace: str, id_: int, type_: int, position: tuple[float, float, float],
            scale: tuple[float, float, float], colour: ColorRGBA) -> Marker:
    return Marker(header=header, ns=namespace, id=id_, type=type_, action=Marker.ADD,
                  pose=Pose(position=_point(position), orientation=Quaternion(w=1.0)),
                  scale=Vector3(x=float(scale[0]), y=float(scale[1]), z=float(scale[2])), color=colour)


def _point(values: Optional[tuple[float, float, float]]) -> Point:
    x, y, z = values or (0.0, 0.0, 0.0)
    return Point(x=float(x), y=float(y), z=float(z))
