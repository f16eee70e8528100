"""Question/answer templates, conversation rules, the Sample type and the dataset mixer."""

import collections
import json

import cv2
import numpy as np
import pytest

from lisa_core.errors import ConfigurationError, InputError
from training.data import (
    DEFAULT_RATIOS,
    MixtureDataset,
    Sample,
    SyntheticReasonSeg,
    build_mixture,
    build_sources,
    mixture_ratios,
    templates,
)


def test_official_template_lists():
    assert len(templates.SHORT_QUESTION_TEMPLATES) == 4
    assert len(templates.LONG_QUESTION_TEMPLATES) == 2
    assert len(templates.EXPLANATORY_QUESTION_SUFFIXES) == 3
    assert templates.ANSWER_TEMPLATES == (
        "It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG].",
    )
    assert templates.SHORT_QUESTION_TEMPLATES[0].format(name="dog") == "Can you segment the dog in this image?"
    assert templates.LONG_QUESTION_TEMPLATES[1].format(sentence="Why?") == "Why? Please output segmentation mask."
    assert templates.eval_question(" Tall Tree ", False) == (
        "What is Tall Tree in this image? Please output segmentation mask."
    )
    assert "{" not in " ".join(templates.template_corpus())


def test_query_sampling_without_replacement():
    rng = np.random.default_rng(0)
    assert templates.sample_query_indices(2, rng) == [0, 1]
    for _ in range(50):
        chosen = templates.sample_query_indices(7, rng)
        assert len(chosen) == 3 == len(set(chosen)) and all(0 <= i < 7 for i in chosen)
    assert len(templates.sample_query_indices(7, rng, limit=5)) == 5


def test_explanatory_mode_rates():
    rng = np.random.default_rng(1)
    counts = collections.Counter(templates.draw_explanatory_mode(rng, 0.1) for _ in range(20000))
    assert counts[templates.TEXT_ONLY] / 20000 == pytest.approx(0.1, abs=0.01)
    assert counts[templates.PLAIN] / 20000 == pytest.approx(0.45, abs=0.015)
    assert counts[templates.EXPLAINED] / 20000 == pytest.approx(0.45, abs=0.015)


def test_segmentation_turn_modes():
    rng = np.random.default_rng(2)
    (question, answer), has_seg = templates.segmentation_turn("Cat", False, rng)
    assert has_seg and question in [t.format(name="cat") for t in templates.SHORT_QUESTION_TEMPLATES]
    (question, answer), has_seg = templates.segmentation_turn("Why?", True, rng, templates.EXPLAINED, "Because.")
    assert has_seg and question.startswith("Why? Please output segmentation mask and")
    assert answer.endswith(" Because.") and answer.count("[SEG]") == 1
    assert templates.segmentation_turn("Why?", True, rng, templates.TEXT_ONLY, "Because.") == (("Why?", "Because."), False)
    with pytest.raises(ValueError, match="unknown explanatory mode"):
        templates.segmentation_turn("q", True, rng, "chatty")


def test_sample_checks_masks_against_seg_tokens():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    mask = np.zeros((4, 5), dtype=np.uint8)
    with pytest.raises(InputError, match=r"answers hold 2 \[SEG\] but 1 masks"):
        Sample(image, [[("q", "[SEG] and [SEG].")]], [mask], "test")
    with pytest.raises(InputError, match="masks must be uint8"):
        Sample(image, [[("q", "[SEG].")]], [np.zeros((5, 4), dtype=np.uint8)], "test")
    with pytest.raises(InputError, match="image must be uint8"):
        Sample(image.astype(np.float32), [], [], "test")


def test_sample_groups_masks_and_builds_query_ground_truth():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    a = np.array([[1, 0, 0], [0, 0, 0]], dtype=np.uint8)
    b = np.array([[0, 1, 255], [0, 0, 0]], dtype=np.uint8)
    c = np.array([[0, 0, 1], [255, 0, 0]], dtype=np.uint8)
    sample = Sample(
        image,
        [[("q1", "Sure, [SEG].")], [("q2", "There is no such object in the image.")], [("q3", "[SEG] and [SEG].")]],
        [a, b, c],
        "test",
    )
    grouped = sample.masks_per_conversation()
    assert [len(g) for g in grouped] == [1, 0, 2] and grouped[2][0] is b
    np.testing.assert_array_equal(sample.query_ground_truth(1), np.zeros((2, 3)))
    # 1 wins over 255 where the masks disagree
    np.testing.assert_array_equal(sample.query_ground_truth(2), [[0, 1, 1], [255, 0, 0]])


def test_default_ratios_and_group_sharing():
    assert DEFAULT_RATIOS["semantic"] == 9 and DEFAULT_RATIOS["refer"] == 3
    assert DEFAULT_RATIOS["vqa"] == 3 and DEFAULT_RATIOS["reason_seg"] == 1
    groups = {"ade20k": "semantic", "refcoco": "refer", "refcoco+": "refer", "llava": "vqa", "reason": "reason_seg"}
    assert mixture_ratios(groups) == {"ade20k": 9, "refcoco": 1.5, "refcoco+": 1.5, "llava": 3, "reason": 1}
    assert mixture_ratios(groups, {"refcoco": 4})["refcoco+"] == 3  # the rest of the group shares its ratio
    with pytest.raises(ConfigurationError, match="no default ratio for group 'mine'"):
        mixture_ratios({"x": "mine"})


def test_mixture_follows_ratios_and_is_reproducible():
    sources = {"often": SyntheticReasonSeg("train", size=50), "rarely": SyntheticReasonSeg("val", size=50)}
    mixture = MixtureDataset(sources, {"often": 9, "rarely": 1}, length=600, seed=3)
    splits = collections.Counter(mixture[i].meta["split"] for i in range(600))
    assert splits["val"] / 600 == pytest.approx(0.1, abs=0.035)
    again = MixtureDataset(sources, {"often": 9, "rarely": 1}, length=600, seed=3)
    for i in (0, 17, 599):
        assert again[i].conversations == mixture[i].conversations
        assert again[i].image.tobytes() == mixture[i].image.tobytes()
    firsts = [mixture[i].conversations for i in range(10)]
    mixture.set_epoch(1)
    assert [mixture[i].conversations for i in range(10)] != firsts
    with pytest.raises(IndexError):
        mixture[600]


def test_mixture_refuses_bad_configurations():
    source = {"a": SyntheticReasonSeg("val", size=2)}
    with pytest.raises(ConfigurationError, match="no mixing ratio"):
        MixtureDataset(source, {}, length=3)
    with pytest.raises(ConfigurationError, match="positive sum"):
        MixtureDataset(source, {"a": 0}, length=3)
    with pytest.raises(ConfigurationError, match="at least one"):
        MixtureDataset({}, {}, length=3)
    with pytest.raises(ConfigurationError, match="without items"):
        MixtureDataset({"a": SyntheticReasonSeg("val", size=0)}, {"a": 1}, length=3)


def test_build_mixture_from_config_entries(tmp_path):
    root = tmp_path / "ReasonSeg"
    (root / "train").mkdir(parents=True)
    cv2.imwrite(str(root / "train" / "x.jpg"), np.zeros((8, 8, 3), dtype=np.uint8))
    shape = {"label": "target", "points": [[1, 1], [5, 1], [5, 5], [1, 5]]}
    (root / "train" / "x.json").write_text(json.dumps({"text": ["Which?"], "is_sentence": True, "shapes": [shape]}))
    entries = [
        {"type": "synthetic", "split": "train", "size": 20, "image_size": 64},
        {"type": "reason_seg", "root": str(root), "explanatory_rate": None},
    ]
    sources, ratios = build_sources(entries)
    assert list(sources) == ["synthetic", "reason_seg"] and ratios == {"synthetic": 1.0, "reason_seg": 1.0}
    mixture = build_mixture(entries, length=40, seed=0)
    seen = collections.Counter(mixture[i].source for i in range(40))
    assert set(seen) == {"synthetic", "reason_seg"}
    with pytest.raises(ConfigurationError, match="two dataset entries are named 'synthetic'"):
        build_sources([entries[0], entries[0]])
    with pytest.raises(ConfigurationError, match="type must be one of"):
        build_sources([{"type": "coco"}])
    with pytest.raises(ConfigurationError, match="missing or misnames an option"):
        build_sources([{"type": "refer"}])
