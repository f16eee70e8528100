"""A tiny, randomly initialised LISA with a locally trained tokenizer, for tests and demos.

The model is UNTRAINED: its answers are arbitrary token strings and it rarely emits [SEG]. It has the
real architecture (Llama, CLIP with 256 patch tokens, SAM, [SEG] projection) at toy sizes, so every
code path (checkpoints, generation, SAM decoding, the ROS node) runs on a CPU in well under a second.
`training/` turns it into a model that actually segments.

With `answer="Sure, [SEG]."` the weights are edited so that the model always gives that answer (see
`script_answer`): a deterministic stand-in for tests and demos that need [SEG] and masks. Its masks
still come from random SAM weights, so they are arbitrary shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lisa_core.config import LISA_ADDED_TOKENS, LisaConfig
from lisa_core.model import LisaModel
from lisa_core.prompt import SYSTEM_PROMPT

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama
TINY_BPE_VOCAB = 400

BASE_CORPUS = (
    SYSTEM_PROMPT,
    "USER: ASSISTANT:",
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
    "Please output segmentation mask.",
    "It is [SEG]. Sure, [SEG]. Sure, it is [SEG]. Sure, the segmentation result is [SEG].",
    "I want to cut this paper. Where can I sit down? Which object can hold water? What should I use?",
    "the a an of in on to and or is are it this that with for as at by from which what where who why how",
    "cup bottle chair table person dog cat car door window knife scissors paper book phone laptop bowl",
    "red green blue yellow black white left right top bottom near far small large object thing one two",
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - _ / \n",
)
# The frame opens every conversation. Weighted by that, the BPE learns its words whole; seen once, it
# spelled them in pieces, 70 of the 170 text-and-image tokens of a demo training row.
CONVERSATION_FRAME = SYSTEM_PROMPT + " USER: ASSISTANT:"
CONVERSATION_FRAME_WEIGHT = 20


def without_added_tokens(text: str) -> str:
    """`text` with LISA's added tokens blanked out. A BPE that sees "[SEG]" spelled in its corpus learns
    pieces for it beside the added token, and a small model then writes those pieces ("orange[SEG]")."""
    for token in LISA_ADDED_TOKENS:
        text = text.replace(token, " ")
    return text


def build_tiny_tokenizer(extra_corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A small Llama-like BPE tokenizer (<unk>=0, <s>=1, </s>=2; BOS added) with LISA's added tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:;'\"()-_/[]<>\n"),
        show_progress=False,
    )
    texts = [CONVERSATION_FRAME] * CONVERSATION_FRAME_WEIGHT + list(BASE_CORPUS) + list(extra_corpus)
    tokenizer.train_from_iterator([without_added_tokens(text) for text in texts], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        model_max_length=1024,
    )
    wrapped.add_tokens(list(LISA_ADDED_TOKENS), special_tokens=True)
    return wrapped


def build_tiny_model(tokenizer, seed: int = 0) -> LisaModel:
    """A random LisaModel at LisaConfig.tiny() sizes whose vocabulary matches `tokenizer`."""
    config = LisaConfig.tiny(vocab_size=len(tokenizer))
    config.language_model.bos_token_id = tokenizer.bos_token_id
    config.language_model.eos_token_id = tokenizer.eos_token_id
    config.language_model.pad_token_id = tokenizer.pad_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LisaModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


@torch.no_grad()
def script_answer(model: LisaModel, tokenizer, answer: str) -> None:
    """Edit `model` in place so that greedy decoding answers `answer` (then EOS) to every prompt.

    The attention and MLP outputs of every layer are zeroed, so the final hidden state at a position
    is the normalised embedding of the token there; each lm_head row of a token that must follow token
    t then gets a large component along t's state. The answer's tokens must all differ (a token cannot
    have two successors). The [SEG] state is therefore fixed; SAM still sees each image.
    """
    from lisa_core.prompt import build_prompt, tokenize_with_image

    prompt_ids = tokenize_with_image(tokenizer, build_prompt("any question"), model.config.num_image_tokens)
    sequence = [prompt_ids[-1]] + tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    currents = sequence[:-1]
    if len(set(currents)) != len(currents):
        raise ValueError(f"answer {answer!r} repeats a token; a scripted answer needs distinct tokens")
    body = model.language_model.model
    for layer in body.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    lm_head = model.language_model.lm_head.weight
    for current, following in zip(currents, sequence[1:]):
        state = body.norm(body.embed_tokens.weight[current])
        lm_head[following] += 50.0 * state / state.norm() ** 2


def save_tiny_checkpoint(
    path: Union[str, Path], seed: int = 0, extra_corpus: Iterable[str] = (), answer: Optional[str] = None
) -> Path:
    """Write an untrained tiny LISA in our format (config, model.safetensors, tokenizer) to `path`.

    `extra_corpus`: more text for the tokenizer to learn, e.g. the queries of a training set.
    `answer`: make the model always give this answer (script_answer), e.g. "Sure, [SEG].".
    """
    from lisa_core.checkpoint import save_pretrained

    tokenizer = build_tiny_tokenizer(extra_corpus)
    model = build_tiny_model(tokenizer, seed=seed)
    if answer is not None:
        script_answer(model, tokenizer, answer)
    return save_pretrained(model, tokenizer, path)
