"""What the model takes as a frame, checked without torch, so a node can refuse a bad image (and start)
before the model's libraries are loaded."""

from __future__ import annotations

import numpy as np

from lisa_core.errors import InputError


def prepare_image(image: np.ndarray) -> np.ndarray:
    """Return `image` as a C-contiguous RGB uint8 array of shape (H, W, 3).

    Accepted: uint8 RGB (H, W, 3), grey (H, W) or (H, W, 1), RGBA (H, W, 4, alpha dropped).
    Refused with InputError: other dtypes (16-bit and float images must be converted to uint8 by the
    caller, who knows their range), other shapes, and empty images.
    """
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        hint = (
            " (16-bit image: convert to 8 bits first, e.g. (image >> 8).astype(np.uint8) for full-range data)"
            if image.dtype in (np.uint16, np.int16)
            else " (convert it to uint8 RGB in 0-255 first)"
        )
        raise InputError(f"image must have dtype uint8, got {image.dtype}{hint}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InputError(
            f"image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {tuple(image.shape)}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image is empty: shape {tuple(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


# CLIP scales an image's short side up to its input size, so memory grows with the aspect ratio
# (1x10000 px takes ~5 GB); real cameras stay far below this ratio.
MAX_ASPECT_RATIO = 50


def check_aspect_ratio(height: int, width: int) -> None:
    """InputError if one side is more than MAX_ASPECT_RATIO times the other."""
    short_side, long_side = sorted((int(height), int(width)))
    if long_side > MAX_ASPECT_RATIO * short_side:
        raise InputError(
            f"{width}x{height}: one side is more than {MAX_ASPECT_RATIO} times the other "
            "(the model scales the short side up to its input size)"
        )
