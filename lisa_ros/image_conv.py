"""sensor_msgs/Image <-> numpy, shaped like cv_bridge's API so that real cv_bridge can be swapped in.

cv_bridge for ROS 2 is not installable everywhere this package runs (see docs/environment.md), and the
PyPI copy mishandles row padding and 16-bit images, so the conversion is done here with numpy.
Arrays are (H, W) for one channel and (H, W, C) otherwise, as OpenCV and cv_bridge lay them out.
"""

from __future__ import annotations

import array
import sys
from typing import Optional

import cv2
import numpy as np
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from lisa_core.errors import InputError

# encoding -> (element type, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}

# 8-bit encodings, as indices picking their channels out of an RGBA array.
_CHANNELS_FROM_RGBA = {"rgb8": [0, 1, 2], "bgr8": [2, 1, 0], "rgba8": [0, 1, 2, 3], "bgra8": [2, 1, 0, 3]}
# Encodings that store the same values under two names.
_SAME_DATA = {frozenset(("mono16", "16UC1"))}


class ImageConversionError(InputError):
    """A sensor_msgs/Image or an array that cannot be converted; the message says what is wrong."""


def imgmsg_to_cv2(msg: Image, desired_encoding: str = "passthrough") -> np.ndarray:
    """The image in `msg` as a new numpy array (sharing no memory with the message).

    `desired_encoding` is "passthrough" (keep the message's encoding), the message's own encoding, or
    a conversion among rgb8, bgr8, rgba8, bgra8 and mono8 (colour to mono8 uses BT.601 luma, a missing
    alpha becomes 255), or between mono16 and 16UC1.
    """
    dtype, channels = _layout(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ImageConversionError(f"image is empty: width {width}, height {height}")
    row_bytes = width * dtype.itemsize * channels
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is shorter than one row of {width} {msg.encoding} pixels ({row_bytes} bytes)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != height * step:
        raise ImageConversionError(
            f"image data has {data.size} bytes, but height {height} x step {step} needs {height * step}")

    rows = data.reshape(height, step)[:, :row_bytes]
    stored = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    pixels = rows.view(stored).astype(dtype.newbyteorder("="), copy=True)
    image = pixels.reshape((height, width) if channels == 1 else (height, width, channels))
    if desired_encoding in ("passthrough", msg.encoding):
        return image
    return _convert(image, msg.encoding, desired_encoding)


def cv2_to_imgmsg(image: np.ndarray, encoding: str, header: Optional[Header] = None) -> Image:
    """A sensor_msgs/Image holding `image`, whose dtype and channels must match `encoding`.

    Rows are unpadded (step = width x bytes per pixel); multi-byte values keep the array's byte order,
    which is_bigendian records.
    """
    dtype, channels = _layout(encoding)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1 and channels == 1:
        image = image[:, :, 0]
    expected_shape = "(H, W)" if channels == 1 else f"(H, W, {channels})"
    if image.ndim != (2 if channels == 1 else 3) or (channels > 1 and image.shape[2] != channels):
        raise ImageConversionError(
            f"{encoding} needs an array of shape {expected_shape}, got shape {image.shape}")
    if image.dtype.newbyteorder("=") != dtype:
        raise ImageConversionError(f"{encoding} needs {dtype.name} values, got {image.dtype.name}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ImageConversionError(f"image is empty: shape {image.shape}")

    msg = Image()
    if header is not None:
        msg.header = header
    msg.height = height
    msg.width = width
    msg.encoding = encoding
    msg.is_bigendian = _is_big_endian(image.dtype)
    msg.step = width * dtype.itemsize * channels
    # array.array from bytes is the fast way to fill a uint8[] field (from the ndarray: ~40x slower).
    msg.data = array.array("B", np.ascontiguousarray(image).tobytes())
    return msg


def _layout(encoding: str) -> tuple[np.dtype, int]:
    if encoding not in ENCODINGS:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    return ENCODINGS[encoding]


def _is_big_endian(dtype: np.dtype) -> bool:
    if dtype.itemsize == 1:
        return False
    return dtype.byteorder == ">" or (dtype.byteorder in ("=", "|") and sys.byteorder == "big")


def _convert(image: np.ndarray, encoding: str, desired_encoding: str) -> np.ndarray:
    if frozenset((encoding, desired_encoding)) in _SAME_DATA:
        return image
    eight_bit = ("mono8", *_CHANNELS_FROM_RGBA)
    if encoding not in eight_bit or desired_encoding not in eight_bit:
        _layout(desired_encoding)
        raise ImageConversionError(f"cannot convert a {encoding} image to {desired_encoding}")

    if encoding == "mono8":
        rgba = np.repeat(image[:, :, None], 4, axis=2)
        rgba[:, :, 3] = 255
    elif ENCODINGS[encoding][1] == 4:
        rgba = image[:, :, _CHANNELS_FROM_RGBA[encoding]]
    else:
        rgba = np.empty(image.shape[:2] + (4,), dtype=np.uint8)
        rgba[:, :, :3] = image[:, :, _CHANNELS_FROM_RGBA[encoding]]
        rgba[:, :, 3] = 255

    if desired_encoding == "mono8":
        return cv2.cvtColor(np.ascontiguousarray(rgba[:, :, :3]), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(rgba[:, :, _CHANNELS_FROM_RGBA[desired_encoding]])
