"""Draws segmentation targets over their image, for people to look at (RViz, PNG files, the CLI)."""

from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from lisa_core.errors import InputError
from lisa_core.result import Target

# One colour per target, in [SEG] order (RGB), cycling after the last.
TARGET_COLOURS = (
    (255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0),
    (230, 64, 230), (0, 220, 220), (255, 140, 0), (160, 100, 255),
)


def draw_overlay(image: np.ndarray, targets: Sequence[Target], caption: Optional[str] = None,
                 alpha: float = 0.5) -> np.ndarray:
    """Returns a copy of `image` (HxWx3 uint8 RGB) with each target's mask tinted, outlined and its
    centroid marked, and an optional caption (ASCII; other characters are shown as '?') on top."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"overlay needs an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    canvas = image.copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(max(height, width) / 400))
    for index, target in enumerate(targets):
        if target.mask.shape != (height, width):
            raise InputError(f"target {index} mask is {target.mask.shape}, image is {(height, width)}")
        colour = np.array(TARGET_COLOURS[index % len(TARGET_COLOURS)], dtype=np.float32)
        mask = target.mask
        canvas[mask] = (canvas[mask] * (1.0 - alpha) + colour * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, tuple(int(c) for c in colour), thickness)
        if target.centroid is not None:
            centre = (int(round(target.centroid[0])), int(round(target.centroid[1])))
            cv2.drawMarker(canvas, centre, (255, 255, 255), cv2.MARKER_CROSS, 6 * thickness + 6,
                           thickness + 1)
            cv2.drawMarker(canvas, centre, tuple(int(c) for c in colour), cv2.MARKER_CROSS,
                           6 * thickness + 6, thickness)
    if caption:
        _draw_caption(canvas, caption, thickness)
    return canvas


def _draw_caption(canvas: np.ndarray, caption: str, thickness: int) -> None:
    text = caption.encode("ascii", "replace").decode("ascii").replace("\n", " ")
    scale = 0.4 * thickness
    (_, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    bar_height = text_height + baseline + 6
    canvas[:bar_height] = (canvas[:bar_height] * 0.35).astype(np.uint8)
    cv2.putText(canvas, text, (4, text_height + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                thickness, cv2.LINE_AA)
