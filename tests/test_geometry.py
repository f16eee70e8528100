"""Depth + intrinsics -> 3D target point, checked against deprojections worked out by hand."""

import numpy as np
import pytest

from lisa_core.errors import InputError
from lisa_ros.geometry import Intrinsics, depth_in_metres, median_depth, target_point

K = [500.0, 0.0, 320.0,
     0.0, 400.0, 240.0,
     0.0, 0.0, 1.0]


def test_intrinsics_read_from_row_major_k():
    assert Intrinsics.from_k(K) == Intrinsics(fx=500.0, fy=400.0, cx=320.0, cy=240.0)


@pytest.mark.parametrize("k", [[0.0] * 9, [500.0, 0, 320, 0, 0.0, 240, 0, 0, 1],
                               [float("nan"), 0, 320, 0, 400, 240, 0, 0, 1], [1.0, 2.0]])
def test_unusable_intrinsics_are_refused_with_the_reason(k):
    with pytest.raises(InputError, match="intrinsics"):
        Intrinsics.from_k(k)


def test_deprojection_by_hand():
    # u=420 is 100 px right of cx: x = 100 * 2 m / 500 = 0.4 m; v=140 is 100 px above cy: y = -0.5 m.
    assert Intrinsics.from_k(K).deproject(420.0, 140.0, 2.0) == pytest.approx((0.4, -0.5, 2.0))


def test_16uc1_millimetres_with_zero_as_invalid():
    depth = np.array([[0, 1000], [2500, 65535]], dtype=np.uint16)
    metres = depth_in_metres(depth, "16UC1")
    assert metres.dtype == np.float32
    assert np.isnan(metres[0, 0])
    assert metres[0, 1] == pytest.approx(1.0)
    assert metres[1, 0] == pytest.approx(2.5)


def test_32fc1_metres_with_nan_zero_inf_negative_as_invalid():
    depth = np.array([[np.nan, 0.0, np.inf, -1.0, 1.25]], dtype=np.float32)
    metres = depth_in_metres(depth, "32FC1")
    assert np.isnan(metres[0, :4]).all()
    assert metres[0, 4] == pytest.approx(1.25)


@pytest.mark.parametrize("encoding", ["rgb8", "8UC1", "64FC1", ""])
def test_other_depth_encodings_are_refused(encoding):
    with pytest.raises(InputError, match="depth encoding"):
        depth_in_metres(np.zeros((2, 2), np.uint16), encoding)


def test_median_ignores_invalid_depth_and_pixels_outside_the_mask():
    depth = np.full((4, 4), 9.0, dtype=np.float32)  # outside the mask: must not count
    depth[1, 1], depth[1, 2], depth[2, 1], depth[2, 2] = 1.0, 3.0, np.nan, 2.0
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    assert median_depth(depth, mask) == pytest.approx(2.0)


def test_no_valid_depth_under_the_mask_gives_no_point():
    depth = depth_in_metres(np.zeros((4, 4), np.uint16), "16UC1")
    mask = np.ones((4, 4), bool)
    assert median_depth(depth, mask) is None
    assert target_point(mask, (1.5, 1.5), depth, Intrinsics.from_k(K)) is None


def test_depth_of_another_size_than_the_mask_is_refused():
    with pytest.raises(InputError, match="registered"):
        median_depth(np.ones((4, 5), np.float32), np.ones((4, 4), bool))


def test_target_point_from_a_mask_and_millimetre_depth():
    mask = np.zeros((480, 640), bool)
    mask[100:181, 400:441] = True  # centroid column 420, row 140
    depth = np.zeros((480, 640), np.uint16)
    depth[100:181, 400:441] = 2000
    depth[100:110, 400:441] = 0  # holes in the depth: ignored
    depth[170:181, 400:441] = 2100  # a minority of farther readings: the median stays 2 m
    point = target_point(mask, (420.0, 140.0), depth_in_metres(depth, "16UC1"), Intrinsics.from_k(K))
    assert point == pytest.approx((0.4, -0.5, 2.0))
