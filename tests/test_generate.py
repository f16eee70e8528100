"""KV-cached generation against the official no-cache method, and the llava_v1 prompt.

The tiny model is random, so on its own it almost never writes [SEG]. Answers with zero, one or two
[SEG] are forced with a logits processor that, at chosen steps only, puts a large bias on one token;
every other step is the model's own greedy choice. Both modes see the same processor, so equal tokens
at the free steps and equal hidden states at the [SEG] steps test the cache, not the forcing.
"""

import warnings

import pytest
import torch

from lisa_core.errors import InputError
from lisa_core.generate import KVDecoder, generate, generate_batch
from lisa_core.prompt import IMAGE_PLACEHOLDER_ID
from lisa_core.prompt import SYSTEM_PROMPT, PromptBuilder, Turn, build_prompt, tokenize_with_image
from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


def force_at(schedule):
    """Logits processor: at step i (number of tokens generated so far) force token schedule[i]."""

    def processor(generated_ids, logits):
        token = schedule.get(len(generated_ids))
        if token is None:
            return logits
        biased = logits.clone()
        biased[token] += 1e4
        return biased

    return processor


def prompt_embeds(model, tokenizer, query="Can you segment the cup in this image?"):
    builder = PromptBuilder(tokenizer, model.config.num_image_tokens, 1024)
    ids = torch.tensor([builder(query).input_ids])
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        return model.embed_prompt(ids, model.encode_clip(pixels))


@pytest.mark.parametrize("seg_steps", [(), (3,), (1, 6)])
def test_cached_equals_reference(model, tokenizer, seg_steps):
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    eos = tokenizer.eos_token_id
    schedule = {step: seg for step in seg_steps}
    schedule[9] = eos
    embeds = prompt_embeds(model, tokenizer)
    outputs = {
        mode: generate(model, embeds, seg_token_id=seg, eos_token_id=eos, max_new_tokens=20, mode=mode,
                       logits_processor=force_at(schedule))
        for mode in ("cached", "reference")
    }
    cached, reference = outputs["cached"], outputs["reference"]
    assert cached.output_ids == reference.output_ids
    assert len(cached.output_ids) == 10 and cached.output_ids[-1] == eos  # stopped at EOS
    assert [i for i, t in enumerate(cached.output_ids) if t == seg] == list(seg_steps)
    assert cached.seg_hidden_states.shape == (len(seg_steps), model.config.language_model.hidden_size)
    torch.testing.assert_close(cached.seg_hidden_states, reference.seg_hidden_states, atol=1e-5, rtol=0)
    if seg_steps:
        sam = model.sam_image_embeddings(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)))
        with torch.no_grad():
            masks = [
                model.decode_masks(sam, model.project_seg(output.seg_hidden_states))[0] > 0
                for output in (cached, reference)
            ]
        assert torch.equal(masks[0], masks[1])


def test_free_running_tokens_match_and_max_new_tokens_stops(model, tokenizer):
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    embeds = prompt_embeds(model, tokenizer, "Where can I sit down?")
    runs = [
        generate(model, embeds, seg_token_id=seg, eos_token_id=tokenizer.eos_token_id, max_new_tokens=12,
                 mode=mode, decoder=KVDecoder(model, cache_implementation=cache))
        for mode, cache in (("cached", "dynamic"), ("reference", "dynamic"), ("cached", "static"))
    ]
    assert len(runs[0].output_ids) == 12
    assert runs[0].output_ids == runs[1].output_ids == runs[2].output_ids
    assert set(runs[0].timings) == {"prefill", "decode"}


def test_static_cache_gives_the_same_seg_states(model, tokenizer):
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    embeds = prompt_embeds(model, tokenizer)
    schedule = force_at({2: seg, 4: seg, 5: tokenizer.eos_token_id})
    dynamic, static = (
        generate(model, embeds, seg_token_id=seg, eos_token_id=tokenizer.eos_token_id, max_new_tokens=8,
                 decoder=KVDecoder(model, cache_implementation=cache), logits_processor=schedule)
        for cache in ("dynamic", "static")
    )
    assert dynamic.output_ids == static.output_ids
    torch.testing.assert_close(dynamic.seg_hidden_states, static.seg_hidden_states, atol=1e-5, rtol=0)


def per_row_schedule(schedules):
    """A processor giving row i of a batch its own forced steps.

    generate_batch keeps one generated-ids list per row and asks for the rows in order, so the lists
    seen empty at the first step, in order, are rows 0, 1, ...; a lone generate call is row 0.
    """
    rows: dict[int, int] = {}

    def processor(generated_ids, logits):
        row = rows.setdefault(id(generated_ids), len(rows))
        return force_at(schedules[row])(generated_ids, logits)

    return processor


def test_batched_generation_equals_one_prompt_at_a_time(model, tokenizer):
    seg, eos = tokenizer.convert_tokens_to_ids("[SEG]"), tokenizer.eos_token_id
    queries = ["Can you segment the cup?", "Where can I sit down? Please output segmentation mask.", "knife"]
    schedules = [{1: seg, 4: eos}, {0: seg, 2: seg, 8: eos}, {}]  # rows end at steps 5, 9 and the limit 11
    prompts = [prompt_embeds(model, tokenizer, query) for query in queries]
    assert len({p.shape[1] for p in prompts}) == 3  # different lengths: the batch is padded
    batch = generate_batch(model, prompts, seg_token_id=seg, eos_token_id=eos, max_new_tokens=11,
                           logits_processor=per_row_schedule(schedules))
    for prompt, schedule, batched in zip(prompts, schedules, batch):
        alone = generate(model, prompt, seg_token_id=seg, eos_token_id=eos, max_new_tokens=11,
                         logits_processor=per_row_schedule([schedule]))
        assert batched.output_ids == alone.output_ids
        torch.testing.assert_close(batched.seg_hidden_states, alone.seg_hidden_states, atol=1e-5, rtol=0)
    assert [len(output.output_ids) for output in batch] == [5, 9, 11]
    assert [output.seg_hidden_states.shape[0] for output in batch] == [1, 2, 0]
    assert generate_batch(model, [], seg_token_id=seg, eos_token_id=eos, max_new_tokens=3) == []


def test_generate_rejects_bad_arguments(model, tokenizer):
    embeds = prompt_embeds(model, tokenizer)
    with pytest.raises(ValueError, match="mode"):
        generate(model, embeds, seg_token_id=1, eos_token_id=2, max_new_tokens=2, mode="fast")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, embeds, seg_token_id=1, eos_token_id=2, max_new_tokens=0)


# ---- prompt -------------------------------------------------------------------------------------


def test_llava_v1_template_text():
    assert build_prompt("Where is the cup?") == (
        SYSTEM_PROMPT + " USER: <im_start><image><im_end>\nWhere is the cup? ASSISTANT:"
    )
    assert build_prompt("And the knife?", [Turn("Where is the cup?", "It is [SEG].")]) == (
        SYSTEM_PROMPT + " USER: <im_start><image><im_end>\nWhere is the cup? ASSISTANT: It is [SEG].</s>"
        "USER: And the knife? ASSISTANT:"
    )


def test_tokenisation_mirrors_tokenizer_image_token(tokenizer):
    text = build_prompt("Can you segment the cup?")
    ids = tokenize_with_image(tokenizer, text, 256)
    before, after = text.split("<image>")
    expected = tokenizer(before).input_ids + [IMAGE_PLACEHOLDER_ID] * 256 + tokenizer(after).input_ids[1:]
    assert ids == expected
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(IMAGE_PLACEHOLDER_ID) == 256
    start = ids.index(IMAGE_PLACEHOLDER_ID)
    assert ids[start - 1] == tokenizer.convert_tokens_to_ids("<im_start>")
    assert ids[start + 256] == tokenizer.convert_tokens_to_ids("<im_end>")


def test_empty_query_is_refused(tokenizer):
    builder = PromptBuilder(tokenizer, 256, 1024)
    for query in ("", "   \n\t"):
        with pytest.raises(InputError, match="empty"):
            builder(query)


def test_long_query_is_truncated_with_a_warning(tokenizer):
    builder = PromptBuilder(tokenizer, 256, 400)
    long_query = "segment the red cup near the left window " * 40
    with pytest.warns(UserWarning, match="truncated"):
        prompt = builder(long_query, max_new_tokens=32)
    ids = prompt.input_ids
    assert len(ids) <= 400 - 32
    assert ids.count(IMAGE_PLACEHOLDER_ID) == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(builder("segment the cup", max_new_tokens=32).input_ids) < 368


def test_old_turns_are_dropped_before_the_query_is_cut(tokenizer):
    builder = PromptBuilder(tokenizer, 256, 400)
    history = [Turn("segment the red cup near the left window " * 4, "It is [SEG].")] * 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompt = builder("And the knife?", history, max_new_tokens=16)
    ids = prompt.input_ids
    assert len(ids) <= 384
    assert prompt.turns_dropped > 0 and prompt.history_turns + prompt.turns_dropped == 5
    assert tokenizer.decode([i for i in ids if i >= 0]).rstrip().endswith("And the knife? ASSISTANT:")


def test_no_room_for_the_query_is_an_input_error(tokenizer):
    builder = PromptBuilder(tokenizer, 256, 320)
    with pytest.raises(InputError, match="max_new_tokens"):
        builder("segment the cup", max_new_tokens=100)
