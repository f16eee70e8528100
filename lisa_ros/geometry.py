"""From a pixel mask and a registered depth image to 3D points, boxes and clouds in the camera frame.

Depth is expected registered to the colour image (same size, same optical frame, e.g. a RealSense
`aligned_depth_to_color` stream), and the intrinsics are those of that image (CameraInfo `k`).
Pure numpy and OpenCV: no ROS needed, so the node and offline tools reading bags share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from lisa_core.errors import InputError

# Depth encodings of sensor_msgs/Image and the factor from their unit to metres (REP 118).
DEPTH_SCALE_TO_METRES = {"16UC1": 0.001, "mono16": 0.001, "32FC1": 1.0}
# Side of the square window around the interior point whose median depth is that point's depth.
INTERIOR_WINDOW_PX = 5
# The masked depths outside these percentiles are outliers (edge bleed, background seen through holes).
BOX_DEPTH_PERCENTILES = (5.0, 95.0)
# Fewer masked points with depth than this give no 3D box.
MIN_BOX_POINTS = 10


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of a (rectified) image: focal lengths and principal point in pixels."""

    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_k(cls, k: Sequence[float]) -> "Intrinsics":
        """Reads the row-major 3x3 matrix K of a CameraInfo; refuses a zero or non-finite focal length."""
        k = np.asarray(k, dtype=np.float64).reshape(-1)
        if k.size != 9:
            raise InputError(f"camera intrinsics K must have 9 values, got {k.size}")
        fx, fy, cx, cy = float(k[0]), float(k[4]), float(k[2]), float(k[5])
        if not all(np.isfinite([fx, fy, cx, cy])) or fx <= 0.0 or fy <= 0.0:
            raise InputError(f"camera intrinsics unusable: fx={fx}, fy={fy}, cx={cx}, cy={cy} "
                             "(focal lengths must be finite and > 0; is the camera calibrated?)")
        return cls(fx, fy, cx, cy)

    def deproject(self, u: float, v: float, depth_m: float) -> tuple[float, float, float]:
        """Pixel (u = column, v = row) at depth `depth_m` -> (x, y, z) in metres, optical frame."""
        return ((u - self.cx) * depth_m / self.fx, (v - self.cy) * depth_m / self.fy, depth_m)


def depth_in_metres(depth: np.ndarray, encoding: str) -> np.ndarray:
    """A depth image as float32 metres; invalid readings (0, NaN, inf, negative) become NaN."""
    if encoding not in DEPTH_SCALE_TO_METRES:
        raise InputError(f"unsupported depth encoding {encoding!r}; expected one of "
                         f"{sorted(DEPTH_SCALE_TO_METRES)} (16UC1/mono16 in millimetres, 32FC1 in metres)")
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise InputError(f"depth image must have one channel, got shape {depth.shape}")
    metres = depth.astype(np.float32) * np.float32(DEPTH_SCALE_TO_METRES[encoding])
    metres[~(np.isfinite(metres) & (metres > 0))] = np.nan
    return metres


def median_depth(depth_m: np.ndarray, mask: np.ndarray) -> Optional[float]:
    """Median of the valid depths under `mask`, in metres; None when no pixel there has valid depth."""
    _check_registered(depth_m, mask)
    values = depth_m[mask]
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    return float(np.median(values))


def target_point(mask: np.ndarray, centroid: tuple[float, float], depth_m: np.ndarray,
                 intrinsics: Intrinsics) -> Optional[tuple[float, float, float]]:
    """The 3D point of a target: its pixel centroid deprojected at the median depth over its mask.

    Returns None when the mask has no valid depth.
    """
    z = median_depth(depth_m, mask)
    if z is None:
        return None
    return intrinsics.deproject(centroid[0], centroid[1], z)


@dataclass(frozen=True)
class DepthView:
    """A depth image registered to the frame, in metres (NaN = invalid), and the frame's intrinsics."""

    depth_m: np.ndarray
    intrinsics: Intrinsics


@dataclass(frozen=True)
class TargetGeometry:
    """Where one target is: its grasp point in pixels and, with depth, its 3D points and box.

    3D values are metres in the optical frame; None when missing, and then `depth_error` says why.
    """

    interior_px: Optional[tuple[float, float]]  # (x = column, y = row)
    interior_clearance_px: float
    centroid_3d: Optional[tuple[float, float, float]]
    interior_3d: Optional[tuple[float, float, float]]
    box_3d_center: Optional[tuple[float, float, float]]
    box_3d_size: Optional[tuple[float, float, float]]
    depth_error: str  # "" when every 3D value is present, else why not (the first reason)


def interior_point(mask: np.ndarray) -> Optional[tuple[float, float, float]]:
    """(x = column, y = row, clearance px): the mask pixel farthest from the mask's border.

    The clearance is the L2 distance to the nearest pixel off the mask, pixels beyond the image's edge
    counting as off the mask (a one-pixel mask has clearance 1). Ties go to the first pixel in row
    order. None for an empty mask.
    """
    mask = _as_mask(mask)
    window = _bounding_window(mask)
    return None if window is None else _interior_in(mask, window)


def target_geometry(mask: np.ndarray, centroid: Optional[tuple[float, float]], depth: Optional[DepthView],
                    no_depth_reason: str = "no depth") -> TargetGeometry:
    """The grasp point, 3D centroid, 3D grasp point and 3D box of the target in `mask`.

    centroid_3d: `centroid` deprojected at the median valid depth over the mask (as target_point).
    interior_3d: the interior point deprojected at the median valid depth of the mask's pixels in an
    INTERIOR_WINDOW_PX square around it, or at the mask's median where that window has none.
    The 3D box: every masked pixel with valid depth deprojected, those whose depth lies outside the
    BOX_DEPTH_PERCENTILES of the mask's depths dropped, then the min/max box of the rest along the
    optical frame's axes, as centre and size. `no_depth_reason` is the depth error when `depth` is None.
    """
    mask = _as_mask(mask)
    window = _bounding_window(mask)
    interior = None if window is None else _interior_in(mask, window)
    interior_px = None if interior is None else interior[:2]
    clearance = 0.0 if interior is None else interior[2]

    def without_3d(reason: str) -> TargetGeometry:
        return TargetGeometry(interior_px, clearance, None, None, None, None, reason)

    if depth is None:
        return without_3d(no_depth_reason)
    _check_registered(depth.depth_m, mask)
    if interior is None:
        return without_3d("the mask is empty")
    crop = depth.depth_m[window]
    valid = mask[window] & ~np.isnan(crop)
    z = crop[valid]
    if z.size == 0:
        return without_3d("no valid depth on the mask")

    low, median, high = (float(value) for value in np.percentile(z, [BOX_DEPTH_PERCENTILES[0], 50.0,
                                                                         BOX_DEPTH_PERCENTILES[1]]))
    intrinsics = depth.intrinsics
    reasons = []
    centroid_3d = None
    if centroid is None:
        reasons.append("no centroid given")
    else:
        centroid_3d = intrinsics.deproject(float(centroid[0]), float(centroid[1]), median)
    interior_z = _window_depth(depth.depth_m, mask, interior_px)
    interior_3d = intrinsics.deproject(interior[0], interior[1], median if interior_z is None else interior_z)

    keep = valid & (crop >= low) & (crop <= high)
    box_center = box_size = None
    kept = int(np.count_nonzero(keep))
    if kept < MIN_BOX_POINTS:
        reasons.append(f"too few points for a 3D box: {kept} masked pixels with depth within the "
                       f"{BOX_DEPTH_PERCENTILES[0]:g}th-{BOX_DEPTH_PERCENTILES[1]:g}th percentile, "
                       f"{MIN_BOX_POINTS} needed")
    else:
        ray_x, ray_y = _pixel_rays(intrinsics, window)
        axes = ((ray_x * crop)[keep], (ray_y * crop)[keep], crop[keep])
        lower = np.array([float(values.min()) for values in axes])
        upper = np.array([float(values.max()) for values in axes])
        box_center = tuple(float(value) for value in (lower + upper) / 2.0)
        box_size = tuple(float(value) for value in upper - lower)
    return TargetGeometry(interior_px, clearance, centroid_3d, interior_3d, box_center, box_size,
                          reasons[0] if reasons else "")


def cloud_points(masks: Sequence[np.ndarray], depth: DepthView, max_points: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(xyz float32 (N, 3), target index uint32 (N,)): every masked pixel with valid depth, deprojected.

    Beyond `max_points` in all, each target keeps a share of its points proportional to its size,
    drawn by jittered stratified sampling (uniform, no point twice, the same for the same `seed`);
    points stay in row order. A pixel in two masks is in the cloud once per mask.
    """
    if max_points < 0:
        raise InputError(f"max_points must be >= 0, got {max_points}")
    crops = []  # (target index, window, depth there, valid pixels there, how many)
    for target, mask in enumerate(masks):
        mask = _as_mask(mask)
        _check_registered(depth.depth_m, mask)
        window = _bounding_window(mask)
        if window is not None:
            crop = depth.depth_m[window]
            valid = mask[window] & ~np.isnan(crop)
            crops.append((target, window, crop, valid, int(np.count_nonzero(valid))))
    total = sum(count for *_, count in crops)
    rng = np.random.default_rng(seed)
    xyz, index = [np.empty((0, 3), np.float32)], [np.empty(0, np.uint32)]
    for target, window, crop, valid, count in crops:
        ray_x, ray_y = _pixel_rays(depth.intrinsics, window)
        planes = (ray_x * crop, ray_y * crop, crop)
        if total <= max_points:
            columns = [plane[valid] for plane in planes]
        else:
            share = count * max_points // total
            strata = ((np.arange(share) + rng.random(share)) * (count / max(share, 1))).astype(np.int64)
            chosen = np.flatnonzero(valid)[np.minimum(strata, count - 1)]
            columns = [plane.ravel()[chosen] for plane in planes]
        xyz.append(np.stack(columns, axis=1))
        index.append(np.full(columns[2].size, target, np.uint32))
    return np.concatenate(xyz), np.concatenate(index)


def pair_depth(depth_images: Sequence[tuple[int, np.ndarray, str]], frame_stamp_ns: int,
               image_size: tuple[int, int], max_offset_s: float, camera_k: Optional[Sequence[float]]
               ) -> tuple[Optional[DepthView], str]:
    """The depth for a frame: among (stamp ns, depth array, encoding) items, the closest in stamp.

    `image_size` is the frame's (height, width) and `camera_k` its CameraInfo K (None when no camera
    info came). Returns (DepthView, "") or (None, why not): nothing received, no camera info, the
    closest more than `max_offset_s` away, a size other than the frame's (not registered), or an
    unusable encoding or intrinsics.
    """
    if not depth_images:
        return None, "no depth image received"
    if camera_k is None:
        return None, "no camera info received"
    stamp_ns, depth, encoding = min(depth_images, key=lambda item: abs(item[0] - frame_stamp_ns))
    offset_s = abs(stamp_ns - frame_stamp_ns) / 1e9
    if offset_s > max_offset_s:
        return None, f"the closest depth image is {offset_s:.3f} s from the frame (depth_max_offset)"
    depth = np.asarray(depth)
    if depth.ndim >= 2 and depth.shape[:2] != tuple(image_size):
        return None, (f"depth is {depth.shape[1]}x{depth.shape[0]}, the frame {image_size[1]}x{image_size[0]}: "
                      "depth must be registered to the frame")
    try:
        return DepthView(depth_in_metres(depth, encoding), Intrinsics.from_k(camera_k)), ""
    except InputError as error:
        return None, str(error)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InputError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask


def _check_registered(depth_m: np.ndarray, mask: np.ndarray) -> None:
    if depth_m.shape != mask.shape:
        raise InputError(f"depth image is {depth_m.shape[1]}x{depth_m.shape[0]} but the mask is "
                         f"{mask.shape[1]}x{mask.shape[0]}; depth must be registered to the colour image")


def _bounding_window(mask: np.ndarray) -> Optional[tuple[slice, slice]]:
    """(rows, columns) slices of the smallest box holding the mask's pixels; None for an empty mask."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


def _interior_in(mask: np.ndarray, window: tuple[slice, slice]) -> tuple[float, float, float]:
    """interior_point of a mask whose pixels all lie in `window` (its _bounding_window)."""
    padded = cv2.copyMakeBorder(mask[window].astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    _, clearance, _, (column, row) = cv2.minMaxLoc(distance)  # the first maximum in row order
    return float(column + window[1].start), float(row + window[0].start), float(clearance)


def _window_depth(depth_m: np.ndarray, mask: np.ndarray, pixel: tuple[float, float]) -> Optional[float]:
    """Median valid depth of the mask's pixels in the INTERIOR_WINDOW_PX square centred on `pixel`."""
    column, row, half = int(pixel[0]), int(pixel[1]), INTERIOR_WINDOW_PX // 2
    window = (slice(max(row - half, 0), row + half + 1), slice(max(column - half, 0), column + half + 1))
    return median_depth(depth_m[window], mask[window])


def _pixel_rays(intrinsics: Intrinsics, window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """float32 (1, w) and (h, 1): x/z of each column and y/z of each row of `window` (as deproject)."""
    columns = np.arange(window[1].start, window[1].stop, dtype=np.float32)
    rows = np.arange(window[0].start, window[0].stop, dtype=np.float32)
    ray_x = (columns - np.float32(intrinsics.cx)) / np.float32(intrinsics.fx)
    ray_y = (rows - np.float32(intrinsics.cy)) / np.float32(intrinsics.fy)
    return ray_x[None, :], ray_y[:, None]
