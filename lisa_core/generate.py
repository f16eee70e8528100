"""Greedy generation that also returns, for every [SEG], the hidden state that predicted it.

Two modes give the same tokens and [SEG] states:

- "cached" (default): one prefill pass fills a KV cache, then one single-token pass per new token. The
  last-layer, final-norm state of the step that emits [SEG] *is* the state that predicts it, so the
  [SEG] embeddings come for free, with no second forward pass.
- "reference": the official LISA method. No cache; every step re-runs the whole sequence, and the
  [SEG] embeddings are read from the final full pass at the positions just before each [SEG].

A `KVDecoder` holds the cache: dynamic, or static (preallocated, reused across queries) with an optional
torch.compile'd decoding step, which is what makes single-token steps fast on a GPU. `generate_batch`
decodes several prompts (e.g. several queries on one frame) together on one dynamic cache.

Streaming: an `on_token` callback sees the output ids after every new token (plain Python between two
decoding steps, compiled or not) and returning True stops before the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from transformers import DynamicCache, StaticCache

from lisa_core.errors import GenerationCancelled
from lisa_core.model import LisaModel

# (generated ids so far, next-token logits (vocab,)) -> logits to take the argmax of.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
# (output ids so far) -> True to stop. The list is the generator's own: copy it to keep it.
TokenCallback = Callable[[list[int]], bool]
# (row index, that row's output ids so far) -> True to finish that row now.
BatchTokenCallback = Callable[[int, list[int]], bool]

GENERATION_MODES = ("cached", "reference")
CACHE_IMPLEMENTATIONS = ("dynamic", "static")


@dataclass
class GenerationOutput:
    output_ids: list[int]  # new tokens, EOS included when it was produced
    seg_hidden_states: torch.Tensor  # (num [SEG], hidden): the states that predicted each [SEG]
    timings: dict[str, float] = field(default_factory=dict)  # "prefill", "decode" (seconds)
    cancelled: bool = False  # generate_batch: this row's on_token callback finished it early


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next_token(logits: torch.Tensor, output_ids: list[int], logits_processor: Optional[LogitsProcessor]) -> int:
    logits = logits.float()
    if logits_processor is not None:
        logits = logits_processor(output_ids, logits)
    return int(torch.argmax(logits).item())


class KVDecoder:
    """Prefill and single-token decoding steps on a KV cache, for the "cached" mode.

    "dynamic": a fresh DynamicCache per query (grows as tokens come).
    "static": a preallocated StaticCache per length bucket, reused by every query (fixed shapes and
    addresses). That is what `compile=True` needs: the decoding step is then torch.compile'd with
    mode="reduce-overhead", i.e. replayed as a CUDA graph on a GPU, which removes the per-kernel launch
    cost that dominates single-token steps of a 7B model. Each new bucket costs one compilation.
    """

    def __init__(
        self, model: LisaModel, cache_implementation: str = "dynamic", compile: bool = False, bucket: int = 256
    ) -> None:
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}"
            )
        if compile and cache_implementation != "static":
            raise ValueError("compile=True needs cache_implementation='static' (fixed shapes)")
        self.model = model
        self.cache_implementation = cache_implementation
        self.bucket = bucket
        self._static_caches: dict[int, StaticCache] = {}
        self._step = torch.compile(self._eager_step, mode="reduce-overhead", fullgraph=True) if compile else self._eager_step

    def new_cache(self, length: int):
        """An empty cache for `length` positions (prompt plus new tokens)."""
        llama_config = self.model.language_model.config
        if self.cache_implementation == "dynamic":
            return DynamicCache(config=llama_config)
        size = -(-length // self.bucket) * self.bucket
        cache = self._static_caches.get(size)
        if cache is None:
            cache = self._static_caches[size] = StaticCache(config=llama_config, max_cache_len=size)
        cache.reset()
        return cache

    def prefill(self, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
        """Last-position hidden state (1, hidden) after running the prompt into `cache`."""
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        return self.model.language_forward(inputs_embeds, cache=cache, position_ids=positions)[:, -1]

    def step(self, token: int, position: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (1, hidden), logits (1, vocab)) for one new token at `position`.

        The returned tensors may be overwritten by the next step (CUDA graph outputs): copy to keep.
        """
        device = self.model.mm_projector.weight.device
        token_ids = torch.tensor([[token]], device=device)
        position_ids = torch.tensor([[position]], device=device)
        return self._step(token_ids, position_ids, cache)

    def _eager_step(self, token_ids: torch.Tensor, position_ids: torch.Tensor, cache):
        token_embeds = self.model.embed_tokens(token_ids)
        hidden = self.model.language_forward(token_embeds, cache=cache, position_ids=position_ids)[:, -1]
        return hidden, self.model.lm_logits(hidden)


@torch.no_grad()
def generate(
    model: LisaModel,
    inputs_embeds: torch.Tensor,
    *,
    seg_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    mode: str = "cached",
    decoder: Optional[KVDecoder] = None,
    logits_processor: Optional[LogitsProcessor] = None,
    on_token: Optional[TokenCallback] = None,
) -> GenerationOutput:
    """Greedy decoding for one prompt, `inputs_embeds` (1, L, hidden) with the image spliced in.

    `decoder` (cached mode): reuse one KVDecoder across calls to keep its static caches and compiled
    step; by default a dynamic-cache decoder is made for this call.
    `on_token`: called after every new token; when it returns True, GenerationCancelled is raised
    with the number of tokens generated so far, before the next decoding step.
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"generation mode must be one of {GENERATION_MODES}, got {mode!r}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds must be (1, L, hidden), got {tuple(inputs_embeds.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if mode == "cached":
        return _generate_cached(
            decoder or KVDecoder(model), inputs_embeds, seg_token_id, eos_token_id, max_new_tokens, logits_processor,
            on_token,
        )
    return _generate_reference(
        model, inputs_embeds, seg_token_id, eos_token_id, max_new_tokens, logits_processor, on_token
    )


def _check_cancel(on_token: Optional[TokenCallback], output_ids: list[int]) -> None:
    if on_token is not None and on_token(output_ids):
        raise GenerationCancelled(len(output_ids))


def _generate_cached(
    decoder: KVDecoder,
    inputs_embeds: torch.Tensor,
    seg_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    logits_processor: Optional[LogitsProcessor],
    on_token: Optional[TokenCallback],
) -> GenerationOutput:
    device = inputs_embeds.device
    prompt_length = inputs_embeds.shape[1]
    cache = decoder.new_cache(prompt_length + max_new_tokens)

    start = time.perf_counter()
    last_hidden = decoder.prefill(inputs_embeds, cache)
    output_ids: list[int] = []
    seg_states: list[torch.Tensor] = []
    token = _next_token(decoder.model.lm_logits(last_hidden)[0], output_ids, logits_processor)
    _synchronize(device)
    prefill_done = time.perf_counter()

    while True:
        output_ids.append(token)
        if token == seg_token_id:
            seg_states.append(last_hidden[0].clone())
        _check_cancel(on_token, output_ids)
        if token == eos_token_id or len(output_ids) == max_new_tokens:
            break
        last_hidden, logits = decoder.step(token, prompt_length + len(output_ids) - 1, cache)
        token = _next_token(logits[0], output_ids, logits_processor)
    _synchronize(device)
    end = time.perf_counter()
    return GenerationOutput(
        output_ids=output_ids,
        seg_hidden_states=_stack(seg_states, inputs_embeds),
        timings={"prefill": prefill_done - start, "decode": end - prefill_done},
    )


def _generate_reference(
    model: LisaModel,
    inputs_embeds: torch.Tensor,
    seg_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    logits_processor: Optional[LogitsProcessor],
    on_token: Optional[TokenCallback],
) -> GenerationOutput:
    device = inputs_embeds.device
    prompt_length = inputs_embeds.shape[1]
    start = time.perf_counter()
    output_ids: list[int] = []
    sequence = inputs_embeds
    prefill_done = None
    while True:
        hidden = model.language_forward(sequence)
        token = _next_token(model.lm_logits(hidden[:, -1])[0], output_ids, logits_processor)
        if prefill_done is None:
            _synchronize(device)
            prefill_done = time.perf_counter()
        output_ids.append(token)
        _check_cancel(on_token, output_ids)
        if token == eos_token_id or len(output_ids) == max_new_tokens:
            break
        token_embeds = model.embed_tokens(torch.tensor([[token]], device=device))
        sequence = torch.cat([sequence, token_embeds.to(sequence.dtype)], dim=1)
    # `hidden` is the final full pass: it covers every position before the last new token.
    seg_positions = [prompt_length + index - 1 for index, token in enumerate(output_ids) if token == seg_token_id]
    seg_states = [hidden[0, position] for position in seg_positions]
    _synchronize(device)
    end = time.perf_counter()
    return GenerationOutput(
        output_ids=output_ids,
        seg_hidden_states=_stack(seg_states, inputs_embeds),
        timings={"prefill": prefill_done - start, "decode": end - prefill_done},
    )


def _stack(states: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if states:
        return torch.stack(states)
    return like.new_zeros((0, like.shape[-1]))


@torch.no_grad()
def generate_batch(
    model: LisaModel,
    prompts_embeds: list[torch.Tensor],
    *,
    seg_token_id: int,
    eos_token_id: int,
    max_new_tokens: Union[int, Sequence[int]],
    logits_processor: Optional[LogitsProcessor] = None,
    on_token: Optional[BatchTokenCallback] = None,
) -> list[GenerationOutput]:
    """Greedy KV-cached decoding of several prompts together, one (1, L_i, hidden) tensor each.

    The prompts are left-padded into one batch with an attention mask and per-row positions, so each
    row computes what it would alone (up to float rounding); a row that has finished keeps being fed
    EOS, masked out of nothing and ignored. Each output's timings are the whole batch's.
    `max_new_tokens`: one limit for every row, or one per prompt. `on_token(row, ids)` is called after
    every new token of a row; returning True finishes that row there, marked `cancelled`, and the
    other rows go on.
    """
    if not prompts_embeds:
        return []
    batch = len(prompts_embeds)
    if isinstance(max_new_tokens, Sequence):
        limits = [int(limit) for limit in max_new_tokens]
    else:
        limits = [int(max_new_tokens)] * batch
    if len(limits) != batch:
        raise ValueError(f"max_new_tokens has {len(limits)} limits for {batch} prompts")
    if min(limits) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {min(limits)}")
    first = prompts_embeds[0]
    device = first.device
    longest = max(embeds.shape[1] for embeds in prompts_embeds)
    inputs_embeds = first.new_zeros((batch, longest, first.shape[-1]))
    attention_mask = torch.zeros((batch, longest), dtype=torch.long, device=device)
    for row, embeds in enumerate(prompts_embeds):
        if embeds.dim() != 3 or embeds.shape[0] != 1:
            raise ValueError(f"each prompt must be (1, L, hidden), got {tuple(embeds.shape)}")
        inputs_embeds[row, longest - embeds.shape[1]:] = embeds[0]
        attention_mask[row, longest - embeds.shape[1]:] = 1
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.language_model.config)

    start = time.perf_counter()
    hidden = model.language_forward(
        inputs_embeds, cache=cache, position_ids=positions, attention_mask=attention_mask
    )[:, -1]
    logits = model.lm_logits(hidden)
    output_ids: list[list[int]] = [[] for _ in range(batch)]
    seg_states: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finished = [False] * batch
    cancelled = [False] * batch
    next_tokens = [_next_token(logits[row], output_ids[row], logits_processor) for row in range(batch)]
    _synchronize(device)
    prefill_done = time.perf_counter()

    next_positions = positions[:, -1:] + 1
    while True:
        for row, token in enumerate(next_tokens):
            if finished[row]:
                continue
            output_ids[row].append(token)
            if token == seg_token_id:
                seg_states[row].append(hidden[row].clone())
            cancelled[row] = on_token is not None and bool(on_token(row, output_ids[row]))
            finished[row] = cancelled[row] or token == eos_token_id or len(output_ids[row]) == limits[row]
        if all(finished):
            break
        step_ids = torch.tensor([[eos_token_id if done else token] for token, done in zip(next_tokens, finished)],
                                device=device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        hidden = model.language_forward(
            model.embed_tokens(step_ids), cache=cache, position_ids=next_positions, attention_mask=attention_mask
        )[:, -1]
        next_positions = next_positions + 1
        logits = model.lm_logits(hidden)
        next_tokens = [
            eos_token_id if finished[row] else _next_token(logits[row], output_ids[row], logits_processor)
            for row in range(batch)
        ]
    _synchronize(device)
    timings = {"prefill": prefill_done - start, "decode": time.perf_counter() - prefill_done}
    return [
        GenerationOutput(
            output_ids=ids, seg_hidden_states=_stack(states, first), timings=dict(timings), cancelled=stopped
        )
        for ids, states, stopped in zip(output_ids, seg_states, cancelled)
    ]
