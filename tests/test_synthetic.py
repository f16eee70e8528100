"""The synthetic reasoning benchmark: reproducibility, correct answers, hold-out rule, vocabulary."""

import hashlib
import re

import numpy as np
import pytest

from lisa_core.errors import InputError
from training.data import templates
from training.data.synthetic import (
    ABSENT_ANSWER,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    UNNAMED,
    UNNAMED_COLOUR_DISTANCE,
    SyntheticReasonSeg,
    corpus,
    explanations,
    is_well_formed,
)

WORD = re.compile(r"\[SEG\]|\w+|[^\w\s]")
FUNCTION_SHAPES = {
    "would roll": "circle", "has three corners": "triangle", "has four equal sides": "square",
    "has six corners": "hexagon", "has five points": "star",
    "have three corners": "triangle", "have four equal sides": "square", "have six corners": "hexagon",
    "have five points": "star",
}
COLOUR_THINGS = {"grass": "green", "the sky": "blue", "a banana": "yellow", "a tomato": "red",
                 "an orange": "orange", "grapes": "purple"}


def digest(sample):
    h = hashlib.sha256(sample.image.tobytes())
    for mask in sample.masks:
        h.update(mask.tobytes())
    h.update(repr(sample.conversations).encode())
    return h.hexdigest()


def areas(masks):
    return [int(m.sum()) for m in masks]


def reference_index(text, objects, masks):
    """Oracle: which object a reference phrase names (None when it names none or several)."""
    if text in ("largest shape", "smallest shape"):
        a = areas(masks)
        order = sorted(range(len(a)), key=lambda i: a[i], reverse=text == "largest shape")
        first, second = a[order[0]], a[order[1]]
        ok = first >= 1.3 * second if text == "largest shape" else second >= 1.3 * first
        return order[0] if ok else None
    words = text.split()
    if len(words) == 2 and words[1] == "shape":
        found = [i for i, o in enumerate(objects) if o.colour == words[0]]
    elif len(words) == 2:
        found = [i for i, o in enumerate(objects) if (o.colour, o.shape) == tuple(words)]
    else:
        found = [i for i, o in enumerate(objects) if o.shape == words[0]]
    return found[0] if len(found) == 1 else None


def oracle(query_text, objects, masks, image_size):
    """(targets in any order, reference or None) recomputed from the query text alone."""
    relation = re.match(r"Which shape is (left of|right of|above|below) the (.+)\?$", query_text)
    if relation:
        ref = reference_index(relation.group(2), objects, masks)
        assert ref is not None, query_text
        dx, dy = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}[relation.group(1)]
        rx, ry = objects[ref].centre
        found = [i for i, o in enumerate(objects)
                 if i != ref and (o.centre[0] - rx) * dx + (o.centre[1] - ry) * dy > 0.05 * image_size]
        assert len(found) == 1, query_text
        return set(found), ref
    function = re.match(r"Which shapes? (would roll|ha(?:s|ve) .+)\?$", query_text)
    colour_thing = re.match(r"Which shape has the colour of (.+)\?$", query_text)
    if colour_thing:
        return {i for i, o in enumerate(objects) if o.colour == COLOUR_THINGS[colour_thing.group(1)]}, None
    if function:
        return {i for i, o in enumerate(objects) if o.shape == FUNCTION_SHAPES[function.group(1)]}, None
    several = re.match(r"Find (?:both|all the) (\w+)\.$", query_text)
    if several:
        return {i for i, o in enumerate(objects) if o.shape + "s" == several.group(1)}, None
    several_colour = re.match(r"Find all the (\w+) shapes\.$", query_text)
    if several_colour:
        return {i for i, o in enumerate(objects) if o.colour == several_colour.group(1)}, None
    ref = reference_index(query_text, objects, masks)
    if query_text in ("largest shape", "smallest shape") or query_text.endswith(" shape"):
        return ({ref} if ref is not None else set()), None
    colour, shape = query_text.split()
    return {i for i, o in enumerate(objects) if (o.colour, o.shape) == (colour, shape)}, None


@pytest.mark.parametrize("split, unnamed_colour_rate", [("train", 0.0), ("test", 0.0), ("train", 0.5), ("test", 0.5)])
def test_every_candidate_query_has_the_right_targets(split, unnamed_colour_rate):
    dataset = SyntheticReasonSeg(split, seed=5, size=150, unnamed_colour_rate=unnamed_colour_rate)
    kinds = set()
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        objects, masks = scene.objects, scene.masks
        assert scene.queries == dataset.candidate_queries(objects, masks)
        for query in scene.queries:
            kinds.add(query.kind)
            targets, _ = oracle(query.text, objects, masks, min(masks[0].shape))
            assert set(query.targets) == targets, (index, query)
            if query.kind == "multiple":
                assert len(targets) >= 2
                xs = [objects[i].centre[0] for i in query.targets]
                assert xs == sorted(xs)  # masks follow the left-to-right order
            elif query.kind == "absent":
                assert targets == set()
            else:
                assert len(targets) == 1
    assert kinds == {"attribute", "size", "relation", "function", "multiple", "absent"}


def test_scenes_render_each_object_exactly():
    dataset = SyntheticReasonSeg("val", seed=1, size=40)
    counts = set()
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        objects, masks, image = scene.objects, scene.masks, scene.image
        counts.add(len(objects))
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        total = np.zeros((128, 128), dtype=int)
        for obj, mask in zip(objects, masks):
            assert mask.sum() > 40
            assert (image[mask == 1] == COLOURS[obj.colour]).all()
            total += mask
        assert total.max() == 1  # no overlaps
        background = image[total == 0]
        assert (background == background[0]).all() and background[0][0] == background[0][1]
    assert counts == {2, 3, 4, 5}


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    a = SyntheticReasonSeg("train", seed=11, size=30)
    b = SyntheticReasonSeg("train", seed=11, size=30)
    other = SyntheticReasonSeg("train", seed=12, size=30)
    for index in range(30):
        assert digest(a.eval_sample(index)) == digest(b.eval_sample(index))
        assert digest(a.get(index, np.random.default_rng(index))) == digest(b.get(index, np.random.default_rng(index)))
    assert sum(digest(a.eval_sample(i)) != digest(other.eval_sample(i)) for i in range(30)) == 30
    test_split = SyntheticReasonSeg("test", seed=11, size=30)
    assert all(a.scene(i).image.tobytes() != test_split.scene(i).image.tobytes() for i in range(30))


def held_out_phrases():
    return [f"{colour} {shape}" for colour, shape in HELD_OUT_PAIRS]


@pytest.mark.parametrize("split", ["train", "val"])
def test_held_out_compositions_never_appear_outside_test(split):
    dataset = SyntheticReasonSeg(split, seed=0, size=400, explanatory_rate=0.5)
    rng = np.random.default_rng(0)
    for index in range(len(dataset)):
        objects = dataset.scene(index).objects
        assert not any(o.pair in HELD_OUT_PAIRS for o in objects)
        sample = dataset.get(index, rng)
        text = " ".join(q + " " + a for conversation in sample.conversations for q, a in conversation)
        assert not any(phrase in text for phrase in held_out_phrases()), text
        (question, _), = dataset.eval_sample(index).conversations[0]
        assert not any(phrase in question for phrase in held_out_phrases())


def test_every_test_query_involves_a_held_out_composition():
    dataset = SyntheticReasonSeg("test", seed=0, size=200)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        objects, masks = scene.objects, scene.masks
        assert any(o.pair in HELD_OUT_PAIRS for o in objects)
        sample = dataset.eval_sample(index)
        query = sample.meta["query"]
        targets, reference = oracle(query, objects, masks, min(masks[0].shape))
        involved = targets | ({reference} if reference is not None else set())
        named_held_out = any(phrase == query for phrase in held_out_phrases())
        assert named_held_out or any(objects[i].pair in HELD_OUT_PAIRS for i in involved), (index, query)


def test_eval_samples_answers_and_ground_truth():
    dataset = SyntheticReasonSeg("test", seed=2, size=120)
    kinds = set()
    for index in range(len(dataset)):
        sample = dataset.eval_sample(index)
        kinds.add(sample.meta["kind"])
        (question, answer), = sample.conversations[0]
        assert question == templates.eval_question(sample.meta["query"], sample.meta["is_sentence"])
        truth = sample.query_ground_truth(0)
        if sample.meta["kind"] == "absent":
            assert answer == ABSENT_ANSWER and sample.masks == [] and not truth.any()
        else:
            count = len(sample.masks)
            assert answer == {1: "[SEG].", 2: "[SEG] and [SEG].", 3: "[SEG], [SEG] and [SEG]."}[count]
            assert truth.sum() == sum(int(m.sum()) for m in sample.masks)
    assert {"relation", "function", "multiple", "absent"} <= kinds


def test_training_samples_use_templates_and_explanations():
    rng = np.random.default_rng(4)
    explained = SyntheticReasonSeg("train", seed=0, size=100, explanatory_rate=1.0)
    for index in range(100):
        sample = explained.get(index, rng)
        assert 1 <= len(sample.conversations) <= 3
        assert len({q for c in sample.conversations for q, _ in c}) == len(sample.conversations)
        for (question, answer), in sample.conversations:
            if answer == ABSENT_ANSWER:
                continue
            assert any(question.endswith(s) for s in templates.EXPLANATORY_QUESTION_SUFFIXES), question
            assert re.search(r"\[SEG\]\.? [A-Z]", answer), answer  # the reason follows the [SEG]s
    plain = SyntheticReasonSeg("train", seed=0, size=100, explanatory_rate=0.0)
    for index in range(100):
        for (question, answer), in plain.get(index, rng).conversations:
            assert "explain" not in question
            if answer.count("[SEG]") == 1:
                assert answer in templates.ANSWER_TEMPLATES


def test_explained_answers():
    dataset = SyntheticReasonSeg("train", seed=0, size=60, answers="explained")
    seen_multi = seen_absent = False
    for index in range(60):
        sample = dataset.get(index, np.random.default_rng(index))
        scene = dataset.scene(index)
        queries = {q.text: q for q in scene.queries}
        masks = iter(sample.masks)
        for ((question, answer),), text in zip(sample.conversations, sample.meta["queries"]):
            query = queries[text]
            assert "explain" not in question and text.lower().rstrip("?.") in question.lower()
            assert all(np.array_equal(next(masks), scene.masks[i]) for i in query.targets)
            count = len(query.targets)
            if count == 0:
                assert answer == ABSENT_ANSWER
                seen_absent = True
                continue
            seen_multi |= count > 1
            segs = "[SEG]." if count == 1 else ", ".join(["[SEG]"] * (count - 1)) + " and [SEG]."
            assert answer == f"{segs} {query.explanation}" and query.explanation[0].isupper()
    assert seen_multi and seen_absent
    with pytest.raises(InputError, match="answers must be one of"):
        SyntheticReasonSeg(answers="short")


def test_objects_of_unnamed_colours_are_only_asked_about_by_shape_size_and_place():
    dataset = SyntheticReasonSeg("train", seed=7, size=200, answers="explained", unnamed_colour_rate=0.5)
    named = np.array(list(COLOURS.values()), dtype=float)
    unnamed = total = 0
    kinds = set()
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        for obj, mask in zip(scene.objects, scene.masks):
            total += 1
            assert (scene.image[mask == 1] == obj.fill).all()
            if obj.colour != UNNAMED:
                assert obj.fill == COLOURS[obj.colour]
                continue
            unnamed += 1
            assert np.linalg.norm(named - obj.fill, axis=1).min() >= UNNAMED_COLOUR_DISTANCE
            grey = np.clip(np.mean(obj.fill), 200, 245)
            assert np.linalg.norm(np.array(obj.fill) - grey) >= UNNAMED_COLOUR_DISTANCE
        for query in scene.queries:
            if not any(scene.objects[i].colour == UNNAMED for i in query.targets):
                continue
            kinds.add(query.kind)
            assert query.kind in ("size", "relation", "function", "multiple"), query
            assert query.explanation in explanations(), query
            described = [scene.objects[i].shape for i in query.targets]
            assert query.explanation.startswith(("There are", *(f"The {shape} " for shape in described))), query
    assert 0.4 < unnamed / total < 0.6
    assert kinds == {"size", "relation", "function", "multiple"}
    sample = dataset.get(0, np.random.default_rng(0))
    assert all(is_well_formed(answer, answer.count("[SEG]")) for (_, answer), in sample.conversations)


def test_the_held_out_object_of_a_test_scene_keeps_its_named_colour():
    dataset = SyntheticReasonSeg("test", seed=0, size=100, unnamed_colour_rate=1.0)
    for index in range(len(dataset)):
        objects = dataset.scene(index).objects
        assert objects[0].pair in HELD_OUT_PAIRS
        assert all(o.colour == UNNAMED for o in objects[1:])


def test_corpus_covers_every_generated_word():
    vocabulary = {w for sentence in corpus() for w in WORD.findall(sentence)}
    assert len(vocabulary) < 200  # small enough for a word-level tokenizer
    rng = np.random.default_rng(0)
    seen = set()
    for split in ("train", "test"):
        for rate, answers, official_rate in ((0.0, "explained", 0.0), (1.0, "templates", 1.0)):
            dataset = SyntheticReasonSeg(split, seed=3, size=150, explanatory_rate=rate, answers=answers,
                                         official_rate=official_rate)
            for index in range(len(dataset)):
                for sample in (dataset.get(index, rng), dataset.eval_sample(index)):
                    for conversation in sample.conversations:
                        for question, answer in conversation:
                            seen.update(WORD.findall(question + " " + answer))
    assert seen - vocabulary == set()
    assert {"circle", "triangle", "roll", "[SEG]", "explain"} <= seen


def test_configuration_and_errors():
    small = SyntheticReasonSeg("val", size=3, image_size=64, max_objects=2)
    assert len(small) == 3 and small.eval_sample(0).image.shape == (64, 64, 3)
    assert all(len(small.scene(i).objects) == 2 for i in range(3))
    assert len(SyntheticReasonSeg("train")) == 4000
    with pytest.raises(InputError, match="split must be one of"):
        SyntheticReasonSeg("dev")
    with pytest.raises(IndexError):
        small.eval_sample(3)
    with pytest.raises(InputError, match="max_objects"):
        SyntheticReasonSeg(max_objects=1)
    with pytest.raises(InputError, match="unnamed_colour_rate"):
        SyntheticReasonSeg(unnamed_colour_rate=1.5)
    assert len(SHAPES) == 5 and len(COLOURS) == 6


def test_kinds_can_be_restricted():
    dataset = SyntheticReasonSeg("test", seed=0, size=60, kinds=("relation", "absent"))
    rng = np.random.default_rng(0)
    for index in range(len(dataset)):
        assert dataset.eval_sample(index).meta["kind"] in ("relation", "absent")
        assert set(dataset.get(index, rng).meta["kinds"]) <= {"relation", "absent"}
    with pytest.raises(InputError, match="kinds must be a non-empty subset"):
        SyntheticReasonSeg(kinds=("colour",))
