"""The pipeline's speed settings give the same answers as the plain path.

On the CPU: the static KV cache and on-device resizing. On a GPU (skipped without one): the same, plus
the compiled decoding step (CUDA graphs, also with streaming and cancel), the compiled SAM encoder and
the SAM encoder on its own CUDA stream. The tiny model answers with [SEG] forced at chosen steps.
"""

import numpy as np
import pytest
import torch

from lisa_core.errors import GenerationCancelled
from lisa_core.pipeline import LisaPipeline
from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUERIES = ("Can you segment the cup in this image?", "Which object can hold water? Please output segmentation mask.")


def force_seg(seg_id: int, eos_id: int):
    def processor(generated_ids, logits):
        step = len(generated_ids)
        if step in (1, 4) or step == 6:
            logits = logits.clone()
            logits[seg_id if step != 6 else eos_id] += 1e4
        return logits

    return processor


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=2), tokenizer


def frames():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (72, 128, 3), dtype=np.uint8) for _ in range(2)]


def answers(model, tokenizer, device, **settings):
    pipeline = LisaPipeline(model.to(device), tokenizer, max_new_tokens=10, **settings)
    pipeline.logits_processor = force_seg(pipeline.seg_token_id, pipeline.eos_token_id)
    results = [pipeline.segment(frame, query) for frame in frames() for query in QUERIES]
    tracked = pipeline.track(frames()[1], [results[0].targets[0].prompt_embedding])
    return results, tracked


def assert_same(results_a, results_b, min_mask_agreement=1.0):
    for a, b in zip(results_a, results_b):
        assert a.output_ids == b.output_ids
        assert len(a.targets) == len(b.targets) == 2
        for target_a, target_b in zip(a.targets, b.targets):
            torch.testing.assert_close(target_a.prompt_embedding, target_b.prompt_embedding, atol=1e-4, rtol=1e-4)
            assert (target_a.mask == target_b.mask).mean() >= min_mask_agreement


def test_static_cache_matches_dynamic_on_cpu(parts):
    model, tokenizer = parts
    plain, plain_tracked = answers(model, tokenizer, "cpu")
    static, static_tracked = answers(model, tokenizer, "cpu", cache_implementation="static")
    assert_same(plain, static)
    assert np.array_equal(plain_tracked[0].mask, static_tracked[0].mask)


def test_on_device_resizing_is_close_on_cpu(parts):
    model, tokenizer = parts
    plain, _ = answers(model, tokenizer, "cpu")
    resized, _ = answers(model, tokenizer, "cpu", preprocess_on_device=True)
    for a, b in zip(plain, resized):
        assert a.output_ids == b.output_ids
        for target_a, target_b in zip(a.targets, b.targets):
            assert (target_a.mask == target_b.mask).mean() >= 0.95


@needs_cuda
def test_overlapped_sam_encoder_matches_plain_cuda(parts):
    model, tokenizer = parts
    plain, plain_tracked = answers(model, tokenizer, "cuda")
    overlapped, overlapped_tracked = answers(model, tokenizer, "cuda", overlap_sam_encoder=True)
    assert_same(plain, overlapped)
    assert np.array_equal(plain_tracked[0].mask, overlapped_tracked[0].mask)


@needs_cuda
def test_compiled_paths_match_plain_cuda(parts):
    model, tokenizer = parts
    plain, plain_tracked = answers(model, tokenizer, "cuda")
    fast, fast_tracked = answers(
        model, tokenizer, "cuda", cache_implementation="static", compile_decoder=True, compile_encoders=True,
        overlap_sam_encoder=True,
    )
    assert_same(plain, fast, min_mask_agreement=0.99)
    assert (plain_tracked[0].mask == fast_tracked[0].mask).mean() >= 0.99


@needs_cuda
def test_streaming_and_cancel_with_the_compiled_step_cuda(parts):
    model, tokenizer = parts
    pipeline = LisaPipeline(model.to("cuda"), tokenizer, max_new_tokens=10, cache_implementation="static",
                            compile_decoder=True)
    forced = force_seg(pipeline.seg_token_id, pipeline.eos_token_id)
    chosen = []
    pipeline.logits_processor = lambda ids, logits: chosen.append(len(ids)) or forced(ids, logits)
    plain = pipeline.segment(frames()[0], QUERIES[0])
    reports = []
    streamed = pipeline.segment(frames()[0], QUERIES[0], on_progress=lambda p: reports.append(p.tokens) and False)
    assert streamed.output_ids == plain.output_ids and reports[-1] == len(plain.output_ids)
    chosen.clear()
    with pytest.raises(GenerationCancelled) as raised:
        pipeline.segment(frames()[1], QUERIES[0], on_progress=lambda p: p.tokens == 3)
    assert raised.value.tokens_generated == 3 and len(chosen) == 3  # no decoding step after the stop
    assert pipeline.segment(frames()[0], QUERIES[0]).output_ids == plain.output_ids


@needs_cuda
def test_cuda_graphed_function_matches_direct_calls():
    from lisa_core.cuda_graph import CudaGraphed

    weight = torch.randn(16, 16, device="cuda")

    def function(x):
        return torch.relu(x @ weight).sum(dim=0, keepdim=True) + 1

    graphed = CudaGraphed(function)
    inputs = [torch.randn(4, 16, device="cuda") for _ in range(3)]
    with torch.no_grad():
        outputs = [graphed(x) for x in inputs]
        for x, output in zip(inputs, outputs):  # earlier outputs are not overwritten by later replays
            torch.testing.assert_close(output, function(x))
        assert len(graphed._captured) == 1
        torch.testing.assert_close(graphed(torch.ones(2, 16, device="cuda")), function(torch.ones(2, 16, device="cuda")))
        assert len(graphed._captured) == 2
