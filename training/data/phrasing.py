"""How a user might word a synthetic-benchmark query: many templates per query form, synonyms for the
generic noun, and a held-out set never used in training.

A query is one of five forms, each with its slots (training.data.synthetic builds them):
- PHRASE: a noun phrase, `adjective` plus a specific `head` ("blue triangle") or the generic noun
  ("red shape", "largest shape");
- PREDICATE: something exactly one object does or has ("would roll", "has the colour of grass");
- RELATION: the object `relation` ("left of") a reference noun phrase (`ref_adjective`, `ref_head`);
- PLURAL_PREDICATE: several objects that share a predicate ("Which shapes would roll?");
- ALL_OF: every object of a plural noun phrase ("Find both triangles.", "Find all the red shapes.").

Phrasings:
- OFFICIAL: the benchmark's canonical query text inside LISA's own question templates (what the
  benchmark asked before it had phrasings; the official evaluation question is one of these);
- TRAINED: templates for commands, questions, polite forms and bare noun phrases, with the generic
  noun "shape", "object", "thing" or "one";
- HELD_OUT: other templates and the generic nouns "item" and "piece", for the test split only: no
  training sample and no tokenizer corpus sees them. The colour, shape, size, relation and knowledge
  words stay those of training: a model trained from random weights cannot know a word it never saw.

Unknown words: a model trained from random weights has never seen a word outside its training text,
so a user's own word (a held-out one among them) reaches it as pieces it never learned to read.
`render(..., unknown_words=k)` makes up to k edits with made-up words (`pseudo_word`: syllables that are
no word of the vocabulary and hold no held-out word): the generic noun becomes one, a template word is
replaced by one, or one is inserted. A question edited like that still means the same query, which
teaches the model to read past the words it does not know.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from lisa_core.errors import InputError

PHRASE, PREDICATE, RELATION, PLURAL_PREDICATE, ALL_OF = "phrase", "predicate", "relation", "plural_predicate", "all_of"
FORMS = (PHRASE, PREDICATE, RELATION, PLURAL_PREDICATE, ALL_OF)
OFFICIAL, TRAINED, HELD_OUT = "official", "trained", "held_out"
PHRASINGS = (OFFICIAL, TRAINED, HELD_OUT)
CANONICAL_NOUN = "shape"

# generic noun -> its plural
NOUNS = {
    TRAINED: {"shape": "shapes", "object": "objects", "thing": "things", "one": "ones"},
    HELD_OUT: {"item": "items", "piece": "pieces"},
}

# Slots: {np} noun phrase, {noun}/{nouns} the generic noun, {pred}/{preds} singular/plural predicate,
# {rel} relation, {ref} the reference noun phrase, {nps} plural noun phrase, {all} "both" or "all the".
TEMPLATES = {
    TRAINED: {
        PHRASE: (
            "{np}", "the {np}", "The {np}.", "Where is the {np}?", "Pick up the {np}.", "Show me the {np}.",
            "Please find the {np}.", "Could you point to the {np}?", "Grab the {np}, please.", "Find the {np}.",
            "I am looking for the {np}.", "Segment the {np}.", "Can you segment the {np} in this image?",
            "Please segment the {np} in this image.",
        ),
        PREDICATE: (
            "Which {noun} {pred}?", "What {pred}?", "Find the {noun} that {pred}.",
            "Pick up the {noun} that {pred}.", "Show me the {noun} that {pred}.",
            "Please point to the {noun} that {pred}.", "the {noun} that {pred}", "Which {noun} here {pred}?",
            "Grab the {noun} that {pred}, please.", "Where is the {noun} that {pred}?",
        ),
        RELATION: (
            "Which {noun} is {rel} the {ref}?", "Find the {noun} {rel} the {ref}.",
            "Pick up the {noun} {rel} the {ref}.", "What is {rel} the {ref}?",
            "Show me the {noun} that is {rel} the {ref}.", "the {noun} {rel} the {ref}",
            "Please find the {noun} that is {rel} the {ref}.", "Where is the {noun} {rel} the {ref}?",
        ),
        PLURAL_PREDICATE: (
            "Which {nouns} {preds}?", "Find all the {nouns} that {preds}.", "Show me the {nouns} that {preds}.",
            "Pick up every {noun} that {pred}.", "Please find the {nouns} that {preds}.",
            "the {nouns} that {preds}",
        ),
        ALL_OF: (
            "Find {all} {nps}.", "Pick up {all} {nps}.", "Where are the {nps}?", "Show me {all} {nps}.",
            "Please segment {all} {nps}.", "the {nps}", "Grab {all} {nps}, please.",
        ),
    },
    HELD_OUT: {
        PHRASE: (
            "Can you hand me the {np}?", "Which one is the {np}?", "Highlight the {np}, please.",
            "Would you mark the {np}?", "Locate the {np}.", "I need the {np}.",
        ),
        PREDICATE: (
            "Can you find whatever {pred}?", "I need the {noun} that {pred}.",
            "Hand me the {noun} which {pred}, please.", "Locate the {noun} which {pred}.",
        ),
        RELATION: (
            "Can you grab the {noun} {rel} the {ref}?", "I need the {noun} that sits {rel} the {ref}.",
            "Locate the {noun} positioned {rel} the {ref}.", "Highlight whatever is {rel} the {ref}.",
        ),
        PLURAL_PREDICATE: (
            "Hand me all the {nouns} which {preds}.", "Highlight every {noun} which {pred}.",
            "Locate the {nouns} which {preds}, please.",
        ),
        ALL_OF: (
            "Hand me {all} {nps}, please.", "Can you mark {all} {nps}?", "Locate {all} {nps}.",
            "I need {all} {nps}.",
        ),
    },
}


TEMPLATE_WORD = re.compile(r"([A-Za-z]+)([,.?]?)")
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def words(texts) -> set[str]:
    """The lowercase words of `texts`, template slots ({np}, ...) left out."""
    return {word.lower() for text in texts for word in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", text))}


def _phrasing_words(name: str) -> set[str]:
    return words(t for forms in TEMPLATES[name].values() for t in forms) | words(
        word for pair in NOUNS[name].items() for word in pair)


TEMPLATE_WORDS = frozenset(_phrasing_words(TRAINED) | _phrasing_words(HELD_OUT))
HELD_OUT_WORDS = frozenset(_phrasing_words(HELD_OUT) - _phrasing_words(TRAINED))


def pseudo_word(rng: np.random.Generator, vocabulary: frozenset[str] = frozenset()) -> str:
    """A made-up lowercase word of 1-3 syllables: never a template word or a word of `vocabulary`, and
    never holding a held-out word ("kitem" is refused), so training never spells a held-out word."""
    while True:
        syllables = int(rng.integers(1, 4))
        word = "".join(CONSONANTS[int(rng.integers(len(CONSONANTS)))] + VOWELS[int(rng.integers(len(VOWELS)))]
                       for _ in range(syllables))
        if rng.random() < 0.5:
            word += CONSONANTS[int(rng.integers(len(CONSONANTS)))]
        if (len(word) >= 3 and word not in TEMPLATE_WORDS and word not in vocabulary
                and not any(held_out in word for held_out in HELD_OUT_WORDS)):
            return word


def _with_made_up_words(template: str, edits: int, rng: np.random.Generator,
                        vocabulary: frozenset[str]) -> tuple[str, Optional[str]]:
    """`template` after `edits` edits (replace a template word, insert a word, or make up the generic
    noun), and the made-up noun (None when the noun stays)."""
    chunks = template.split(" ")
    noun = None
    for _ in range(edits):
        edit = int(rng.integers(3))
        plain = [i for i, chunk in enumerate(chunks) if TEMPLATE_WORD.fullmatch(chunk)]
        if edit == 0 and plain:
            index = plain[int(rng.integers(len(plain)))]
            word, punctuation = TEMPLATE_WORD.fullmatch(chunks[index]).groups()
            made_up = pseudo_word(rng, vocabulary)
            chunks[index] = (made_up.capitalize() if word[0].isupper() else made_up) + punctuation
        elif edit == 1:
            index = int(rng.integers(len(chunks)))  # before chunk `index`: never after the closing punctuation
            made_up = pseudo_word(rng, vocabulary)
            if index == 0 and chunks[0][0].isupper():
                made_up, chunks[0] = made_up.capitalize(), chunks[0][0].lower() + chunks[0][1:]
            chunks.insert(index, made_up)
        else:
            noun = pseudo_word(rng, vocabulary)
    return " ".join(chunks), noun


def noun_phrase(adjective: str, head: str, noun: str = CANONICAL_NOUN) -> str:
    """ "red shape" (no head: the generic noun), "blue triangle", "triangle" (no adjective)."""
    return " ".join(word for word in (adjective, head or noun) if word)


def plural_noun_phrase(adjective: str, head: str, nouns: str) -> str:
    return " ".join(word for word in (adjective, head + "s" if head else nouns) if word)


def render(form: str, slots: Mapping[str, str], phrasing: str, rng: np.random.Generator,
           unknown_words: int = 0, vocabulary: frozenset[str] = frozenset()) -> str:
    """The query in one template of `phrasing` (TRAINED or HELD_OUT), with a generic noun drawn from it,
    and `unknown_words` edits with made-up words that are not in `vocabulary` (the module doc says why)."""
    if phrasing not in TEMPLATES:
        raise InputError(f"phrasing must be one of {sorted(TEMPLATES)}, got {phrasing!r}")
    if form not in FORMS:
        raise InputError(f"form must be one of {FORMS}, got {form!r}")
    templates = TEMPLATES[phrasing][form]
    template = templates[int(rng.integers(len(templates)))]
    nouns = NOUNS[phrasing]
    noun = list(nouns)[int(rng.integers(len(nouns)))]
    plural_noun = nouns[noun]
    if unknown_words:
        template, made_up_noun = _with_made_up_words(template, unknown_words, rng, vocabulary)
        if made_up_noun is not None:
            noun, plural_noun = made_up_noun, made_up_noun + "s"
    values = {"noun": noun, "nouns": plural_noun}
    if form == PHRASE:
        values["np"] = noun_phrase(slots["adjective"], slots["head"], noun)
    elif form in (PREDICATE, PLURAL_PREDICATE):
        values.update(pred=slots["pred"], preds=slots["preds"])
    elif form == RELATION:
        values.update(rel=slots["relation"], ref=noun_phrase(slots["ref_adjective"], slots["ref_head"], noun))
    else:
        values.update(nps=plural_noun_phrase(slots["adjective"], slots["head"], plural_noun), all=slots["all"])
    return template.format(**values)


def corpus() -> list[str]:
    """The TRAINED templates and nouns (slots left out), for the tokenizer; never the held-out ones."""
    texts = [" ".join(re.sub(r"\{\w+\}", " ", template).split())
             for templates in TEMPLATES[TRAINED].values() for template in templates]
    return texts + [" ".join(f"{noun} {plural}" for noun, plural in NOUNS[TRAINED].items())]
