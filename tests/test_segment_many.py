"""LisaPipeline.segment_many: several frames and queries in one call, the LLM decoding them as one batch.

[SEG] is forced at chosen decoding steps with a logits processor (see tests/test_generate.py), since
the random tiny model does not write it on its own.
"""

import numpy as np
import pytest
import torch

from lisa_core.errors import InputError
from lisa_core.pipeline import LisaPipeline
from lisa_core.prompt import Turn
from lisa_core.result import SegmentRequest
from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=6), tokenizer


def seg_at(steps, seg_id, eos_id, eos_step):
    def processor(generated_ids, logits):
        step = len(generated_ids)
        if step in steps or step == eos_step:
            logits = logits.clone()
            logits[seg_id if step in steps else eos_id] += 1e4
        return logits

    return processor


def make_pipeline(parts, **settings):
    model, tokenizer = parts
    pipeline = LisaPipeline(model, tokenizer, max_new_tokens=9, **settings)
    pipeline.logits_processor = seg_at({1, 4}, pipeline.seg_token_id, pipeline.eos_token_id, 7)
    return pipeline


def frame(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def requests():
    history = [Turn("Where is the cup?", "It is [SEG].")]
    return [
        SegmentRequest(frame(40, 64, 1), "Can you segment the cup?"),
        SegmentRequest(frame(48, 36, 2), "And the knife?", history=history),
        SegmentRequest(frame(30, 30, 3), "Where can I sit down?", max_new_tokens=3),
    ]


def assert_same(many, singles):
    for batched, single in zip(many, singles, strict=True):
        assert batched.output_ids == single.output_ids and batched.answer == single.answer
        assert (batched.history_turns, batched.turns_dropped) == (single.history_turns, single.turns_dropped)
        assert len(batched.targets) == len(single.targets)
        for a, b in zip(batched.targets, single.targets):
            assert np.array_equal(a.mask, b.mask)
            torch.testing.assert_close(a.prompt_embedding, b.prompt_embedding, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings", [{}, {"cache_implementation": "static"}, {"generation_mode": "reference"}])
def test_segment_many_equals_separate_segment_calls(parts, settings):
    pipeline = make_pipeline(parts, **settings)
    many = pipeline.segment_many(requests())
    singles = [
        pipeline.segment(r.image, r.query, history=r.history, max_new_tokens=r.max_new_tokens) for r in requests()
    ]
    assert_same(many, singles)
    assert [len(result.output_ids) for result in many] == [8, 8, 3]  # the third row cut at its own limit
    assert [len(result.targets) for result in many] == [2, 2, 1]
    assert [result.image_size for result in many] == [(40, 64), (48, 36), (30, 30)]
    assert many[1].history_turns == 1
    assert all({"clip", "sam_encoder", "prefill", "decode", "mask_decoder"} <= set(r.timings) for r in many)


def test_each_frame_is_encoded_once(parts):
    pipeline = make_pipeline(parts)
    shared, other = frame(40, 64, 4), frame(40, 64, 5)
    results = pipeline.segment_many([
        SegmentRequest(shared, "Can you segment the cup?"),
        SegmentRequest(other, "Can you segment the cup?", frame_key="other"),
        SegmentRequest(shared, "Where can I sit down?"),
        SegmentRequest(other.copy(), "Where can I sit down?", frame_key="other"),  # the frame cache
    ])
    encoded = ["sam_encoder" in result.timings and "clip" in result.timings for result in results]
    assert encoded == [True, True, False, False]
    assert all("sam_encoder" not in r.timings and "clip" not in r.timings for r in results[2:])
    # sharing the encoding changes nothing in the results
    assert_same(results[2:], [pipeline.segment(shared, "Where can I sit down?"),
                              pipeline.segment(other, "Where can I sit down?")])
    assert "sam_encoder" not in pipeline.segment(other, "cup", frame_key="other").timings


def test_bad_request_is_named(parts):
    pipeline = make_pipeline(parts)
    good = SegmentRequest(frame(20, 20, 6), "cup")
    with pytest.raises(InputError, match=r"requests\[1\] \(frame_key 'cam0'\): image must have dtype uint8"):
        pipeline.segment_many([good, SegmentRequest(np.zeros((8, 8, 3), np.float32), "cup", frame_key="cam0")])
    with pytest.raises(InputError, match=r"requests\[2\]: query is empty"):
        pipeline.segment_many([good, good, SegmentRequest(frame(8, 8, 7), " ")])
    with pytest.raises(InputError, match=r"requests\[0\]: max_new_tokens must be at least 1"):
        pipeline.segment_many([SegmentRequest(frame(8, 8, 7), "cup", max_new_tokens=0)])
    with pytest.raises(InputError, match=r"requests\[0\]: .*more than 50 times"):
        pipeline.segment_many([SegmentRequest(frame(2, 400, 7), "cup")])
    with pytest.raises(InputError, match=r"requests\[1\] must be a SegmentRequest, got str"):
        pipeline.segment_many([good, "cup"])
    with pytest.raises(InputError, match="got a single one"):
        pipeline.segment_many(good)
    assert pipeline.segment_many([]) == []
