"""sensor_msgs/Image and CompressedImage <-> numpy, shaped like cv_bridge's API so that real cv_bridge
can be swapped in.

cv_bridge for ROS 2 is not installable everywhere this package runs (see docs/environment.md), and the
PyPI copy mishandles row padding and 16-bit images, so the conversion is done here with numpy.
Arrays are (H, W) for one channel and (H, W, C) otherwise, as OpenCV and cv_bridge lay them out.

The readers use only the messages' fields, so they also take the messages a bag reader without ROS
(rosbags) yields; the ROS message types are imported only where messages are built.
"""

from __future__ import annotations

import array
import struct
import sys
from typing import TYPE_CHECKING, Any, Optional

import cv2
import numpy as np

from lisa_core.errors import InputError

if TYPE_CHECKING:
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

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
# Compressions of image_transport's compressed transport: name in `format` -> the file's magic bytes.
_COMPRESSIONS = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
_FILE_SUFFIXES = {"jpeg": ".jpg", "png": ".png"}
# A whole file ends with its end marker (jpeg EOI, png IEND chunk); a writer may pad a few bytes after it.
_END_MARKERS = {"jpeg": b"\xff\xd9", "png": b"IEND\xaeB`\x82"}
_END_SEARCH_BYTES = 64
_JPEG_HEADER_SEARCH_BYTES = 1 << 20  # the frame header comes before the scan data (EXIF, tables: far less)
# Layouts cv2.imdecode returns for 8-bit files, by channel count.
_DECODED_ENCODINGS = {1: "mono8", 3: "bgr8", 4: "bgra8"}


class ImageConversionError(InputError):
    """A sensor_msgs/Image or an array that cannot be converted; the message says what is wrong."""


def imgmsg_to_cv2(msg: Image, desired_encoding: str = "passthrough") -> np.ndarray:
    """The image in `msg` as a new numpy array (sharing no memory with the message).

    `desired_encoding` is "passthrough" (keep the message's encoding), the message's own encoding, or
    a conversion among rgb8, bgr8, rgba8, bgra8 and mono8 (colour to mono8 uses BT.601 luma, a missing
    alpha becomes 255), or between mono16 and 16UC1.
    """
    dtype, channels = _layout(msg.encoding)
    data = check_imgmsg(msg)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = width * dtype.itemsize * channels
    rows = data.reshape(height, step)[:, :row_bytes]
    stored = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    pixels = rows.view(stored).astype(dtype.newbyteorder("="), copy=True)
    image = pixels.reshape((height, width) if channels == 1 else (height, width, channels))
    if desired_encoding in ("passthrough", msg.encoding):
        return image
    return _convert(image, msg.encoding, desired_encoding)


def check_imgmsg(msg: Image) -> np.ndarray:
    """The message's data as a flat uint8 array, read in place, after the checks imgmsg_to_cv2 makes
    (encoding, sizes, step, data length): ImageConversionError names what is wrong. Converts nothing."""
    dtype, channels = _layout(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ImageConversionError(f"image is empty: width {width}, height {height}")
    row_bytes = width * dtype.itemsize * channels
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is shorter than one row of {width} {msg.encoding} pixels ({row_bytes} bytes)")
    data = byte_array(msg.data)
    if data.size != height * step:
        raise ImageConversionError(
            f"image data has {data.size} bytes, but height {height} x step {step} needs {height * step}")
    return data


def cv2_to_imgmsg(image: np.ndarray, encoding: str, header: Optional[Header] = None) -> Image:
    """A sensor_msgs/Image holding `image`, whose dtype and channels must match `encoding`.

    Rows are unpadded (step = width x bytes per pixel); multi-byte values keep the array's byte order,
    which is_bigendian records.
    """
    from sensor_msgs.msg import Image

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


def compressed_imgmsg_to_cv2(msg: CompressedImage, desired_encoding: str = "rgb8") -> np.ndarray:
    """The jpeg or png image in `msg` (as image_transport's compressed transport publishes it) as an
    array in `desired_encoding`: rgb8 (default), bgr8, rgba8, bgra8 or mono8.

    `format` names the compression ("jpeg", "png", "rgb8; jpeg compressed bgr8", ...); the data must be
    a whole file of that kind. 16-bit files (compressedDepth) are refused.
    """
    compression, data, _ = _checked_file(msg)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageConversionError(f"compressed image data ({data.size} bytes) is a corrupt or truncated "
                                   f"{compression} file")
    if image.dtype != np.uint8:
        raise ImageConversionError(f"compressed image is a {image.dtype.name} {compression}; only 8-bit "
                                   "images are supported (not compressedDepth)")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in _DECODED_ENCODINGS:
        raise ImageConversionError(f"compressed image has {channels} channels; expected 1, 3 or 4")
    encoding = _DECODED_ENCODINGS[channels]
    if desired_encoding == encoding:
        return image
    return _convert(image, encoding, desired_encoding)


def check_compressed_imgmsg(msg: CompressedImage) -> tuple[int, int]:
    """(height, width) of the jpeg or png in `msg`, read from its header after the checks that need no
    decoding (format, data, the file's magic bytes and end marker, a png's bit depth): a truncated file
    or a 16-bit png is refused here; damage inside the file shows only when it is decoded."""
    return _checked_file(msg)[2]


def _checked_file(msg: CompressedImage) -> tuple[str, np.ndarray, tuple[int, int]]:
    """(compression, the data as a uint8 array, (height, width)) after check_compressed_imgmsg's checks."""
    compression = _compression(str(msg.format))
    data = byte_array(msg.data)
    if data.size == 0:
        raise ImageConversionError(f"compressed image ({msg.format!r}) has no data")
    magic = _COMPRESSIONS[compression]
    if bytes(data[:len(magic)]) != magic:
        raise ImageConversionError(f"compressed image data is not a {compression} file (format {msg.format!r}, "
                                   f"data starts with {bytes(data[:8])!r})")
    size = _png_size(data) if compression == "png" else _jpeg_size(data)
    if size is None or not bytes(data[-_END_SEARCH_BYTES:]).rstrip(b"\x00").endswith(_END_MARKERS[compression]):
        raise ImageConversionError(f"compressed image data ({data.size} bytes) is a corrupt or truncated "
                                   f"{compression} file (no {'header' if size is None else 'end marker'} "
                                   "where the format puts it)")
    return compression, data, size


def _png_size(data: np.ndarray) -> Optional[tuple[int, int]]:
    header = bytes(data[8:26])  # IHDR chunk: length, type, width, height, bit depth, colour type
    if len(header) < 18 or header[4:8] != b"IHDR":
        return None
    if header[16] == 16:
        raise ImageConversionError("compressed image is a 16-bit png; only 8-bit images are supported "
                                   "(not compressedDepth)")
    width, height = struct.unpack(">II", header[8:16])
    return height, width


def _jpeg_size(data: np.ndarray) -> Optional[tuple[int, int]]:
    """From the first start-of-frame segment (SOF0-SOF15 but DHT, JPG and DAC), walking the segments."""
    raw = bytes(data[:_JPEG_HEADER_SEARCH_BYTES])
    position = 2
    while position + 9 <= len(raw):
        if raw[position] != 0xFF:
            return None
        marker = raw[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", raw[position + 5:position + 9])
            return height, width
        if marker == 0xDA:  # start of scan before any frame header
            return None
        position += 2 + struct.unpack(">H", raw[position + 2:position + 4])[0]
    return None


def cv2_to_compressed_imgmsg(image_rgb: np.ndarray, format: str = "jpeg",
                             header: Optional[Header] = None) -> CompressedImage:
    """A sensor_msgs/CompressedImage of an rgb8 (H, W, 3) or mono8 (H, W) uint8 array, laid out as
    image_transport's compressed transport does: format "rgb8; jpeg compressed bgr8" (or png, or
    "mono8; ... mono8"), the file holding BGR. JPEG quality 95, as that transport's default."""
    from sensor_msgs.msg import CompressedImage

    if format not in _COMPRESSIONS:
        raise ImageConversionError(f"unsupported compression {format!r}; expected one of {sorted(_COMPRESSIONS)}")
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ImageConversionError(f"compression needs an rgb8 (H, W, 3) or mono8 (H, W) uint8 array, "
                                   f"got {image.dtype.name} of shape {image.shape}")
    if image.size == 0:
        raise ImageConversionError(f"image is empty: shape {image.shape}")
    encoding, stored = ("mono8", "mono8") if image.ndim == 2 else ("rgb8", "bgr8")
    pixels = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1])
    parameters = [cv2.IMWRITE_JPEG_QUALITY, 95] if format == "jpeg" else []
    ok, encoded = cv2.imencode(_FILE_SUFFIXES[format], pixels, parameters)
    if not ok:
        raise ImageConversionError(f"OpenCV could not encode a {image.shape} image as {format}")
    msg = CompressedImage(format=f"{encoding}; {format} compressed {stored}")
    if header is not None:
        msg.header = header
    msg.data = array.array("B", encoded.tobytes())
    return msg


def byte_array(data: Any) -> np.ndarray:
    """A uint8[] message field as a flat uint8 array: bytes, array.array and uint8 arrays (rclpy and
    rosbags messages) are read in place, lists and tuples of ints copied."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageConversionError(f"message data must hold uint8 values, got a {data.dtype.name} array")
        return data.reshape(-1)
    if isinstance(data, (list, tuple)):
        try:
            return np.array(data, dtype=np.uint8)
        except (OverflowError, ValueError, TypeError) as error:
            raise ImageConversionError(f"message data is not a list of bytes (0..255): {error}") from None
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        raise ImageConversionError(f"message data must be bytes, got {type(data).__name__}") from None


def _compression(format_: str) -> str:
    """The compression named in a CompressedImage format ("jpeg", "rgb8; png compressed bgr8", ...)."""
    words = format_.lower().replace(";", " ").split()
    if "compresseddepth" in words:
        raise ImageConversionError(f"compressedDepth images ({format_!r}) are not supported; "
                                   "expected an 8-bit jpeg or png")
    found = {"jpeg" if word == "jpg" else word for word in words} & set(_COMPRESSIONS)
    if len(found) != 1:
        raise ImageConversionError(f"unsupported compressed image format {format_!r}; expected jpeg or png, "
                                   "as image_transport writes it (e.g. 'rgb8; jpeg compressed bgr8')")
    return found.pop()


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

    if {encoding, desired_encoding} == {"rgb8", "bgr8"}:  # the common camera case, 20x faster than below
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
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
