"""Phrasings, frames of several aspect ratios and well-formed answers of the synthetic benchmark."""

import hashlib
import re

import numpy as np
import pytest

from lisa_core.config import SEG_TOKEN
from lisa_core.errors import InputError
from lisa_core.tiny import build_tiny_tokenizer
from training.data import phrasing, templates
from training.data.synthetic import (
    ABSENT_ANSWER,
    ASPECT_RATIOS,
    COLOURS,
    MAX_UNKNOWN_WORDS,
    SHAPES,
    SyntheticReasonSeg,
    corpus,
    explanations,
    is_well_formed,
    vocabulary,
)

WORD = re.compile(r"[A-Za-z]+")


def words(texts):
    return {word.lower() for text in texts for word in WORD.findall(text)}


def template_words(phrasing_name):
    return words(t for forms in phrasing.TEMPLATES[phrasing_name].values() for t in forms) | words(
        n for pair in phrasing.NOUNS[phrasing_name].items() for n in pair
    )


# words of the held-out templates that neither the trained templates, LISA's, nor the answers use
HELD_OUT_ONLY = template_words(phrasing.HELD_OUT) - template_words(phrasing.TRAINED) - words(
    templates.template_corpus()
) - words(explanations()) - {"np", "noun", "nouns", "pred", "preds", "rel", "ref", "nps", "all"}


def training_questions(count=300, **options):
    dataset = SyntheticReasonSeg("train", seed=1, answers="explained", official_rate=0.4, **options)
    rng = np.random.default_rng(0)
    return [question for index in range(count) for conversation in dataset.get(index, rng).conversations
            for question, _ in conversation]


def test_the_default_splits_are_those_first_shipped():
    """Square 128 px scenes asked the official question: the demo's first test split, unchanged."""
    expected = {"val": "31322635f40acc500dc1e3af9677e9e731988e68e6c8c778bea3ce8e32e76987",
                "test": "dfdc9a29f798ff7033e2708e238c5ff40f7cca0b6abf7a38f9834ec2c760b553"}
    for split, digest in expected.items():
        dataset = SyntheticReasonSeg(split)
        h = hashlib.sha256()
        for index in range(len(dataset)):
            sample = dataset.eval_sample(index)
            h.update(sample.image.tobytes())
            h.update(sample.conversations[0][0][0].encode())
            h.update(sample.conversations[0][0][1].encode())
            for mask in sample.masks:
                h.update(mask.tobytes())
        assert h.hexdigest() == digest, split


def test_held_out_phrasings_never_reach_training_or_the_tokenizer():
    assert {"item", "piece", "hand", "locate", "highlight", "whatever"} <= HELD_OUT_ONLY
    questions = training_questions(aspect_ratios=tuple(ASPECT_RATIOS))
    assert words(questions) & HELD_OUT_ONLY == set()
    assert words(training_questions(unknown_word_rate=0.5)) & HELD_OUT_ONLY == set()
    assert words(corpus()) & HELD_OUT_ONLY == set()
    phrased = [q for q in questions if "segmentation mask" not in q and "in this image" not in q]
    assert 0.45 < len(phrased) / len(questions) < 0.75  # official_rate 0.4: LISA's templates 40% of the time
    official_only = SyntheticReasonSeg("train", seed=1, answers="explained")
    rng = np.random.default_rng(0)
    lisa_questions = {q for index in range(300) for c in official_only.get(index, rng).conversations for q, _ in c}
    assert len(set(questions)) > 1.5 * len(lisa_questions)


def test_made_up_words_keep_the_query_and_never_spell_a_held_out_word():
    dataset = SyntheticReasonSeg("train", seed=3, answers="explained", official_rate=0.0, unknown_word_rate=1.0)
    rng = np.random.default_rng(0)
    known = vocabulary() | phrasing.TEMPLATE_WORDS
    edited, questions = 0, []
    for index in range(300):
        sample = dataset.get(index, rng)
        for query, conversation in zip(sample.meta["queries"], sample.conversations):
            question = conversation[0][0]
            questions.append(question)
            made_up = words([question]) - known
            assert len(made_up) <= MAX_UNKNOWN_WORDS, question
            edited += bool(made_up)
            content = words([query]) - words(["which shape shapes find both all the is of has have"])
            assert content <= words([question]), (query, question)
            assert "{" not in question and "  " not in question
    assert edited > 0.75 * len(questions)  # a noun edit is a no-op when the query names its shape
    assert words(questions) & HELD_OUT_ONLY == set()
    plain = SyntheticReasonSeg("train", seed=3, answers="explained", official_rate=0.0)
    rng = np.random.default_rng(0)
    plain_questions = [c[0][0] for index in range(300) for c in plain.get(index, rng).conversations]
    assert all(words([q]) <= known for q in plain_questions)
    with pytest.raises(InputError, match="unknown_word_rate"):
        SyntheticReasonSeg(unknown_word_rate=-0.1)


def test_pseudo_words_are_never_known_or_held_out_words():
    rng = np.random.default_rng(0)
    vocabulary_words = vocabulary()
    made_up = {phrasing.pseudo_word(rng, vocabulary_words) for _ in range(3000)}
    assert len(made_up) > 1000
    assert made_up.isdisjoint(vocabulary_words | phrasing.TEMPLATE_WORDS)
    assert not any(held_out in word for word in made_up for held_out in HELD_OUT_ONLY)
    assert "red" in vocabulary_words and "item" in phrasing.HELD_OUT_WORDS


def test_every_query_form_renders_in_both_phrasings_with_its_content_words():
    dataset = SyntheticReasonSeg("test", seed=2, size=80)
    forms = set()
    for index in range(len(dataset)):
        for query in dataset.scene(index).queries:
            forms.add(query.form)
            content = words([query.text]) - words(["which shape shapes find both all the is of has have"])
            for name in (phrasing.TRAINED, phrasing.HELD_OUT):
                text = query.phrased(name, np.random.default_rng(index))
                assert content <= words([text]), (query.text, text)
                assert "shape" not in words([text]) or name == phrasing.TRAINED
                assert "{" not in text
    assert forms == set(phrasing.FORMS)
    with pytest.raises(InputError, match="phrasing must be one of"):
        phrasing.render(phrasing.PHRASE, {"adjective": "red", "head": ""}, "official", np.random.default_rng(0))


def test_eval_phrasings_are_fixed_per_scene_and_keep_the_query():
    official = SyntheticReasonSeg("test", size=40)
    held_out = SyntheticReasonSeg("test", size=40, eval_phrasing=phrasing.HELD_OUT)
    again = SyntheticReasonSeg("test", size=40, eval_phrasing=phrasing.HELD_OUT)
    for index in range(40):
        a, b, c = official.eval_sample(index), held_out.eval_sample(index), again.eval_sample(index)
        assert a.meta["query"] == b.meta["query"] and (a.image == b.image).all()
        assert b.conversations == c.conversations and b.meta["phrasing"] == phrasing.HELD_OUT
        assert a.conversations[0][0][0] != b.conversations[0][0][0]
        assert words([b.conversations[0][0][0]]) & HELD_OUT_ONLY
    with pytest.raises(InputError, match="eval_phrasing"):
        SyntheticReasonSeg(eval_phrasing="casual")


@pytest.mark.parametrize("ratio", list(ASPECT_RATIOS))
def test_frames_of_each_aspect_ratio_hold_objects_anywhere(ratio):
    across, down = ASPECT_RATIOS[ratio]
    dataset = SyntheticReasonSeg("test", size=60, aspect_ratios=(ratio,), image_sizes=(96,))
    centres = []
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        height, width = scene.image.shape[:2]
        assert (height, width) == (96, round(96 * across / down))
        for obj, mask in zip(scene.objects, scene.masks):
            assert mask.shape == (height, width) and mask.any()
            # the whole shape lies inside the frame: its mask touches no border
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            centres.append(obj.centre[0] / width)
        assert any(scene.objects[i].pair in {("red", "triangle"), ("blue", "circle"), ("green", "square"),
                                             ("yellow", "hexagon"), ("purple", "star")}
                   for i in range(len(scene.objects)))
    assert min(centres) < 0.15 and max(centres) > 0.85


def test_training_mixes_sizes_and_ratios_and_rejects_unknown_ones():
    dataset = SyntheticReasonSeg("train", size=200, aspect_ratios=tuple(ASPECT_RATIOS), image_sizes=(96, 128, 160))
    shapes = {dataset.scene(index).image.shape[:2] for index in range(200)}
    assert {(96, 96), (128, 171), (160, 284)} <= shapes and len(shapes) == 9
    with pytest.raises(InputError, match="aspect_ratios"):
        SyntheticReasonSeg(aspect_ratios=("21:9",))
    with pytest.raises(InputError, match="short sides"):
        SyntheticReasonSeg(image_sizes=(16,))
    with pytest.raises(InputError, match="official_rate"):
        SyntheticReasonSeg(official_rate=1.5)


def test_every_generated_answer_is_well_formed_and_broken_ones_are_not():
    dataset = SyntheticReasonSeg("train", seed=4, size=200, answers="explained", official_rate=0.4)
    rng = np.random.default_rng(0)
    for index in range(200):
        for conversation in dataset.get(index, rng).conversations:
            for _, answer in conversation:
                assert is_well_formed(answer, answer.count(SEG_TOKEN)), answer
    for answer, masks in (
        ("[SEG]. The orange[SEG]. The orange hexagon has the colour of an orange because a", 2),
        ("[SEG] and [SEG]. There isape the only red shape.", 2),
        ("[SEG]. The red circle would roll because it is round.", 2),  # one [SEG], two masks
        ("[SEG]. The red circle would fly because it is round.", 1),
        (ABSENT_ANSWER, 1),
    ):
        assert not is_well_formed(answer, masks), answer
    assert is_well_formed(" [SEG] and [SEG]. There are two circles and each would roll.", 2)
    assert is_well_formed("Sure, [SEG].", 1) and is_well_formed(ABSENT_ANSWER, 0)


def test_the_tokenizer_never_spells_the_added_tokens():
    tokenizer = build_tiny_tokenizer(corpus())
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    pieces = [token for token in tokenizer.get_vocab() if token != SEG_TOKEN and ("SEG" in token or "EG]" in token)]
    assert pieces == []
    ids = tokenizer("[SEG]. The red circle", add_special_tokens=False).input_ids
    assert ids[0] == seg_id and ids.count(seg_id) == 1
    assert {colour for colour in COLOURS} | set(SHAPES) <= {t.lstrip("\u2581") for t in tokenizer.get_vocab()}
