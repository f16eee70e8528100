"""Token streaming and cancel: generate's on_token, generate_batch's per-row stop, segment's on_progress.

The tiny model is random, so the answer is forced token by token with a logits processor (see
tests/test_generate.py). The processor also counts how many tokens were chosen: a cancel after k tokens
must leave it at exactly k, i.e. no decoding step ran after the stop.
"""

import numpy as np
import pytest
import torch

from lisa_core.errors import GenerationCancelled, InputError
from lisa_core.generate import KVDecoder, generate, generate_batch
from lisa_core.pipeline import LisaPipeline
from lisa_core.prompt import PromptBuilder
from lisa_core.result import STAGE_DECODING_MASKS, STAGE_ENCODING, STAGE_GENERATING, STAGES
from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer

ANSWER = "Sure, it is [SEG]."
MODES = [("cached", "dynamic"), ("cached", "static"), ("reference", "dynamic")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=3)


class ForcedAnswer:
    """Logits processor forcing `ids` then EOS; `calls` counts the tokens it was asked to choose."""

    def __init__(self, ids, eos_id):
        self.schedule = list(ids) + [eos_id]
        self.calls = 0

    def __call__(self, generated_ids, logits):
        self.calls += 1
        step = len(generated_ids)
        if step >= len(self.schedule):
            return logits
        biased = logits.clone()
        biased[self.schedule[step]] += 1e4
        return biased


def answer_ids(tokenizer):
    return tokenizer(ANSWER, add_special_tokens=False).input_ids


def prompt_embeds(model, tokenizer, query="Can you segment the cup in this image?"):
    ids = PromptBuilder(tokenizer, model.config.num_image_tokens, 1024)(query).input_ids
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return model.embed_prompt(torch.tensor([ids]), model.encode_clip(pixels))


def run(model, tokenizer, mode, cache, processor, on_token=None, max_new_tokens=12):
    return generate(
        model, prompt_embeds(model, tokenizer), seg_token_id=tokenizer.convert_tokens_to_ids("[SEG]"),
        eos_token_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens, mode=mode,
        decoder=KVDecoder(model, cache_implementation=cache), logits_processor=processor, on_token=on_token,
    )


@pytest.mark.parametrize("mode, cache", MODES)
def test_callback_sees_every_token_and_changes_nothing(model, tokenizer, mode, cache):
    plain = run(model, tokenizer, mode, cache, ForcedAnswer(answer_ids(tokenizer), tokenizer.eos_token_id))
    seen = []
    streamed = run(model, tokenizer, mode, cache, ForcedAnswer(answer_ids(tokenizer), tokenizer.eos_token_id),
                   on_token=lambda ids: seen.append(list(ids)) and False)
    assert streamed.output_ids == plain.output_ids and len(plain.output_ids) == len(answer_ids(tokenizer)) + 1
    torch.testing.assert_close(streamed.seg_hidden_states, plain.seg_hidden_states, atol=0, rtol=0)
    assert seen == [plain.output_ids[: n + 1] for n in range(len(plain.output_ids))]
    free = run(model, tokenizer, mode, cache, None, max_new_tokens=6)
    assert run(model, tokenizer, mode, cache, None, on_token=lambda ids: False, max_new_tokens=6).output_ids == (
        free.output_ids
    )


@pytest.mark.parametrize("mode, cache", MODES)
@pytest.mark.parametrize("k", [1, 4])
def test_cancel_after_k_tokens_stops_at_once(model, tokenizer, mode, cache, k):
    processor = ForcedAnswer(answer_ids(tokenizer), tokenizer.eos_token_id)
    calls = []
    with pytest.raises(GenerationCancelled, match=f"after {k} tokens") as raised:
        run(model, tokenizer, mode, cache, processor, on_token=lambda ids: calls.append(len(ids)) or len(ids) == k)
    assert raised.value.tokens_generated == k
    assert calls == list(range(1, k + 1))
    assert processor.calls == k
    assert not isinstance(raised.value, InputError)


def test_static_cache_is_clean_after_a_cancel(model, tokenizer):
    decoder = KVDecoder(model, cache_implementation="static")
    seg, eos = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    embeds = prompt_embeds(model, tokenizer)

    def once(on_token=None):
        return generate(model, embeds, seg_token_id=seg, eos_token_id=eos, max_new_tokens=8, decoder=decoder,
                        on_token=on_token)

    before = once()
    with pytest.raises(GenerationCancelled):
        once(lambda ids: len(ids) == 3)
    assert once().output_ids == before.output_ids


def test_batch_row_cancelled_early_while_the_others_go_on(model, tokenizer):
    seg, eos = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    queries = ["Can you segment the cup?", "Where can I sit down?", "knife"]
    prompts = [prompt_embeds(model, tokenizer, query) for query in queries]
    kwargs = dict(seg_token_id=seg, eos_token_id=eos, max_new_tokens=7)
    plain = generate_batch(model, prompts, **kwargs)
    calls = {row: 0 for row in range(3)}

    def on_token(row, ids):
        calls[row] += 1
        return row == 1 and len(ids) == 2

    streamed = generate_batch(model, prompts, on_token=on_token, **kwargs)
    assert [output.cancelled for output in streamed] == [False, True, False]
    assert streamed[1].output_ids == plain[1].output_ids[:2] and calls[1] == 2
    for row in (0, 2):
        assert streamed[row].output_ids == plain[row].output_ids and calls[row] == len(plain[row].output_ids)
    assert not any(output.cancelled for output in plain)


def test_batch_rows_stop_at_their_own_limits(model, tokenizer):
    seg, eos = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    prompts = [prompt_embeds(model, tokenizer, query) for query in ("Can you segment the cup?", "knife")]
    outputs = generate_batch(model, prompts, seg_token_id=seg, eos_token_id=eos, max_new_tokens=[2, 6])
    assert [len(output.output_ids) for output in outputs] == [2, 6]
    with pytest.raises(ValueError, match="2 prompts"):
        generate_batch(model, prompts, seg_token_id=seg, eos_token_id=eos, max_new_tokens=[2])


# ---- the pipeline -------------------------------------------------------------------------------


def pipeline(model, tokenizer, mode, cache):
    pipe = LisaPipeline(model, tokenizer, generation_mode=mode, cache_implementation=cache, max_new_tokens=12)
    pipe.logits_processor = ForcedAnswer(answer_ids(tokenizer), tokenizer.eos_token_id)
    return pipe


def frame(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (36, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode, cache", MODES)
def test_progress_stages_and_growing_text(model, tokenizer, mode, cache):
    pipe = pipeline(model, tokenizer, mode, cache)
    reports = []
    result = pipe.segment(frame(), "Where is the cup?", on_progress=lambda p: reports.append(p) and False)
    assert result.answer == ANSWER and len(result.targets) == 1
    stages = [report.stage for report in reports]
    tokens = len(result.output_ids)
    assert stages == [STAGE_ENCODING] + [STAGE_GENERATING] * tokens + [STAGE_DECODING_MASKS]
    assert set(stages) == set(STAGES)
    assert [report.tokens for report in reports] == [0, *range(1, tokens + 1), tokens]
    texts = [report.text for report in reports if report.stage == STAGE_GENERATING]
    assert texts[0] and all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert texts[-1] == result.answer == reports[-1].text
    assert len(set(texts)) > 2  # it grows, not one text repeated
    assert pipe.segment(frame(), "Where is the cup?").output_ids == result.output_ids


@pytest.mark.parametrize("mode, cache", MODES)
def test_segment_cancelled_after_k_tokens(model, tokenizer, mode, cache):
    pipe = pipeline(model, tokenizer, mode, cache)
    generating = []

    def on_progress(progress):
        if progress.stage == STAGE_GENERATING:
            generating.append(progress.tokens)
        return progress.tokens == 3

    with pytest.raises(GenerationCancelled) as raised:
        pipe.segment(frame(1), "Where is the cup?", on_progress=on_progress)
    assert raised.value.tokens_generated == 3 and generating == [1, 2, 3]
    assert pipe.logits_processor.calls == 3
    pipe.logits_processor.calls = 0
    assert pipe.segment(frame(1), "Where is the cup?").answer == ANSWER  # usable after a cancel


def test_cancel_at_encoding_and_at_mask_decoding(model, tokenizer):
    pipe = pipeline(model, tokenizer, "cached", "dynamic")
    with pytest.raises(GenerationCancelled) as raised:
        pipe.segment(frame(2), "Where is the cup?", on_progress=lambda p: p.stage == STAGE_ENCODING)
    assert raised.value.tokens_generated == 0 and pipe.logits_processor.calls == 0
    with pytest.raises(GenerationCancelled) as raised:
        pipe.segment(frame(2), "Where is the cup?", on_progress=lambda p: p.stage == STAGE_DECODING_MASKS)
    assert raised.value.tokens_generated == len(answer_ids(tokenizer)) + 1
