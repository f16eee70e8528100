"""The llava_v1 conversation template and LLaVA's image-aware tokenisation, as LISA uses them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from lisa_core.errors import InputError

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
TURN_SEPARATOR = " "  # after a user message (llava_v1 `sep`)
ANSWER_SEPARATOR = "</s>"  # after an assistant message (llava_v1 `sep2`)
# input_ids value marking the positions that receive the projected CLIP features (as in LLaVA).
IMAGE_PLACEHOLDER_ID = -200


@dataclass(frozen=True)
class Turn:
    """One earlier exchange of a conversation: the query and the decoded answer it got."""

    query: str
    answer: str

    def __post_init__(self) -> None:
        for name in ("query", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InputError(f"Turn.{name} must be a string, got {type(value).__name__}")


@dataclass(frozen=True)
class Prompt:
    """Model input ids for one query, and which earlier turns made it in."""

    input_ids: list[int]
    history_turns: int  # earlier turns in the prompt (the most recent ones)
    turns_dropped: int  # oldest earlier turns left out to fit


def build_prompt(
    query: str,
    history: Sequence[Turn] = (),
    *,
    image_token: str = "<image>",
    im_start_token: str = "<im_start>",
    im_end_token: str = "<im_end>",
    use_im_start_end: bool = True,
) -> str:
    """The llava_v1 prompt text; the image goes with the first user message only."""
    image_text = f"{im_start_token}{image_token}{im_end_token}" if use_im_start_end else image_token
    queries = [turn.query for turn in history] + [query]
    answers = [turn.answer for turn in history]
    text = SYSTEM_PROMPT + TURN_SEPARATOR
    for index, user_text in enumerate(queries):
        if index == 0:
            user_text = f"{image_text}\n{user_text}"
        text += f"{USER_ROLE}: {user_text}{TURN_SEPARATOR}"
        if index < len(answers):
            text += f"{ASSISTANT_ROLE}: {answers[index]}{ANSWER_SEPARATOR}"
        else:
            text += f"{ASSISTANT_ROLE}:"
    return text


def tokenize_with_image(tokenizer, prompt: str, num_image_tokens: int, image_token: str = "<image>") -> list[int]:
    """Token ids of `prompt`, its image placeholder expanded to `num_image_tokens` IMAGE_PLACEHOLDER_IDs.

    Mirrors LLaVA's tokenizer_image_token: each text chunk around the placeholder is tokenised on its
    own, and only the first keeps the tokenizer's BOS.
    """
    chunks = prompt.split(image_token)
    input_ids: list[int] = []
    for index, chunk in enumerate(chunks):
        chunk_ids = tokenizer(chunk).input_ids
        if index > 0:
            if chunk_ids and chunk_ids[0] == tokenizer.bos_token_id:
                chunk_ids = chunk_ids[1:]
            input_ids.extend([IMAGE_PLACEHOLDER_ID] * num_image_tokens)
        input_ids.extend(chunk_ids)
    return input_ids


def _check_history(history: Sequence[Turn]) -> list[Turn]:
    if isinstance(history, (str, bytes)):
        raise InputError("history must be a sequence of lisa_core.prompt.Turn, got a single string")
    turns = list(history)
    for index, turn in enumerate(turns):
        if not isinstance(turn, Turn):
            raise InputError(f"history[{index}] must be a lisa_core.prompt.Turn, got {type(turn).__name__}")
    return turns


def _check_max_prompt_tokens(max_prompt_tokens: Optional[int]) -> None:
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise InputError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")


class PromptBuilder:
    """Turns a query (and earlier turns) into model input ids that fit the context window.

    `max_prompt_tokens`, per builder or per call (the call's wins), caps the prompt below what the
    context window leaves: earlier turns are dropped, oldest first, to fit it, and a query that does not
    fit it on its own is an InputError rather than truncated.
    """

    def __init__(
        self,
        tokenizer,
        num_image_tokens: int,
        max_length: int,
        *,
        image_token: str = "<image>",
        im_start_token: str = "<im_start>",
        im_end_token: str = "<im_end>",
        use_im_start_end: bool = True,
        max_prompt_tokens: Optional[int] = None,
    ) -> None:
        _check_max_prompt_tokens(max_prompt_tokens)
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.max_prompt_tokens = max_prompt_tokens
        self.template_tokens = dict(
            image_token=image_token,
            im_start_token=im_start_token,
            im_end_token=im_end_token,
            use_im_start_end=use_im_start_end,
        )

    def _ids(self, query: str, history: Sequence[Turn]) -> list[int]:
        text = build_prompt(query, history, **self.template_tokens)
        return tokenize_with_image(self.tokenizer, text, self.num_image_tokens, self.template_tokens["image_token"])

    def __call__(
        self,
        query: str,
        history: Sequence[Turn] = (),
        max_new_tokens: int = 0,
        max_prompt_tokens: Optional[int] = None,
    ) -> Prompt:
        """The prompt for `query`; drops the oldest turns, then (with a warning, only without a
        max_prompt_tokens) the query's tail, to fit."""
        if not isinstance(query, str) or not query.strip():
            raise InputError("query is empty: give an instruction or a question about the image")
        query = query.strip()
        history = _check_history(history)
        _check_max_prompt_tokens(max_prompt_tokens)
        limit = self.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
        context_budget = self.max_length - max_new_tokens
        budget = context_budget if limit is None else min(context_budget, limit)
        kept = list(history)
        input_ids = self._ids(query, kept)
        while len(input_ids) > budget and kept:
            kept.pop(0)
            input_ids = self._ids(query, kept)
        if len(input_ids) <= budget:
            return Prompt(input_ids, history_turns=len(kept), turns_dropped=len(history) - len(kept))
        if limit is not None:
            raise InputError(
                f"the prompt without earlier turns (system prompt, {self.num_image_tokens} image tokens and "
                f"the query) takes {len(input_ids)} tokens, over the {budget}-token budget (max_prompt_tokens "
                f"{limit}; the {self.max_length}-token context less max_new_tokens {max_new_tokens} leaves "
                f"{context_budget}): shorten the query or raise max_prompt_tokens"
            )
        query_ids = self.tokenizer(query, add_special_tokens=False).input_ids
        keep = len(query_ids) - (len(input_ids) - budget)
        while keep >= 1:  # re-tokenising the decoded prefix can take a token more: step down until it fits
            truncated = self.tokenizer.decode(query_ids[:keep], skip_special_tokens=False).strip()
            input_ids = self._ids(truncated, kept)
            if len(input_ids) <= budget:
                warnings.warn(
                    f"query truncated from {len(query_ids)} to {keep} tokens to fit the {self.max_length}-token "
                    "context window",
                    stacklevel=3,
                )
                return Prompt(input_ids, history_turns=0, turns_dropped=len(history))
            keep -= 1
        raise InputError(
            f"the prompt without the query already fills the {budget} tokens left after max_new_tokens: "
            "lower max_new_tokens"
        )
