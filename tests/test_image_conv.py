"""sensor_msgs/Image and CompressedImage <-> numpy: every encoding, padded rows, both byte orders, jpeg
and png as image_transport writes them, messages from bags read without ROS, and clear errors."""

import array
import subprocess
import sys

import cv2
import numpy as np
import pytest
from rclpy.serialization import serialize_message
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from lisa_ros.image_conv import (ENCODINGS, ImageConversionError, compressed_imgmsg_to_cv2,
                                 cv2_to_compressed_imgmsg, cv2_to_imgmsg, imgmsg_to_cv2)
from lisa_core.errors import InputError

HEIGHT, WIDTH = 5, 7


def sample_image(encoding: str, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Random values covering each type's range (for 32FC1 also NaN and inf, as depth images hold)."""
    dtype, channels = ENCODINGS[encoding]
    shape = (height, width) if channels == 1 else (height, width, channels)
    rng = np.random.default_rng(sum(map(ord, encoding)))
    if dtype == np.float32:
        image = rng.uniform(-1e3, 1e3, shape).astype(np.float32)
        image[0, :3] = [np.nan, np.inf, 0.1]
        return image
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def raw_message(encoding: str, image: np.ndarray, *, big_endian: bool = False, padding: int = 0) -> Image:
    """A message built byte by byte, independently of cv2_to_imgmsg: rows padded with 0xAB bytes."""
    dtype, _ = ENCODINGS[encoding]
    stored = image.astype(dtype.newbyteorder(">" if big_endian else "<"))
    rows = stored.reshape(image.shape[0], -1).view(np.uint8)
    padded = np.full((rows.shape[0], rows.shape[1] + padding), 0xAB, dtype=np.uint8)
    padded[:, :rows.shape[1]] = rows
    return Image(height=image.shape[0], width=image.shape[1], encoding=encoding,
                 is_bigendian=big_endian, step=padded.shape[1], data=padded.tobytes())


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_round_trip_every_encoding(encoding):
    image = sample_image(encoding)
    header = Header(frame_id="camera")
    header.stamp.sec = 12
    msg = cv2_to_imgmsg(image, encoding, header)
    dtype, channels = ENCODINGS[encoding]
    assert (msg.height, msg.width, msg.encoding) == (HEIGHT, WIDTH, encoding)
    assert msg.step == WIDTH * channels * dtype.itemsize
    assert len(msg.data) == HEIGHT * msg.step
    assert isinstance(msg.data, array.array)
    assert (msg.header.frame_id, msg.header.stamp.sec) == ("camera", 12)

    decoded = imgmsg_to_cv2(msg)
    assert decoded.dtype == dtype and decoded.shape == image.shape
    np.testing.assert_array_equal(decoded, image)
    np.testing.assert_array_equal(imgmsg_to_cv2(msg, encoding), image)
    assert decoded.flags.writeable and decoded.flags.c_contiguous


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("padding", [0, 3, 16])
def test_reads_padded_rows_in_both_byte_orders(encoding, big_endian, padding):
    image = sample_image(encoding)
    decoded = imgmsg_to_cv2(raw_message(encoding, image, big_endian=big_endian, padding=padding))
    assert decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, image)


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "32FC1"])
def test_big_endian_array_is_marked_and_read_back(encoding):
    image = sample_image(encoding)
    big = image.astype(image.dtype.newbyteorder(">"))
    msg = cv2_to_imgmsg(big, encoding)
    assert msg.is_bigendian
    assert bytes(msg.data) == big.tobytes()
    np.testing.assert_array_equal(imgmsg_to_cv2(msg), image)
    little = cv2_to_imgmsg(image.astype(image.dtype.newbyteorder("<")), encoding)
    assert not little.is_bigendian
    assert bytes(little.data) != bytes(msg.data)


def test_converts_colour_encodings_to_rgb8_bgr8_and_mono8():
    rgb = sample_image("rgb8")
    alpha = sample_image("mono8")
    sources = {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.dstack([rgb, alpha]),
        "bgra8": np.dstack([rgb[:, :, ::-1], alpha]),
    }
    # ITU-R BT.601 luma, as OpenCV's RGB2GRAY computes it.
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    for encoding, image in sources.items():
        msg = cv2_to_imgmsg(np.ascontiguousarray(image), encoding)
        np.testing.assert_array_equal(imgmsg_to_cv2(msg, "rgb8"), rgb)
        np.testing.assert_array_equal(imgmsg_to_cv2(msg, "bgr8"), rgb[:, :, ::-1])
        np.testing.assert_allclose(imgmsg_to_cv2(msg, "mono8"), luma, atol=1)
    rgba = imgmsg_to_cv2(cv2_to_imgmsg(np.ascontiguousarray(sources["bgra8"]), "bgra8"), "rgba8")
    np.testing.assert_array_equal(rgba, sources["rgba8"])
    opaque = imgmsg_to_cv2(cv2_to_imgmsg(rgb, "rgb8"), "bgra8")
    np.testing.assert_array_equal(opaque[:, :, 3], 255)


def test_converts_mono8_to_colour_and_mono16_to_16uc1():
    gray = sample_image("mono8")
    rgb = imgmsg_to_cv2(cv2_to_imgmsg(gray, "mono8"), "rgb8")
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], gray)
    depth = sample_image("mono16")
    np.testing.assert_array_equal(imgmsg_to_cv2(cv2_to_imgmsg(depth, "mono16"), "16UC1"), depth)


def test_a_large_frame_converts_quickly():
    import time

    image = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    start = time.perf_counter()
    msg = cv2_to_imgmsg(image, "rgb8")
    decoded = imgmsg_to_cv2(msg, "bgr8")
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(decoded, image[:, :, ::-1])
    assert elapsed < 0.5, f"720p rgb8 round trip took {elapsed:.3f} s"


def good_message() -> Image:
    return raw_message("rgb8", sample_image("rgb8"), padding=2)  # step 23, 115 bytes


@pytest.mark.parametrize("change, words", [
    (lambda m: setattr(m, "data", bytes(m.data)[:-1]), ["114 bytes", "height 5", "step 23", "115"]),
    (lambda m: setattr(m, "data", bytes(m.data) + b"\0" * 23), ["138 bytes", "height 5", "step 23", "115"]),
    (lambda m: setattr(m, "step", 20), ["step 20", "7 rgb8 pixels", "21 bytes"]),
    (lambda m: setattr(m, "width", 0), ["empty", "width 0"]),
    (lambda m: setattr(m, "height", 0), ["empty", "height 0"]),
    (lambda m: setattr(m, "encoding", "yuv422"), ["unsupported", "'yuv422'", "rgb8"]),
    (lambda m: setattr(m, "encoding", ""), ["unsupported", "''"]),
], ids=["short data", "long data", "short step", "zero width", "zero height", "unknown encoding",
        "no encoding"])
def test_inconsistent_messages_are_refused_with_the_numbers(change, words):
    msg = good_message()
    imgmsg_to_cv2(msg)
    change(msg)
    with pytest.raises(ImageConversionError) as error:
        imgmsg_to_cv2(msg)
    for word in words:
        assert word in str(error.value)
    assert isinstance(error.value, InputError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("source, desired, words", [
    ("32FC1", "rgb8", ["cannot convert", "32FC1", "rgb8"]),
    ("16UC1", "mono8", ["cannot convert", "16UC1", "mono8"]),
    ("rgb8", "32FC1", ["cannot convert", "rgb8", "32FC1"]),
    ("rgb8", "hsv8", ["unsupported", "'hsv8'"]),
])
def test_unsupported_conversions_are_refused(source, desired, words):
    msg = cv2_to_imgmsg(sample_image(source), source)
    with pytest.raises(ImageConversionError) as error:
        imgmsg_to_cv2(msg, desired)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("array_, encoding, words", [
    (np.zeros((4, 4), np.uint8), "rgb8", ["rgb8", "(H, W, 3)", "(4, 4)"]),
    (np.zeros((4, 4, 4), np.uint8), "bgr8", ["bgr8", "(H, W, 3)", "(4, 4, 4)"]),
    (np.zeros((4, 4, 3), np.float32), "rgb8", ["rgb8", "uint8", "float32"]),
    (np.zeros((4, 4), np.uint16), "32FC1", ["32FC1", "float32", "uint16"]),
    (np.zeros((0, 4), np.uint8), "mono8", ["empty", "(0, 4)"]),
    (np.zeros((4, 4), np.uint8), "8UC1", ["unsupported", "'8UC1'"]),
])
def test_arrays_that_do_not_match_the_encoding_are_refused(array_, encoding, words):
    with pytest.raises(ImageConversionError) as error:
        cv2_to_imgmsg(array_, encoding)
    for word in words:
        assert word in str(error.value)


def test_single_channel_array_with_a_channel_axis_is_accepted():
    gray = sample_image("mono8")
    np.testing.assert_array_equal(imgmsg_to_cv2(cv2_to_imgmsg(gray[:, :, None], "mono8")), gray)


# ---- compressed frames (image_transport's compressed transport) ------------------------------------

def smooth_image(height: int = 48, width: int = 64) -> np.ndarray:
    """rgb8 gradients: what jpeg keeps well (its loss on noise would say nothing about the decoding)."""
    rows, columns = np.mgrid[:height, :width]
    return np.dstack([columns * 255 // (width - 1), rows * 255 // (height - 1),
                      (rows + columns) * 255 // (height + width - 2)]).astype(np.uint8)


def compressed_message(format_: str, data: bytes) -> CompressedImage:
    return CompressedImage(format=format_, data=data)


def test_png_round_trip_is_exact_and_stores_bgr_as_image_transport_does():
    rgb = sample_image("rgb8")
    header = Header(frame_id="camera")
    msg = cv2_to_compressed_imgmsg(rgb, "png", header)
    assert msg.format == "rgb8; png compressed bgr8"
    assert msg.header.frame_id == "camera" and isinstance(msg.data, array.array)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_UNCHANGED),
                                  rgb[:, :, ::-1])
    np.testing.assert_array_equal(compressed_imgmsg_to_cv2(msg), rgb)
    np.testing.assert_array_equal(compressed_imgmsg_to_cv2(msg, "bgr8"), rgb[:, :, ::-1])

    gray = sample_image("mono8")
    mono = cv2_to_compressed_imgmsg(gray, "png")
    assert mono.format == "mono8; png compressed mono8"
    np.testing.assert_array_equal(compressed_imgmsg_to_cv2(mono, "mono8"), gray)


def test_jpeg_round_trip_is_close():
    rgb = smooth_image()
    msg = cv2_to_compressed_imgmsg(rgb, "jpeg")
    assert msg.format == "rgb8; jpeg compressed bgr8"
    decoded = compressed_imgmsg_to_cv2(msg)
    assert decoded.shape == rgb.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - rgb).mean() < 3
    # The channels are not swapped: red stays where red was.
    assert np.abs(decoded[:, :, 0].astype(int) - rgb[:, :, 0]).mean() < 3


@pytest.mark.parametrize("format_, suffix, channels", [
    ("jpeg", ".jpg", 3), ("png", ".png", 3), ("rgb8; jpeg compressed bgr8", ".jpg", 3),
    ("bgr8; png compressed bgr8", ".png", 3), ("rgba8; png compressed bgra8", ".png", 4),
])
def test_every_format_image_transport_writes_decodes_to_rgb8(format_, suffix, channels):
    rgb = smooth_image()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    file_pixels = bgr if channels == 3 else np.dstack([bgr, np.full(rgb.shape[:2], 255, np.uint8)])
    ok, encoded = cv2.imencode(suffix, file_pixels)
    assert ok
    decoded = compressed_imgmsg_to_cv2(compressed_message(format_, encoded.tobytes()))
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb).mean() < (3 if suffix == ".jpg" else 1e-9)


def test_mono_jpeg_decodes_to_mono8_and_rgb8():
    gray = smooth_image()[:, :, 0]
    ok, encoded = cv2.imencode(".jpg", gray)
    msg = compressed_message("mono8; jpeg compressed mono8", encoded.tobytes())
    mono = compressed_imgmsg_to_cv2(msg, "mono8")
    assert mono.shape == gray.shape and np.abs(mono.astype(int) - gray).mean() < 3
    rgb = compressed_imgmsg_to_cv2(msg)
    assert rgb.shape == gray.shape + (3,)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], mono)


def encoded(suffix: str, image: np.ndarray) -> bytes:
    return cv2.imencode(suffix, image)[1].tobytes()


@pytest.mark.parametrize("format_, data, words", [
    ("jpeg", b"", ["no data"]),
    ("jpeg", bytes(range(200)), ["not a jpeg file", "starts with"]),
    ("png", encoded(".jpg", smooth_image()), ["not a png file", "'png'"]),
    ("jpeg", encoded(".jpg", smooth_image())[:300], ["corrupt or truncated", "jpeg"]),
    ("png", encoded(".png", smooth_image())[:200], ["corrupt or truncated", "png"]),
    ("tiff", encoded(".png", smooth_image()), ["unsupported compressed image format", "'tiff'", "jpeg or png"]),
    ("", encoded(".png", smooth_image()), ["unsupported compressed image format", "''"]),
    ("16UC1; compressedDepth png", encoded(".png", np.zeros((4, 4), np.uint16)), ["compressedDepth"]),
    ("png", encoded(".png", np.full((4, 4), 1000, np.uint16)), ["16-bit", "8-bit"]),
    ("jpeg", encoded(".jpg", smooth_image())[:-40], ["corrupt or truncated", "jpeg", "end marker"]),
    ("png", encoded(".png", smooth_image())[:-8], ["corrupt or truncated", "png", "end marker"]),
], ids=["empty", "garbage", "jpeg named png", "truncated jpeg", "truncated png", "unknown format",
        "no format", "compressed depth", "16-bit png", "jpeg cut near its end", "png cut in its IEND"])
def test_bad_compressed_images_are_refused_with_the_problem(format_, data, words):
    with pytest.raises(ImageConversionError) as error:
        compressed_imgmsg_to_cv2(compressed_message(format_, data))
    for word in words:
        assert word in str(error.value)
    assert isinstance(error.value, InputError)


@pytest.mark.parametrize("format_", ["jpeg", "png"])
def test_a_compressed_frames_size_is_read_from_its_header_without_decoding(format_):
    from lisa_ros.image_conv import check_compressed_imgmsg

    rgb = np.zeros((720, 1280, 3), np.uint8)
    rgb[100:300, 200:700] = (200, 30, 40)
    msg = cv2_to_compressed_imgmsg(rgb, format_)
    assert check_compressed_imgmsg(msg) == (720, 1280)
    padded = compressed_message(msg.format, bytes(msg.data) + b"\x00" * 7)  # zero padding after the end marker
    assert check_compressed_imgmsg(padded) == (720, 1280)
    np.testing.assert_array_equal(compressed_imgmsg_to_cv2(padded), compressed_imgmsg_to_cv2(msg))
    cut = compressed_message(msg.format, bytes(msg.data)[: len(msg.data) // 2])
    with pytest.raises(ImageConversionError, match="truncated"):
        check_compressed_imgmsg(cut)


@pytest.mark.parametrize("image, format_, words", [
    (np.zeros((4, 4, 3), np.float32), "png", ["uint8", "float32"]),
    (np.zeros((4, 4, 4), np.uint8), "png", ["(4, 4, 4)"]),
    (np.zeros((0, 4, 3), np.uint8), "png", ["empty"]),
    (np.zeros((4, 4, 3), np.uint8), "webp", ["unsupported compression", "'webp'"]),
])
def test_arrays_that_cannot_be_compressed_are_refused(image, format_, words):
    with pytest.raises(ImageConversionError) as error:
        cv2_to_compressed_imgmsg(image, format_)
    for word in words:
        assert word in str(error.value)


# ---- messages read from bags, without ROS ---------------------------------------------------------

TYPESTORE = get_typestore(Stores.ROS2_JAZZY)


def test_reads_images_deserialized_by_rosbags():
    for encoding in ("rgb8", "16UC1", "32FC1"):
        image = sample_image(encoding)
        msg = raw_message(encoding, image, padding=3)
        from_bag = TYPESTORE.deserialize_cdr(serialize_message(msg), "sensor_msgs/msg/Image")
        assert isinstance(from_bag.data, np.ndarray)
        np.testing.assert_array_equal(imgmsg_to_cv2(from_bag), image)

    rgb = sample_image("rgb8")
    compressed = TYPESTORE.deserialize_cdr(serialize_message(cv2_to_compressed_imgmsg(rgb, "png")),
                                           "sensor_msgs/msg/CompressedImage")
    np.testing.assert_array_equal(compressed_imgmsg_to_cv2(compressed), rgb)


@pytest.mark.parametrize("kind", [bytes, lambda b: array.array("B", b), list, lambda b: np.frombuffer(b, np.uint8)],
                         ids=["bytes", "array.array", "list", "numpy"])
def test_every_kind_of_data_field_is_read(kind):
    image = sample_image("mono16")
    msg = raw_message("mono16", image, padding=2)
    bag_type = TYPESTORE.types["sensor_msgs/msg/Image"]
    header = TYPESTORE.types["std_msgs/msg/Header"](stamp=TYPESTORE.types["builtin_interfaces/msg/Time"](0, 0),
                                                     frame_id="camera")
    bag_msg = bag_type(header=header, height=msg.height, width=msg.width, encoding=msg.encoding,
                       is_bigendian=msg.is_bigendian, step=msg.step, data=kind(bytes(msg.data)))
    np.testing.assert_array_equal(imgmsg_to_cv2(bag_msg), image)


def test_a_data_field_of_other_values_is_refused():
    bag_msg = TYPESTORE.types["sensor_msgs/msg/CompressedImage"](
        header=None, format="png", data=np.zeros(4, np.float32))
    with pytest.raises(ImageConversionError, match="uint8"):
        compressed_imgmsg_to_cv2(bag_msg)
    bag_msg.data = [0, 300]
    with pytest.raises(ImageConversionError, match="0..255"):
        compressed_imgmsg_to_cv2(bag_msg)


WITHOUT_ROS = """
import sys
for name in ("rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "builtin_interfaces", "rosidl_runtime_py"):
    sys.modules[name] = None  # importing any of them now fails
import cv2
import numpy as np
from rosbags.typesys import Stores, get_typestore
from lisa_ros.geometry import DepthView, pair_depth, target_geometry
from lisa_ros.image_conv import compressed_imgmsg_to_cv2, imgmsg_to_cv2

types = get_typestore(Stores.ROS2_JAZZY).types
header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](0, 0), frame_id="camera")
rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
image = types["sensor_msgs/msg/Image"](header=header, height=4, width=6, encoding="rgb8", is_bigendian=0,
                                       step=18, data=rgb.reshape(-1))
assert (imgmsg_to_cv2(image, "bgr8") == rgb[:, :, ::-1]).all()
png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].reshape(-1)
compressed = types["sensor_msgs/msg/CompressedImage"](header=header, format="rgb8; png compressed bgr8", data=png)
assert (compressed_imgmsg_to_cv2(compressed) == rgb).all()
depth, reason = pair_depth([(0, np.full((4, 6), 900, np.uint16), "16UC1")], 0, (4, 6), 0.1,
                           [5.0, 0, 3, 0, 5.0, 2, 0, 0, 1])
assert reason == "" and target_geometry(np.ones((4, 6), bool), (2.5, 1.5), depth).centroid_3d[2] > 0.89
print("converted without ROS")
"""


def test_conversions_and_geometry_work_without_ros():
    result = subprocess.run([sys.executable, "-c", WITHOUT_ROS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "converted without ROS" in result.stdout
