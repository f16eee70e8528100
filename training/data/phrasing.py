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
"""

from __future__ import annotations

import re
from typing import Mapping

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


def noun_phrase(adjective: str, head: str, noun: str = CANONICAL_NOUN) -> str:
    """ "red shape" (no head: the generic noun), "blue triangle", "triangle" (no adjective)."""
    return " ".join(word for word in (adjective, head or noun) if word)


def plural_noun_phrase(adjective: str, head: str, nouns: str) -> str:
    return " ".join(word for word in (adjective, head + "s" if head else nouns) if word)


def render(form: str, slots: Mapping[str, str], phrasing: str, rng: np.random.Generator) -> str:
    """The query in one template of `phrasing` (TRAINED or HELD_OUT), with a generic noun drawn from it."""
    if phrasing not in TEMPLATES:
        raise InputError(f"phrasing must be one of {sorted(TEMPLATES)}, got {phrasing!r}")
    if form not in FORMS:
        raise InputError(f"form must be one of {FORMS}, got {form!r}")
    templates = TEMPLATES[phrasing][form]
    template = templates[int(rng.integers(len(templates)))]
    nouns = NOUNS[phrasing]
    noun = list(nouns)[int(rng.integers(len(nouns)))]
    values = {"noun": noun, "nouns": nouns[noun]}
    if form == PHRASE:
        values["np"] = noun_phrase(slots["adjective"], slots["head"], noun)
    elif form in (PREDICATE, PLURAL_PREDICATE):
        values.update(pred=slots["pred"], preds=slots["preds"])
    elif form == RELATION:
        values.update(rel=slots["relation"], ref=noun_phrase(slots["ref_adjective"], slots["ref_head"], noun))
    else:
        values.update(nps=plural_noun_phrase(slots["adjective"], slots["head"], nouns[noun]), all=slots["all"])
    return template.format(**values)


def corpus() -> list[str]:
    """The TRAINED templates and nouns (slots left out), for the tokenizer; never the held-out ones."""
    texts = [" ".join(re.sub(r"\{\w+\}", " ", template).split())
             for templates in TEMPLATES[TRAINED].values() for template in templates]
    return texts + [" ".join(f"{noun} {plural}" for noun, plural in NOUNS[TRAINED].items())]
