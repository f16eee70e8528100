"""sensor_msgs/Image <-> numpy: every encoding, padded rows, both byte orders, and clear errors."""

import array

import numpy as np
import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from lisa_ros.image_conv import ENCODINGS, ImageConversionError, cv2_to_imgmsg, imgmsg_to_cv2
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
