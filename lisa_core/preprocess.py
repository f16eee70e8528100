"""Image preprocessing for LISA's two image paths and mask postprocessing.

The CLIP path matches the CLIPImageProcessor of `openai/clip-vit-large-patch14` that LISA uses
(shortest side to 224 with PIL bicubic, centre crop, rescale, CLIP mean/std). That "crop" framing
shows CLIP only the centre square of a wide frame; the "pad" framing first letterboxes the whole frame
into a square filled with the CLIP mean colour, as LLaVA's `expand2square` does. The SAM path matches
segment-anything's `ResizeLongestSide.apply_image` (PIL bilinear on uint8) followed by `Sam.preprocess`
(normalise on 0-255, zero-pad bottom/right). `postprocess_masks` is `Sam.postprocess_masks`.

Resizing runs on the CPU with PIL (so results equal the reference bit for bit); the `device` argument
places the normalised tensor, so the arithmetic after the resize can run on an accelerator.

Images of any size are accepted: very large images (e.g. above 8192 px per side) are simply resized
down, at the cost of the PIL resize time. Extreme aspect ratios make the CLIP path's intermediate image
long (the short side becomes 224 before the crop), exactly as the reference processor does.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lisa_core.errors import ConfigurationError, InputError
from lisa_core.frames import prepare_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

Device = Union[str, torch.device, None]

CLIP_FRAMINGS = ("crop", "pad")  # centre crop of the short-side resize (released LISA); whole frame letterboxed


def check_clip_framing(framing: str) -> None:
    """ConfigurationError unless `framing` is one of CLIP_FRAMINGS."""
    if framing not in CLIP_FRAMINGS:
        raise ConfigurationError(f"clip_framing must be one of {CLIP_FRAMINGS}, got {framing!r}")


def clip_resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after the CLIP resize: the short side becomes `size`, the long side is floored.

    Same rule as transformers' `get_resize_output_image_size(..., default_to_square=False)`.
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


RESIZE_BACKENDS = ("pil", "torch")


def _resize_on_device(image_rgb: np.ndarray, new_hw: tuple[int, int], mode: str, device: Device) -> torch.Tensor:
    """float32 (3, h, w) with 0-255 integer values: PIL's antialiased resize, done by torch on `device`.

    Same filter as PIL in float arithmetic: on average within a grey level of PIL's result; single
    pixels differ by more where PIL's rounding to 8 bits between its two passes matters (bicubic
    overshoot on noisy or very thin images). On a GPU this takes the resize of a large frame off the CPU.
    """
    pixels = torch.from_numpy(image_rgb).to(device).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    resized = F.interpolate(pixels, new_hw, mode=mode, align_corners=False, antialias=True)
    return resized[0].clamp_(0, 255).round_()


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(pixels - mean) / std per channel of a float32 (3, h, w) tensor."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def _check_backend(resize_backend: str) -> None:
    if resize_backend not in RESIZE_BACKENDS:
        raise ValueError(f"resize_backend must be one of {RESIZE_BACKENDS}, got {resize_backend!r}")


def expand_to_square(image_rgb: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """`image_rgb` centred on a square of colour `fill`, side max(H, W): LLaVA's `expand2square`."""
    height, width = image_rgb.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image_rgb
    return square


def clip_preprocess(
    image_rgb: np.ndarray,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    device: Device = None,
    resize_backend: str = "pil",
    framing: str = "crop",
) -> torch.Tensor:
    """CLIP pixel values, float32 (3, size, size), for an RGB uint8 image.

    resize_backend="pil" is bit-exact with the reference; "torch" resizes on `device` (faster on a GPU).
    framing="crop" (see CLIP_FRAMINGS) is the reference processor's; "pad" fills the square around the
    frame with `mean` as 8-bit values (truncated, as LLaVA does) before the resize.
    """
    _check_backend(resize_backend)
    check_clip_framing(framing)
    image_rgb = prepare_image(image_rgb)
    if framing == "pad":
        image_rgb = expand_to_square(image_rgb, [int(value * 255) for value in mean])
    new_h, new_w = clip_resized_shape(image_rgb.shape[0], image_rgb.shape[1], size)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    if resize_backend == "torch":
        resized = _resize_on_device(image_rgb, (new_h, new_w), "bicubic", device)
        pixels = resized[:, top : top + size, left : left + size] * (1.0 / 255.0)
    else:
        resized = np.asarray(Image.fromarray(image_rgb).resize((new_w, new_h), resample=Image.BICUBIC))
        cropped = resized[top : top + size, left : left + size]
        # Rescale in float64 then store float32, as the reference processor does.
        pixels = torch.from_numpy(cropped.astype(np.float64) * (1.0 / 255.0)).to(torch.float32)
        pixels = pixels.permute(2, 0, 1).to(device)
    return _normalise(pixels, mean, std).contiguous()


def sam_resized_shape(height: int, width: int, size: int = 1024) -> tuple[int, int]:
    """(h, w) after resizing the longest side to `size`: `int(x * size / max(H, W) + 0.5)`.

    This is segment-anything's `ResizeLongestSide.get_preprocess_shape`, except that a side is never
    rounded down to 0 (which would happen for, e.g., a 1x3000 image): it is kept at 1 pixel.
    """
    scale = size * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def sam_preprocess(
    image_rgb: np.ndarray,
    size: int = 1024,
    mean: Sequence[float] = SAM_PIXEL_MEAN,
    std: Sequence[float] = SAM_PIXEL_STD,
    device: Device = None,
    resize_backend: str = "pil",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM encoder input, float32 (3, size, size), and the resized (h, w) before padding.

    resize_backend="pil" is bit-exact with segment-anything; "torch" resizes on `device`.
    """
    _check_backend(resize_backend)
    image_rgb = prepare_image(image_rgb)
    new_h, new_w = sam_resized_shape(image_rgb.shape[0], image_rgb.shape[1], size)
    if resize_backend == "torch":
        pixels = _resize_on_device(image_rgb, (new_h, new_w), "bilinear", device)
    else:
        resized = np.array(Image.fromarray(image_rgb).resize((new_w, new_h), resample=Image.BILINEAR))
        pixels = torch.from_numpy(resized).to(device).permute(2, 0, 1).to(torch.float32)
    pixels = _normalise(pixels, mean, std)
    pixels = F.pad(pixels, (0, size - new_w, 0, size - new_h))
    return pixels.contiguous(), (new_h, new_w)


def postprocess_masks(
    low_res_logits: torch.Tensor,
    resized_hw: Sequence[int],
    original_hw: Sequence[int],
    size: int = 1024,
) -> torch.Tensor:
    """Mask logits (N, H, W) at the original image size from SAM's low-res logits.

    `low_res_logits` is (N, 1, h', w') or (N, h', w'). Upsample to (size, size), drop the padding
    (keep [:h, :w] of `resized_hw`), resize to `original_hw`; bilinear, align_corners=False. The
    interpolation runs in float32 whatever the input dtype. Threshold at 0 for the mask.
    """
    if low_res_logits.dim() == 3:
        low_res_logits = low_res_logits.unsqueeze(1)
    if low_res_logits.dim() != 4 or low_res_logits.shape[1] != 1:
        raise InputError(
            f"low_res_logits must have shape (N, 1, h, w) or (N, h, w), got {tuple(low_res_logits.shape)}"
        )
    resized_h, resized_w = (int(v) for v in resized_hw)
    original_h, original_w = (int(v) for v in original_hw)
    logits = F.interpolate(low_res_logits.float(), (size, size), mode="bilinear", align_corners=False)
    logits = logits[..., :resized_h, :resized_w]
    logits = F.interpolate(logits, (original_h, original_w), mode="bilinear", align_corners=False)
    return logits[:, 0]


__all__ = [
    "RESIZE_BACKENDS",
    "CLIP_FRAMINGS",
    "check_clip_framing",
    "expand_to_square",
    "CLIP_MEAN",
    "CLIP_STD",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "clip_resized_shape",
    "clip_preprocess",
    "sam_resized_shape",
    "sam_preprocess",
    "postprocess_masks",
]
