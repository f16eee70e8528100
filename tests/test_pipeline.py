"""LisaPipeline on the tiny model: odd images, batches, the frame cache, tracking, confidence.

[SEG] is forced at chosen decoding steps with a logits processor (see tests/test_generate.py), since
the random tiny model does not write it on its own.
"""

import importlib.util

import numpy as np
import pytest
import torch

from lisa_core.errors import ConfigurationError, InputError
from lisa_core.pipeline import LisaPipeline
from lisa_core.tiny import save_tiny_checkpoint

STAGES = {"clip", "sam_encoder", "prefill", "decode", "mask_decoder", "postprocess"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=1)


def seg_at(steps, seg_id, eos_id=None, eos_step=None):
    def processor(generated_ids, logits):
        step = len(generated_ids)
        if step in steps or step == eos_step:
            logits = logits.clone()
            logits[seg_id if step in steps else eos_id] += 1e4
        return logits

    return processor


@pytest.fixture(scope="module")
def pipe(checkpoint):
    pipeline = LisaPipeline.from_pretrained(checkpoint, max_new_tokens=8)
    pipeline.logits_processor = seg_at({1, 3}, pipeline.seg_token_id, pipeline.eos_token_id, 5)
    return pipeline


def image(height, width, channels=3, seed=0):
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(1, 1, 3), (37, 53, 3), (300, 7, 3), (20, 30, None), (20, 30, 4)])
def test_segment_odd_images(pipe, shape):
    result = pipe.segment(image(*shape), "Can you segment the cup in this image?")
    assert result.image_size == shape[:2]
    assert len(result.targets) == 2
    for target in result.targets:
        assert target.mask.shape == shape[:2] and target.mask.dtype == bool
        assert target.prompt_embedding.shape == (pipe.config.out_dim,)
        assert 0 <= target.area <= shape[0] * shape[1]
    assert result.union_mask.shape == shape[:2]
    assert STAGES <= set(result.timings)
    assert result.output_ids[-1] == pipe.eos_token_id and len(result.output_ids) == 6
    # Counted in ids: the tiny BPE also learnt "[SEG]." as an ordinary piece, which random tokens may spell.
    assert result.output_ids.count(pipe.seg_token_id) == 2 and "[SEG]" in result.answer
    assert "</s>" not in result.answer and "<s>" not in result.answer


def test_huge_image(pipe):
    big = np.zeros((8000, 8000, 3), dtype=np.uint8)
    big[2000:6000, 1000:3000] = 200
    result = pipe.segment(big, "Can you segment the box?")
    assert result.image_size == (8000, 8000) and result.targets[0].mask.shape == (8000, 8000)


def test_bad_images_and_queries_fail_clearly(pipe):
    with pytest.raises(InputError, match="uint8"):
        pipe.segment(np.zeros((4, 4, 3), dtype=np.uint16), "cup")
    with pytest.raises(InputError, match="empty"):
        pipe.segment(np.zeros((0, 4, 3), dtype=np.uint8), "cup")
    with pytest.raises(InputError, match="shape"):
        pipe.segment(np.zeros((4, 4, 5), dtype=np.uint8), "cup")
    with pytest.raises(InputError, match="empty"):
        pipe.segment(image(8, 8), "   ")
    with pytest.raises(InputError, match="list of queries"):
        pipe.segment_batch(image(8, 8), "cup")


def test_no_seg_means_no_targets(checkpoint):
    pipeline = LisaPipeline.from_pretrained(checkpoint, max_new_tokens=4)
    pipeline.logits_processor = lambda ids, logits: logits - 1e4 * torch.nn.functional.one_hot(
        torch.tensor(pipeline.seg_token_id), logits.shape[0]
    )
    result = pipeline.segment(image(30, 40), "What is in this image?")
    assert result.targets == [] and not result.union_mask.any()
    assert pipeline.seg_token_id not in result.output_ids and len(result.output_ids) == 4
    assert "mask_decoder" not in result.timings


def test_segment_batch_equals_single_calls_and_shares_the_encoders(pipe):
    frame = image(48, 64, seed=5)
    queries = ["Can you segment the cup?", "Where can I sit down?", "What should I use to cut paper?"]
    batch = pipe.segment_batch(frame, queries, frame_key="batch-frame")
    assert [r.query for r in batch] == queries
    assert "sam_encoder" in batch[0].timings
    assert all("sam_encoder" not in r.timings and "clip" not in r.timings for r in batch[1:])
    for query, batched in zip(queries, batch):
        single = pipe.segment(frame, query)
        assert single.output_ids == batched.output_ids and single.answer == batched.answer
        for a, b in zip(single.targets, batched.targets):
            assert np.array_equal(a.mask, b.mask)
            torch.testing.assert_close(a.prompt_embedding, b.prompt_embedding)


def test_segment_batch_loops_with_the_static_cache(checkpoint, pipe):
    looped = LisaPipeline.from_pretrained(checkpoint, max_new_tokens=8, cache_implementation="static",
                                          logits_processor=pipe.logits_processor)
    frame = image(40, 30, seed=6)
    queries = ["Can you segment the cup?", "Where can I sit down?"]
    for batched, one_by_one in zip(pipe.segment_batch(frame, queries), looped.segment_batch(frame, queries)):
        assert batched.output_ids == one_by_one.output_ids
        for a, b in zip(batched.targets, one_by_one.targets):
            assert np.array_equal(a.mask, b.mask)
    assert pipe.segment_batch(frame, []) == []


def test_frame_cache_and_tracking(pipe):
    frame = image(50, 70, seed=7)
    first = pipe.segment(frame, "Can you segment the cup?", frame_key=("camera", 1))
    assert "sam_encoder" in first.timings
    tracked = pipe.track(frame, [t.prompt_embedding for t in first.targets], frame_key=("camera", 1))
    assert len(tracked) == 2
    for original, again in zip(first.targets, tracked):
        assert np.array_equal(original.mask, again.mask)
        assert original.confidence == pytest.approx(again.confidence, abs=1e-6)
    second = pipe.segment(frame, "Can you segment the cup?", frame_key=("camera", 1))
    assert "sam_encoder" not in second.timings and "clip" not in second.timings
    # tracking on another frame runs the SAM encoder (not CLIP, not the LLM)
    moved = pipe.track(np.roll(frame, 5, axis=1), [first.targets[0].prompt_embedding])
    assert len(moved) == 1 and moved[0].mask.shape == frame.shape[:2]
    assert pipe.track(frame, []) == []
    # tracking first caches only SAM's embedding: a later query on that frame adds CLIP alone
    pipe.track(frame[::-1].copy(), [first.targets[0].prompt_embedding], frame_key=("camera", 2))
    later = pipe.segment(frame[::-1].copy(), "Can you segment the cup?", frame_key=("camera", 2))
    assert "clip" in later.timings and "sam_encoder" not in later.timings
    with pytest.raises(InputError, match="values"):
        pipe.track(frame, [torch.zeros(3)])


def test_reference_mode_gives_the_same_result(checkpoint, pipe):
    reference = LisaPipeline.from_pretrained(checkpoint, max_new_tokens=8, generation_mode="reference",
                                             logits_processor=pipe.logits_processor)
    frame = image(40, 40, seed=11)
    a, b = pipe.segment(frame, "Segment the bowl."), reference.segment(frame, "Segment the bowl.")
    assert a.output_ids == b.output_ids
    for x, y in zip(a.targets, b.targets):
        assert np.array_equal(x.mask, y.mask)


def test_options_are_checked(checkpoint):
    with pytest.raises(ConfigurationError, match="dtype"):
        LisaPipeline.from_pretrained(checkpoint, dtype="int3")
    with pytest.raises(ConfigurationError, match="quantization"):
        LisaPipeline.from_pretrained(checkpoint, quantization="2bit")
    with pytest.raises(ConfigurationError, match="generation_mode"):
        LisaPipeline.from_pretrained(checkpoint, generation_mode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="CUDA"):
            LisaPipeline.from_pretrained(checkpoint, device="cuda")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigurationError, match="bitsandbytes"):
            LisaPipeline.from_pretrained(checkpoint, quantization="8bit")


def test_bf16_runs_on_cpu(checkpoint):
    pipeline = LisaPipeline.from_pretrained(checkpoint, dtype="bf16", max_new_tokens=3)
    pipeline.logits_processor = seg_at({0}, pipeline.seg_token_id)
    result = pipeline.segment(image(20, 24), "Segment the cup.")
    assert len(result.targets) == 1 and result.targets[0].mask.shape == (20, 24)
    assert result.targets[0].prompt_embedding.dtype == torch.float32


def test_scripted_tiny_model_answers_with_seg(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "scripted", answer="Sure, it is [SEG].")
    pipeline = LisaPipeline.from_pretrained(path)
    for query in ("Can you segment the cup?", "Where can I sit down? Please output segmentation mask."):
        result = pipeline.segment(image(24, 36, seed=3), query)
        assert result.answer == "Sure, it is [SEG]."
        assert result.output_ids[-1] == pipeline.eos_token_id
        assert len(result.targets) == 1 and result.targets[0].mask.shape == (24, 36)
    with pytest.raises(ValueError, match="repeats a token"):
        save_tiny_checkpoint(tmp_path / "bad", answer="[SEG] and [SEG]")


def test_extreme_aspect_ratio_is_refused_before_clip(pipe):
    with pytest.raises(InputError, match="more than 50 times"):
        pipe.segment(image(2, 400), "Segment the cup.")
    assert len(pipe.segment(image(8, 400), "Segment the cup.").targets) == 2  # 50:1 is still accepted
    assert pipe.track(image(2, 400), [torch.zeros(pipe.config.out_dim)])[0].mask.shape == (2, 400)  # SAM only


@pytest.mark.parametrize("iou, confidence", [(-0.75, 0.0), (1.6, 1.0), (0.25, 0.25)])
def test_confidence_is_the_iou_prediction_clamped_to_0_1(checkpoint, pipe, iou, confidence):
    pipeline = LisaPipeline.from_pretrained(checkpoint, max_new_tokens=8, logits_processor=pipe.logits_processor)
    iou_head = pipeline.model.visual_model.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        iou_head.weight.zero_()
        iou_head.bias.fill_(iou)
    result = pipeline.segment(image(30, 40, seed=12), "Segment the bowl.")
    tracked = pipeline.track(image(30, 40, seed=13), [result.targets[0].prompt_embedding])
    for target in result.targets + tracked:
        assert target.iou_prediction == pytest.approx(iou, abs=1e-6)
        assert target.confidence == pytest.approx(confidence, abs=1e-6)
