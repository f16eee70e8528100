"""ADE20K-style semantic segmentation and LLaVA-Instruct VQA readers on small files in those formats."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from lisa_core.errors import InputError
from training.data import templates
from training.data.semantic import SemanticSegDataset, load_class_names, reduce_zero_label
from training.data.vqa import LlavaInstructDataset, conversation_turns

CLASSES = ["wall", "Building", "sky", "floor"]


def write_ade20k(root, labels):
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    for stem, label in labels.items():
        image = np.full((*label.shape, 3), 128, dtype=np.uint8)
        cv2.imwrite(str(root / "images" / "training" / f"{stem}.jpg"), image)
        Image.fromarray(label).save(root / "annotations" / "training" / f"{stem}.png")
    (root / "classes.json").write_text(json.dumps(CLASSES))


def ade_label():
    label = np.zeros((6, 8), dtype=np.uint8)  # 0 = "other" -> ignored
    label[0:2, :] = 1  # wall
    label[2:4, 0:4] = 3  # sky
    label[4:6, 0:2] = 4  # floor
    label[5, 7] = 255
    return label


def test_reduce_zero_label():
    label = np.array([[0, 1, 2], [150, 255, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(label), [[255, 0, 1], [149, 255, 3]])


def test_class_lists_json_and_text(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(CLASSES))
    assert load_class_names(tmp_path / "a.json") == CLASSES
    (tmp_path / "b.txt").write_text("0: unlabeled\n1: person\n\nbicycle\n")
    assert load_class_names(tmp_path / "b.txt") == ["unlabeled", "person", "bicycle"]
    (tmp_path / "c.json").write_text(json.dumps({"wall": 0}))
    with pytest.raises(InputError, match="JSON list"):
        load_class_names(tmp_path / "c.json")


def test_ade20k_samples_ask_about_present_classes(tmp_path):
    empty = np.zeros((6, 8), dtype=np.uint8)  # nothing but "other": skipped
    write_ade20k(tmp_path, {"ADE_train_0": empty, "ADE_train_1": ade_label()})
    dataset = SemanticSegDataset.ade20k(tmp_path, tmp_path / "classes.json")
    assert len(dataset) == 2 and dataset.name == "ade20k"
    reduced = dataset.label(1)
    assert set(np.unique(reduced)) == {0, 2, 3, 255}
    sample = dataset.get(0, np.random.default_rng(0))  # image 0 has no class: falls through to image 1
    assert sample.meta["image_path"].endswith("ADE_train_1.jpg")
    assert sorted(sample.meta["classes"]) == ["floor", "sky", "wall"]
    expected = {"wall": reduced == 0, "sky": reduced == 2, "floor": reduced == 3}
    for name, conversation, mask in zip(sample.meta["classes"], sample.conversations, sample.masks):
        (question, answer), = conversation
        assert question in [t.format(name=name.lower()) for t in templates.SHORT_QUESTION_TEMPLATES]
        assert answer in templates.ANSWER_TEMPLATES
        np.testing.assert_array_equal(mask, expected[name].astype(np.uint8))
    assert sample.masks[0].sum() + sample.masks[1].sum() + sample.masks[2].sum() == 16 + 8 + 4


def test_at_most_three_classes_and_ignored_classes(tmp_path):
    label = ade_label()
    label[4:6, 2:4] = 2  # building
    write_ade20k(tmp_path, {"x": label})
    dataset = SemanticSegDataset.ade20k(tmp_path, tmp_path / "classes.json")
    drawn = set()
    for seed in range(10):
        sample = dataset.get(0, np.random.default_rng(seed))
        assert len(sample.conversations) == 3 == len(set(sample.meta["classes"]))
        drawn.update(sample.meta["classes"])
        for name, ((question, _),) in zip(sample.meta["classes"], sample.conversations):
            assert name.lower() in question and "Building" not in question
    assert drawn == {"wall", "Building", "sky", "floor"}
    without_sky = SemanticSegDataset.ade20k(tmp_path, tmp_path / "classes.json", ignore_class_ids=[2])
    for seed in range(5):
        assert "sky" not in without_sky.get(0, np.random.default_rng(seed)).meta["classes"]


def test_semantic_errors(tmp_path):
    label = ade_label()
    label[0, 0] = 9  # class 8 after reduction: beyond the 4 names
    write_ade20k(tmp_path, {"x": label})
    dataset = SemanticSegDataset.ade20k(tmp_path, tmp_path / "classes.json")
    with pytest.raises(InputError, match=r"label values \[8\] exceed the 4 class names"):
        dataset.get(0, np.random.default_rng(0))
    with pytest.raises(InputError, match="no .jpg images"):
        SemanticSegDataset.ade20k(tmp_path, tmp_path / "classes.json", split="validation")


LLAVA_ITEMS = [
    {
        "id": "000000033471",
        "image": "000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {
        "id": "000000052846",
        "image": "000000052846.jpg",
        "conversations": [
            {"from": "gpt", "value": "stray greeting"},
            {"from": "human", "value": "Where is the cat sitting?\n<image>"},
            {"from": "gpt", "value": "On a suitcase."},
        ],
    },
]


def test_llava_instruct_reader(tmp_path):
    (tmp_path / "coco").mkdir()
    for item in LLAVA_ITEMS:
        cv2.imwrite(str(tmp_path / "coco" / item["image"]), np.zeros((5, 7, 3), dtype=np.uint8))
    (tmp_path / "llava_instruct_150k.json").write_text(json.dumps(LLAVA_ITEMS))
    dataset = LlavaInstructDataset(tmp_path / "llava_instruct_150k.json", tmp_path / "coco")
    assert len(dataset) == 2
    first = dataset.get(0, np.random.default_rng(0))
    assert first.conversations == [[
        ("What are the colors of the bus in the image?", "The bus in the image is white and red."),
        ("What feature can be seen on the back of the bus?", "The back of the bus features an advertisement."),
    ]]
    assert first.masks == [] and first.image.shape == (5, 7, 3) and first.source == "llava_instruct"
    second = dataset.get(1, np.random.default_rng(0))
    assert second.conversations == [[("Where is the cat sitting?", "On a suitcase.")]]


def test_vqa_errors(tmp_path):
    with pytest.raises(InputError, match="human/gpt pairs"):
        conversation_turns([{"from": "human", "value": "q"}], "item-7")
    with pytest.raises(InputError, match="turn 1 is human/human"):
        conversation_turns(
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
             {"from": "human", "value": "c"}, {"from": "human", "value": "d"}], "x")
    with pytest.raises(InputError, match="not found"):
        LlavaInstructDataset(tmp_path / "missing.json", tmp_path)
    (tmp_path / "v.json").write_text(json.dumps(LLAVA_ITEMS))
    with pytest.raises(InputError, match="cannot read image"):
        LlavaInstructDataset(tmp_path / "v.json", tmp_path / "nowhere").get(0, np.random.default_rng(0))
