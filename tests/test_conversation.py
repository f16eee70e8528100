"""Conversations held by the caller: earlier turns passed as `history`, dropped oldest first to fit.

The ids checked are the ones the model is given (a spy wraps LisaModel.embed_prompt and passes the call
through). The answer is forced with a logits processor so that the first turn's answer is known text.
"""

import warnings

import numpy as np
import pytest

from lisa_core.errors import InputError
from lisa_core.pipeline import LisaPipeline
from lisa_core.prompt import PromptBuilder, Turn
from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer

ANSWER = "Sure, it is [SEG]."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def pipe(tokenizer):
    pipeline = LisaPipeline(build_tiny_model(tokenizer, seed=5), tokenizer, max_new_tokens=10)
    forced = tokenizer(ANSWER, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    def processor(generated_ids, logits):
        if len(generated_ids) >= len(forced):
            return logits
        logits = logits.clone()
        logits[forced[len(generated_ids)]] += 1e4
        return logits

    pipeline.logits_processor = processor
    return pipeline


@pytest.fixture()
def model_inputs(pipe, monkeypatch):
    """Every prompt's ids as the model receives them."""
    seen = []
    embed_prompt = pipe.model.embed_prompt

    def spy(input_ids, image_features):
        seen.append(input_ids[0].tolist())
        return embed_prompt(input_ids, image_features)

    monkeypatch.setattr(pipe.model, "embed_prompt", spy)
    return seen


def frame(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_second_turn_prompt_holds_the_first_turn(pipe, tokenizer, model_inputs):
    first = pipe.segment(frame(), "Where is the cup?")
    assert first.answer == ANSWER and (first.history_turns, first.turns_dropped) == (0, 0)
    second = pipe.segment(frame(), "And the knife?", history=[Turn("Where is the cup?", first.answer)])
    assert (second.history_turns, second.turns_dropped) == (1, 0)
    first_ids, second_ids = model_inputs
    # The first turn's whole prompt (its query included), then its answer and EOS, then the new query.
    assert second_ids[: len(first_ids)] == first_ids
    answer_ids = tokenizer(first.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert second_ids[len(first_ids): len(first_ids) + len(answer_ids)] == answer_ids
    query_ids = tokenizer("And the knife?", add_special_tokens=False).input_ids
    assert any(second_ids[i: i + len(query_ids)] == query_ids for i in range(len(first_ids), len(second_ids)))
    builder_ids = pipe.prompt_builder("And the knife?", [Turn("Where is the cup?", ANSWER)], 10).input_ids
    assert second_ids == builder_ids
    # No state is kept between calls: a query without history gets the standalone prompt again.
    pipe.segment(frame(), "Where is the cup?")
    assert model_inputs[2] == first_ids


def history_of(count):
    return [Turn(f"Where is the cup number {index}?", ANSWER) for index in range(count)]


def test_turns_dropped_oldest_first_to_fit_max_prompt_tokens(pipe, tokenizer, model_inputs):
    builder = PromptBuilder(tokenizer, pipe.config.num_image_tokens, 1024)
    history = history_of(4)
    lengths = [len(builder("And the knife?", history[len(history) - kept:]).input_ids) for kept in range(5)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 5
    for budget, kept in ((lengths[2], 2), (lengths[2] + 1, 2), (lengths[2] - 1, 1), (lengths[4], 4)):
        prompt = builder("And the knife?", history, max_prompt_tokens=budget)
        assert (prompt.history_turns, prompt.turns_dropped) == (kept, 4 - kept)
        assert prompt.input_ids == builder("And the knife?", history[4 - kept:]).input_ids
    result = pipe.segment(frame(), "And the knife?", history=history, max_prompt_tokens=lengths[1])
    assert (result.history_turns, result.turns_dropped) == (1, 3)
    assert model_inputs[-1] == builder("And the knife?", history[3:]).input_ids
    per_builder = PromptBuilder(tokenizer, pipe.config.num_image_tokens, 1024, max_prompt_tokens=lengths[3])
    assert per_builder("And the knife?", history).turns_dropped == 1
    assert per_builder("And the knife?", history, max_prompt_tokens=lengths[0]).turns_dropped == 4


def test_context_window_drops_turns_too(tokenizer):
    builder = PromptBuilder(tokenizer, 256, 400)
    prompt = builder("And the knife?", history_of(6), max_new_tokens=64)
    assert len(prompt.input_ids) <= 400 - 64 and prompt.turns_dropped > 0
    assert prompt.history_turns + prompt.turns_dropped == 6


def test_query_over_max_prompt_tokens_is_an_input_error(pipe, tokenizer):
    builder = PromptBuilder(tokenizer, pipe.config.num_image_tokens, 1024)
    query = "segment the red cup near the left window " * 5
    length = len(builder(query).input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not truncated with a warning
        expected = f"takes {length} tokens, over the 280-token budget.*max_prompt_tokens 280"
        with pytest.raises(InputError, match=expected):
            builder(query, history_of(2), max_prompt_tokens=280)
        with pytest.raises(InputError, match=f"takes {length} tokens"):
            pipe.segment(frame(), query, history=history_of(1), max_prompt_tokens=length - 1)
    assert pipe.segment(frame(), query, max_prompt_tokens=length).history_turns == 0
    with pytest.raises(InputError, match="max_prompt_tokens must be at least 1"):
        pipe.segment(frame(), "cup", max_prompt_tokens=0)


def test_bad_history_is_refused(pipe):
    with pytest.raises(InputError, match=r"history\[1\] must be a lisa_core.prompt.Turn, got tuple"):
        pipe.segment(frame(), "cup", history=[Turn("a", "b"), ("c", "d")])
    with pytest.raises(InputError, match="single string"):
        pipe.segment(frame(), "cup", history="Where is the cup?")
    with pytest.raises(InputError, match="Turn.answer must be a string"):
        Turn("Where is the cup?", None)
