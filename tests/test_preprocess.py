"""lisa_core.preprocess against the reference implementations (transformers' CLIP processor, segment-anything)."""

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lisa_core.config import LisaConfig
from lisa_core.errors import ConfigurationError, InputError
from lisa_core.frames import prepare_image
from lisa_core.preprocess import (
    CLIP_FRAMINGS,
    CLIP_MEAN,
    CLIP_STD,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    clip_preprocess,
    clip_resized_shape,
    postprocess_masks,
    sam_preprocess,
    sam_resized_shape,
)
from lisa_core.tiny import build_tiny_tokenizer
from training.collate import LisaCollator
from training.data import Sample

ODD_SIZES = [(37, 1001), (480, 640), (1, 1), (1000, 3), (225, 223), (333, 517), (224, 224)]


def random_image(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# prepare_image


def test_prepare_image_keeps_rgb_uint8():
    image = random_image(5, 7)
    prepared = prepare_image(image)
    assert prepared.dtype == np.uint8 and prepared.shape == (5, 7, 3)
    np.testing.assert_array_equal(prepared, image)


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1)])
def test_prepare_image_grey_to_rgb(shape):
    grey = np.arange(24, dtype=np.uint8).reshape(shape)
    prepared = prepare_image(grey)
    assert prepared.shape == (4, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(prepared[:, :, channel], grey.reshape(4, 6))


def test_prepare_image_drops_alpha():
    rgba = random_image(3, 4, channels=4)
    prepared = prepare_image(rgba)
    assert prepared.shape == (3, 4, 3)
    np.testing.assert_array_equal(prepared, rgba[:, :, :3])
    assert prepared.flags["C_CONTIGUOUS"]


def test_prepare_image_makes_non_contiguous_input_contiguous():
    image = random_image(8, 9)
    flipped = image[::-1, ::2]
    prepared = prepare_image(flipped)
    assert prepared.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(prepared, flipped)


def test_prepare_image_refuses_16_bit_with_a_hint():
    with pytest.raises(InputError, match="uint16.*16-bit.*8 bits"):
        prepare_image(np.zeros((4, 4, 3), dtype=np.uint16))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, np.int32])
def test_prepare_image_refuses_other_dtypes(dtype):
    with pytest.raises(InputError, match=np.dtype(dtype).name):
        prepare_image(np.zeros((4, 4, 3), dtype=dtype))


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0, 3), (0, 0)])
def test_prepare_image_refuses_empty(shape):
    with pytest.raises(InputError, match="empty"):
        prepare_image(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("shape", [(4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (7,)])
def test_prepare_image_refuses_bad_shapes(shape):
    with pytest.raises(InputError, match="shape"):
        prepare_image(np.zeros(shape, dtype=np.uint8))


def test_prepare_image_refuses_non_arrays():
    with pytest.raises(InputError, match="numpy array.*list"):
        prepare_image([[0, 0, 0]])


# CLIP


def reference_clip_processor():
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def test_clip_preprocess_matches_transformers_processor():
    processor = reference_clip_processor()
    max_diffs = {}
    for seed, (height, width) in enumerate(ODD_SIZES):
        image = random_image(height, width, seed=seed)
        ours = clip_preprocess(image)
        reference = processor(images=image, return_tensors="pt", input_data_format="channels_last")
        reference = reference["pixel_values"][0]
        assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
        max_diffs[(height, width)] = (ours - reference).abs().max().item()
    print("clip max abs diff per size:", max_diffs)
    assert max(max_diffs.values()) <= 1e-6


@pytest.mark.parametrize(
    "hw, expected",
    [((37, 1001), (224, 6060)), ((480, 640), (224, 298)), ((1000, 3), (74666, 224)), ((1, 1), (224, 224))],
)
def test_clip_resized_shape_floors_the_long_side(hw, expected):
    assert clip_resized_shape(*hw, size=224) == expected


def test_clip_preprocess_constant_image_gives_normalised_constant():
    image = np.full((50, 80, 3), (255, 0, 128), dtype=np.uint8)
    pixels = clip_preprocess(image)
    for channel, value in enumerate((255, 0, 128)):
        expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(pixels[channel], torch.full((224, 224), expected), atol=1e-5)


def test_clip_preprocess_crops_the_centre():
    # Left third red, middle third green, right third blue: the 224 centre crop of the 224x672
    # resize is the green third.
    image = np.zeros((30, 90, 3), dtype=np.uint8)
    image[:, :30, 0] = 255
    image[:, 30:60, 1] = 255
    image[:, 60:, 2] = 255
    pixels = clip_preprocess(image)
    green_centre = pixels[:, 100:124, 100:124]
    expected = torch.tensor([(0 - CLIP_MEAN[0]) / CLIP_STD[0], (1 - CLIP_MEAN[1]) / CLIP_STD[1]])
    assert torch.allclose(green_centre[0], expected[0].expand(24, 24), atol=1e-5)
    assert torch.allclose(green_centre[1], expected[1].expand(24, 24), atol=1e-5)


def test_clip_preprocess_accepts_grey_and_size():
    grey = np.random.default_rng(3).integers(0, 256, (40, 30), dtype=np.uint8)
    pixels = clip_preprocess(grey, size=32)
    assert pixels.shape == (3, 32, 32)
    # grey input: all three channels carry the same rescaled value
    rescaled = [pixels[c] * CLIP_STD[c] + CLIP_MEAN[c] for c in range(3)]
    assert torch.allclose(rescaled[0], rescaled[1], atol=1e-5) and torch.allclose(rescaled[0], rescaled[2], atol=1e-5)


# CLIP framing


def red_bar_frame():
    """16:9 grey frame whose left 10 of 160 columns are red."""
    image = np.full((90, 160, 3), 60, dtype=np.uint8)
    image[:, :10] = (255, 0, 0)
    return image


def is_red(pixels):
    """(224, 224) bool: normalised CLIP pixels that were red."""
    red = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    green = (0 - CLIP_MEAN[1]) / CLIP_STD[1]
    return (pixels[0] > red - 0.1) & (pixels[1] < green + 0.1)


def test_crop_hides_the_sides_pad_keeps_the_whole_frame():
    image = red_bar_frame()
    crop = clip_preprocess(image)
    pad = clip_preprocess(image, framing="pad")
    assert torch.equal(crop, clip_preprocess(image, framing="crop"))
    assert not is_red(crop).any()
    red = is_red(pad)
    # The frame is letterboxed: 90 of 160 rows, from row 35, i.e. rows 49-175 of 224; the bar at the left.
    assert red[60:165, :10].all() and not red[60:165, 20:].any()
    fill = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
    for band in (pad[:, :45], pad[:, 180:]):  # a few rows off the edges, which bicubic blends
        torch.testing.assert_close(band, fill.expand_as(band), atol=1e-6, rtol=0)
    grey = torch.tensor([(60 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
    torch.testing.assert_close(pad[:, 60:165, 30:], grey.expand(3, 105, 194), atol=1e-5, rtol=0)


def llava_expand2square(pil_img, background_color):
    """LLaVA's expand2square (llava/mm_utils.py), as the reference for the pad framing."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("height, width", [(90, 160), (333, 517), (1000, 3), (37, 36), (50, 50)])
def test_pad_matches_llava_expand2square_and_the_clip_processor(height, width):
    image = random_image(height, width, seed=height)
    squared = llava_expand2square(Image.fromarray(image), tuple(int(x * 255) for x in CLIP_MEAN))
    reference = reference_clip_processor()(images=np.asarray(squared), return_tensors="pt",
                                           input_data_format="channels_last")["pixel_values"][0]
    assert (clip_preprocess(image, framing="pad") - reference).abs().max() <= 1e-6
    torch_pad = clip_preprocess(image, framing="pad", resize_backend="torch")
    assert (torch_pad - reference).abs().mean() <= 1.0 / 255.0 / min(CLIP_STD)


def test_square_frames_are_framed_alike():
    image = random_image(64, 64, seed=9)
    assert torch.equal(clip_preprocess(image, framing="pad"), clip_preprocess(image, framing="crop"))


@pytest.mark.parametrize("framing", CLIP_FRAMINGS)
def test_training_frames_clip_as_the_model_config_says(framing):
    tokenizer = build_tiny_tokenizer()
    config = LisaConfig.tiny(vocab_size=len(tokenizer))
    config.clip_framing = framing
    image = red_bar_frame()
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    mask[:, :10] = 1
    sample = Sample(image, [[("Which part is red?", "It is [SEG].")]], [mask], "synthetic")
    batch = LisaCollator(tokenizer, config, max_length=1024)([sample])
    assert torch.equal(batch.clip_pixels[0], clip_preprocess(image, framing=framing))


def test_unknown_framing_is_a_configuration_error_naming_the_choices():
    assert CLIP_FRAMINGS == ("crop", "pad")
    with pytest.raises(ConfigurationError, match=r"clip_framing must be one of \('crop', 'pad'\), got 'letterbox'"):
        clip_preprocess(random_image(8, 8), framing="letterbox")
    with pytest.raises(ConfigurationError, match="clip_framing must be one of"):
        LisaConfig(clip_framing="square")
    assert LisaConfig().clip_framing == "crop"


# SAM

SAM_CASES = [((37, 1001), (38, 1024)), ((480, 640), (768, 1024)), ((1, 1), (1024, 1024)), ((1000, 3), (1024, 3))]


@pytest.mark.parametrize("hw, expected_resized", SAM_CASES)
def test_sam_preprocess_matches_segment_anything(hw, expected_resized):
    image = random_image(*hw, seed=hw[0])
    pixels, resized_hw = sam_preprocess(image)
    assert resized_hw == expected_resized
    assert pixels.shape == (3, 1024, 1024) and pixels.dtype == torch.float32

    reference_resized = ResizeLongestSide(1024).apply_image(image)
    assert reference_resized.shape[:2] == expected_resized
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    reference = (torch.from_numpy(reference_resized).permute(2, 0, 1).float() - mean) / std
    height, width = expected_resized
    # the resize is bit-identical, so the normalised values are too
    assert torch.equal(pixels[:, :height, :width], reference)
    assert torch.count_nonzero(pixels[:, height:, :]) == 0
    assert torch.count_nonzero(pixels[:, :, width:]) == 0


def test_sam_resized_shape_matches_segment_anything_rule():
    for height, width in [(37, 1001), (480, 640), (1, 1), (1000, 3), (720, 1280), (1023, 1025)]:
        assert sam_resized_shape(height, width) == ResizeLongestSide.get_preprocess_shape(height, width, 1024)


def test_sam_resized_shape_never_returns_zero():
    # segment-anything would give (0, 1024) and fail to resize; we keep one row
    assert ResizeLongestSide.get_preprocess_shape(1, 3000, 1024) == (0, 1024)
    assert sam_resized_shape(1, 3000) == (1, 1024)
    pixels, resized_hw = sam_preprocess(random_image(1, 3000))
    assert resized_hw == (1, 1024) and pixels.shape == (3, 1024, 1024)


def test_sam_preprocess_pinned_values_and_padding():
    image = np.full((10, 20, 3), 255, dtype=np.uint8)
    pixels, resized_hw = sam_preprocess(image, size=64)
    assert resized_hw == (32, 64)
    for channel in range(3):
        expected = (255 - SAM_PIXEL_MEAN[channel]) / SAM_PIXEL_STD[channel]
        assert torch.allclose(pixels[channel, :32], torch.full((32, 64), expected))
        assert torch.equal(pixels[channel, 32:], torch.zeros(32, 64))
    assert pixels[0, 0, 0].item() == pytest.approx(2.2489083, abs=1e-6)


def test_preprocessors_place_tensors_on_the_requested_device():
    image = random_image(20, 30)
    assert clip_preprocess(image, device="cpu").device.type == "cpu"
    assert sam_preprocess(image, size=64, device=torch.device("cpu"))[0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_preprocessors_on_gpu_match_cpu():
    image = random_image(123, 77)
    assert torch.allclose(clip_preprocess(image, device="cuda").cpu(), clip_preprocess(image), atol=1e-6)
    gpu_pixels, gpu_hw = sam_preprocess(image, device="cuda")
    cpu_pixels, cpu_hw = sam_preprocess(image)
    assert gpu_hw == cpu_hw and torch.allclose(gpu_pixels.cpu(), cpu_pixels, atol=1e-6)


def test_preprocessors_handle_non_contiguous_input():
    image = random_image(60, 90)
    view = image[:, ::-1]
    assert torch.equal(clip_preprocess(view), clip_preprocess(view.copy()))
    assert torch.equal(sam_preprocess(view, size=64)[0], sam_preprocess(view.copy(), size=64)[0])


# postprocess_masks


def tiny_sam():
    """A real segment-anything Sam with a 1024 input and tiny layers: only postprocess_masks is used."""
    image_encoder = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=8, depth=1, num_heads=1, out_chans=8)
    prompt_encoder = PromptEncoder(
        embed_dim=8, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=4
    )
    mask_decoder = MaskDecoder(
        transformer_dim=8,
        transformer=TwoWayTransformer(depth=1, embedding_dim=8, mlp_dim=16, num_heads=1),
        num_multimask_outputs=3,
        iou_head_hidden_dim=8,
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder)


@pytest.mark.parametrize("original_hw", [(480, 640), (37, 1001), (1000, 3), (1, 1)])
def test_postprocess_masks_matches_segment_anything(original_hw):
    sam = tiny_sam()
    resized_hw = sam_resized_shape(*original_hw)
    low_res = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    ours = postprocess_masks(low_res, resized_hw, original_hw)
    with torch.no_grad():
        reference = sam.postprocess_masks(low_res, resized_hw, original_hw)
    assert ours.shape == (3, *original_hw)
    assert torch.equal(ours, reference[:, 0])


def test_postprocess_masks_accepts_three_dims_and_low_precision():
    low_res = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(1))
    from_3d = postprocess_masks(low_res, (768, 1024), (480, 640))
    from_4d = postprocess_masks(low_res[:, None], (768, 1024), (480, 640))
    assert from_3d.shape == (2, 480, 640) and torch.equal(from_3d, from_4d)
    from_bf16 = postprocess_masks(low_res.bfloat16(), (768, 1024), (480, 640))
    assert from_bf16.dtype == torch.float32 and from_bf16.shape == (2, 480, 640)


def test_postprocess_masks_crops_the_padding():
    # Positive logits only in the padded bottom half: nothing of it may reach the image.
    low_res = torch.full((1, 1, 256, 256), -10.0)
    low_res[..., 200:, :] = 10.0
    masks = postprocess_masks(low_res, (512, 1024), (100, 200)) > 0
    assert masks.shape == (1, 100, 200) and not masks.any()
    low_res[..., :100, :] = 10.0
    masks = postprocess_masks(low_res, (512, 1024), (100, 200)) > 0
    assert masks[0, :70].all() and not masks[0, -20:].any()


def test_postprocess_masks_refuses_bad_shapes():
    with pytest.raises(InputError, match="shape"):
        postprocess_masks(torch.zeros(2, 3, 256, 256), (1024, 1024), (10, 10))
    with pytest.raises(InputError, match="shape"):
        postprocess_masks(torch.zeros(256, 256), (1024, 1024), (10, 10))


def test_images_above_8192_pixels_per_side_are_accepted():
    tall = random_image(9000, 40)
    pixels, resized_hw = sam_preprocess(tall)
    assert resized_hw == (1024, 5) and pixels.shape == (3, 1024, 1024)
    assert clip_preprocess(tall).shape == (3, 224, 224)


@pytest.mark.parametrize("shape", [(720, 1280, 3), (480, 640, 3), (37, 1001, 3), (1000, 3, 3)])
def test_torch_resize_backend_is_close_to_pil(shape):
    image = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    clip_level = 1.0 / 255.0 / min(CLIP_STD)
    sam_level = 1.0 / min(SAM_PIXEL_STD)
    clip_pil, clip_torch = (clip_preprocess(image, resize_backend=backend) for backend in ("pil", "torch"))
    (sam_pil, size_pil), (sam_torch, size_torch) = (
        sam_preprocess(image, resize_backend=backend) for backend in ("pil", "torch")
    )
    assert size_pil == size_torch
    assert (sam_pil - sam_torch).abs().max() <= sam_level * 1.01
    assert (clip_pil - clip_torch).abs().mean() <= clip_level * 0.6
    # PIL rounds to 8 bits between its horizontal and vertical passes; torch does not.
    assert (clip_pil - clip_torch).abs().max() <= clip_level * 24


def test_unknown_resize_backend_is_refused():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="resize_backend"):
        sam_preprocess(image, resize_backend="opencv")
