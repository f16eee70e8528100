"""Overlay drawing: masks tinted in their colour, outside pixels untouched, caption on top."""

import numpy as np
import pytest
import torch

from lisa_core.errors import InputError
from lisa_core.overlay import TARGET_COLOURS, draw_overlay
from lisa_core.result import Target


def _target(mask):
    return Target.from_mask(mask, 0.9, torch.zeros(4))


def test_masks_are_tinted_and_the_rest_of_the_image_is_left_alone():
    image = np.full((60, 80, 3), 100, np.uint8)
    first, second = np.zeros((60, 80), bool), np.zeros((60, 80), bool)
    first[10:30, 10:30] = True
    second[35:55, 50:75] = True
    out = draw_overlay(image, [_target(first), _target(second)])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == 100).all(), "the input must not be drawn on"
    inside_first = out[12:16, 12:18].reshape(-1, 3)  # away from the outline and the centroid marker
    expected_first = (np.array(TARGET_COLOURS[0]) * 0.5 + 50).astype(np.uint8)
    assert (inside_first == expected_first).all()
    assert (out[37:41, 52:58].reshape(-1, 3) == (np.array(TARGET_COLOURS[1]) * 0.5 + 50).astype(np.uint8)).all()
    assert (out[45:, :5] == 100).all(), "pixels far from every target keep their value"


def test_caption_darkens_the_top_bar_and_writes_text():
    image = np.full((100, 200, 3), 200, np.uint8)
    out = draw_overlay(image, [], caption="q-1: Sure, it is [SEG]. \u00e9")
    top = out[:12]
    assert (top < 200).any() and (top == 255).any()
    assert (out[60:] == 200).all()


def test_empty_target_is_drawn_as_nothing():
    image = np.zeros((20, 20, 3), np.uint8)
    assert (draw_overlay(image, [_target(np.zeros((20, 20), bool))]) == 0).all()


def test_wrong_inputs_are_named():
    with pytest.raises(InputError, match="RGB"):
        draw_overlay(np.zeros((20, 20), np.uint8), [])
    with pytest.raises(InputError, match="mask"):
        draw_overlay(np.zeros((20, 20, 3), np.uint8), [_target(np.ones((10, 10), bool))])
