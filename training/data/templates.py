"""LISA's question and answer templates and the conversation-building rules of its training data.

The template texts are the official ones (LISA utils/utils.py) without the "<image>\\n" prefix: our
questions carry no image placeholder (see Sample). Rules, as in the official readers:
- up to 3 queries are sampled per image without replacement, one single-turn conversation each;
- short queries (class names, referring phrases) use SHORT_QUESTION_TEMPLATES with the lower-cased
  phrase, sentences use LONG_QUESTION_TEMPLATES;
- answers are drawn from ANSWER_TEMPLATES;
- for images with an explanation (ReasonSeg's explanatory/train.json), one mode is drawn per image:
  with probability `explanatory_rate` (0.1) the answer is the explanation alone with no [SEG] and no
  mask ("text_only"); otherwise, with equal odds, a plain [SEG] answer ("plain") or a [SEG] answer
  followed by the explanation with an explanatory question ("explained"). The last two modes ask the
  bare query, without a template, as the official code does.
- evaluation (the official validation protocol) asks one fixed question and answers "[SEG].".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SHORT_QUESTION_TEMPLATES = (
    "Can you segment the {name} in this image?",
    "Please segment the {name} in this image.",
    "What is {name} in this image? Please respond with segmentation mask.",
    "What is {name} in this image? Please output segmentation mask.",
)

LONG_QUESTION_TEMPLATES = (
    "{sentence} Please respond with segmentation mask.",
    "{sentence} Please output segmentation mask.",
)

EXPLANATORY_QUESTION_SUFFIXES = (
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
)

ANSWER_TEMPLATES = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)

EVAL_SHORT_QUESTION = "What is {name} in this image? Please output segmentation mask."
EVAL_LONG_QUESTION = "{sentence} Please output segmentation mask."
EVAL_ANSWER = "[SEG]."

QUERIES_PER_IMAGE = 3
EXPLANATORY_RATE = 0.1

PLAIN, EXPLAINED, TEXT_ONLY = "plain", "explained", "text_only"


def choose(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def sample_query_indices(count: int, rng: np.random.Generator, limit: int = QUERIES_PER_IMAGE) -> list[int]:
    """Indices of up to `limit` of `count` queries, drawn without replacement."""
    if count <= limit:
        return list(range(count))
    return [int(i) for i in rng.choice(count, size=limit, replace=False)]


def segmentation_question(query: str, is_sentence: bool, rng: np.random.Generator) -> str:
    if is_sentence:
        return choose(LONG_QUESTION_TEMPLATES, rng).format(sentence=query)
    return choose(SHORT_QUESTION_TEMPLATES, rng).format(name=query.lower())


def segmentation_answer(rng: np.random.Generator) -> str:
    return choose(ANSWER_TEMPLATES, rng)


def eval_question(query: str, is_sentence: bool) -> str:
    query = query.strip()
    return EVAL_LONG_QUESTION.format(sentence=query) if is_sentence else EVAL_SHORT_QUESTION.format(name=query)


def draw_explanatory_mode(rng: np.random.Generator, explanatory_rate: float = EXPLANATORY_RATE) -> str:
    """One mode per image that has an explanation: TEXT_ONLY with `explanatory_rate`, else PLAIN or EXPLAINED."""
    if rng.random() < explanatory_rate:
        return TEXT_ONLY
    return (PLAIN, EXPLAINED)[int(rng.integers(2))]


def segmentation_turn(
    query: str,
    is_sentence: bool,
    rng: np.random.Generator,
    mode: str = PLAIN,
    explanation: str = "",
) -> tuple[tuple[str, str], bool]:
    """One (question, answer) turn for one query, and whether its answer holds a [SEG]."""
    if mode == PLAIN:
        return (segmentation_question(query, is_sentence, rng), segmentation_answer(rng)), True
    if mode == EXPLAINED:
        question = f"{query} {choose(EXPLANATORY_QUESTION_SUFFIXES, rng)}"
        return (question, f"{segmentation_answer(rng)} {explanation}"), True
    if mode == TEXT_ONLY:
        return (query, explanation), False
    raise ValueError(f"unknown explanatory mode {mode!r}; expected {PLAIN!r}, {EXPLAINED!r} or {TEXT_ONLY!r}")


def template_corpus() -> list[str]:
    """Every template text with its placeholder left out, for building a tokenizer's vocabulary."""
    texts = [
        *SHORT_QUESTION_TEMPLATES,
        *LONG_QUESTION_TEMPLATES,
        *EXPLANATORY_QUESTION_SUFFIXES,
        *ANSWER_TEMPLATES,
        EVAL_SHORT_QUESTION,
        EVAL_LONG_QUESTION,
        EVAL_ANSWER,
    ]
    return [" ".join(text.format(name="", sentence="").split()) for text in texts]
