"""LisaPipeline on a CUDA GPU (skipped without one): precisions, quantization, cached vs reference.

The tiny model answers with [SEG] forced at steps 1 and 3 and EOS at step 5 (see tests/test_generate.py).
"""

import importlib.util

import numpy as np
import pytest
import torch

from lisa_core.pipeline import LisaPipeline
from lisa_core.tiny import save_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"
)
QUERIES = ["Can you segment the cup?", "Where can I sit down? Please output segmentation mask.", "knife"]


def forced(seg_id, eos_id):
    def processor(generated_ids, logits):
        step = len(generated_ids)
        if step in (1, 3, 5):
            logits = logits.clone()
            logits[seg_id if step != 5 else eos_id] += 1e4
        return logits

    return processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=4)


def load(checkpoint, **options):
    pipeline = LisaPipeline.from_pretrained(checkpoint, max_new_tokens=8, **options)
    pipeline.logits_processor = forced(pipeline.seg_token_id, pipeline.eos_token_id)
    return pipeline


def frame(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def mask_agreement(a, b):
    return float((a.mask == b.mask).mean())


def test_cuda_fp32_matches_cpu_and_reference_mode(checkpoint):
    cpu = load(checkpoint)
    cuda = load(checkpoint, device="cuda")
    reference = load(checkpoint, device="cuda", generation_mode="reference")
    expected = cpu.segment(frame(), QUERIES[0])
    for result in (cuda.segment(frame(), QUERIES[0]), reference.segment(frame(), QUERIES[0])):
        assert result.output_ids == expected.output_ids
        assert len(result.targets) == 2
        for got, want in zip(result.targets, expected.targets):
            torch.testing.assert_close(got.prompt_embedding, want.prompt_embedding, atol=1e-4, rtol=1e-4)
            assert mask_agreement(got, want) > 0.995
    assert cuda.model.mm_projector.weight.device.type == "cuda"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precisions_segment_and_batch(checkpoint, dtype):
    pipeline = load(checkpoint, device="cuda", dtype=dtype)
    single = pipeline.segment(frame(1), QUERIES[1])
    assert len(single.targets) == 2 and single.output_ids[-1] == pipeline.eos_token_id
    for target in single.targets:
        assert torch.isfinite(target.prompt_embedding).all() and target.mask.shape == (120, 160)
    batch = pipeline.segment_batch(frame(1), QUERIES)
    assert [len(result.targets) for result in batch] == [2, 2, 2]
    for result in batch:
        assert all(torch.isfinite(t.prompt_embedding).all() for t in result.targets)
    assert batch[1].output_ids == single.output_ids
    for got, want in zip(batch[1].targets, single.targets):
        assert mask_agreement(got, want) > 0.98


@needs_bitsandbytes
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_language_model(checkpoint, quantization):
    import bitsandbytes as bnb

    pipeline = load(checkpoint, device="cuda", quantization=quantization)
    q_proj = pipeline.model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit)
    assert pipeline.model.sam_dtype == torch.float16  # SAM stays 16-bit
    result = pipeline.segment(frame(2), QUERIES[0])
    assert len(result.targets) == 2
    assert all(torch.isfinite(t.prompt_embedding).all() for t in result.targets)
    fp16 = load(checkpoint, device="cuda", dtype="fp16").segment(frame(2), QUERIES[0])
    for got, want in zip(result.targets, fp16.targets):
        cosine = torch.nn.functional.cosine_similarity(got.prompt_embedding, want.prompt_embedding, dim=0)
        assert cosine > 0.9
