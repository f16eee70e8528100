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



def test_a_curriculum_window_limits_a_source_to_its_stream_positions():
    sources = {"easy": SyntheticReasonSeg("train", size=50), "hard": SyntheticReasonSeg("val", size=50)}
    ratios = {"easy": 1, "hard": 3}
    plain = MixtureDataset(sources, ratios, length=100, seed=3)
    curriculum = MixtureDataset(sources, ratios, length=100, seed=3, windows={"hard": [60, None]})
    assert {curriculum[i].meta["split"] for i in range(60)} == {"train"}
    later = collections.Counter(curriculum[i].meta["split"] for i in range(60, 100))
    curriculum.set_epoch(1)  # positions 100-199: the window is open, so both draw at 1:3
    later.update(curriculum[i].meta["split"] for i in range(100))
    assert later["val"] / 140 == pytest.approx(0.75, abs=0.1)
    # where every source draws, the draws are those of the mixture without windows
    plain.set_epoch(1)
    for i in (0, 33, 99):
        assert curriculum[i].conversations == plain[i].conversations
    handover = MixtureDataset(sources, ratios, length=100, windows={"easy": [0, 30], "hard": [30, None]})
    assert handover.probabilities_at(29).tolist() == [1.0, 0.0]
    assert handover.probabilities_at(130).tolist() == [0.0, 1.0]
    with pytest.raises(ConfigurationError, match="no source draws at stream position 60"):
        MixtureDataset(sources, ratios, length=100, windows={"easy": [0, 60], "hard": [61, None]})
    with pytest.raises(ConfigurationError, match="no source draws at stream position 60"):
        MixtureDataset(sources, ratios, length=100, windows={"easy": [0, 30], "hard": [30, 60]})
    with pytest.raises(ConfigurationError, match="no source draws at stream position 0"):
        MixtureDataset(sources, ratios, length=100, windows={"easy": [10, None], "hard": [10, None]})
    with pytest.raises(ConfigurationError, match="must be \\[start, end\\)"):
        MixtureDataset(sources, ratios, length=100, windows={"hard": [50, 40]})
    with pytest.raises(ConfigurationError, match="do not exist: \\['medium'\\]"):
        MixtureDataset(sources, ratios, length=100, windows={"medium": [0, None]})


def test_steps_in_config_entries_become_stream_windows():
    entries = [
        {"type": "synthetic", "name": "square", "split": "train", "size": 20},
        {"type": "synthetic", "name": "wide", "split": "train", "size": 20, "aspect_ratios": ["16:9"],
         "steps": [3, None], "ratio": 3},
    ]
    mixture = build_mixture(entries, length=200, samples_per_step=8)
    assert mixture.windows == {"wide": (24, None)}
    assert {mixture[i].image.shape[:2] for i in range(24)} == {(128, 128)}
    assert any(mixture[i].image.shape[1] > mixture[i].image.shape[0] for i in range(24, 60))
    with pytest.raises(ConfigurationError, match="give build_mixture samples_per_step"):
        build_mixture(entries, length=200)
    with pytest.raises(ConfigurationError, match="must be \\[first, end\\]"):
        build_mixture([{**entries[1], "steps": 3}], length=200, samples_per_step=8)

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
