"""From a pixel mask and a registered depth image to a 3D point in the camera frame.

Depth is expected registered to the colour image (same size, same optical frame, e.g. a RealSense
`aligned_depth_to_color` stream), and the intrinsics are those of that image (CameraInfo `k`).
Pure numpy: no ROS needed, so it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from lisa_core.errors import InputError

# Depth encodings of sensor_msgs/Image and the factor from their unit to metres (REP 118).
DEPTH_SCALE_TO_METRES = {"16UC1": 0.001, "mono16": 0.001, "32FC1": 1.0}


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
    if depth_m.shape != mask.shape:
        raise InputError(f"depth image is {depth_m.shape[1]}x{depth_m.shape[0]} but the mask is "
                         f"{mask.shape[1]}x{mask.shape[0]}; depth must be registered to the colour image")
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
