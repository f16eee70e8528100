"""Reading images from disk as RGB uint8."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lisa_core.errors import InputError


def read_rgb(path: str | Path) -> np.ndarray:
    """The image at `path` as RGB uint8 (H, W, 3); InputError if it is missing or unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
