"""ReasonSeg reader on small files written in the official layout."""

import json

import cv2
import numpy as np
import pytest

from lisa_core.errors import InputError
from training.data import templates
from training.data.reason_seg import ReasonSegDataset, load_annotation, reason_seg_mask

HEIGHT, WIDTH = 12, 20


def rectangle(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def expected_mask():
    """Hand-drawn ground truth of write_image's shapes."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[2:8, 2:10] = 1  # target rectangle, corners included
    mask[3:6, 4:7] = 255  # smaller "ignore" shape drawn on top although listed first
    mask[2:5, 12:15] = 1  # float points truncated: (12.7, 2.9)-(14.2, 4.99) -> (12, 2)-(14, 4)
    return mask


SHAPES = [
    {"label": "ignore", "points": rectangle(4, 3, 6, 5), "shape_type": "polygon", "group_id": None, "flags": {}},
    {"label": "target", "points": rectangle(2, 2, 9, 7), "shape_type": "polygon", "group_id": None, "flags": {}},
    {"label": "Flag", "points": rectangle(0, 0, 19, 11), "shape_type": "polygon", "group_id": None, "flags": {}},
    {"label": "target", "points": [[12.7, 2.9], [14.2, 2.9], [14.2, 4.99], [12.7, 4.99]], "shape_type": "polygon"},
]


def write_image(folder, stem, queries, is_sentence, encoding="utf-8"):
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((HEIGHT, WIDTH, 3), (30, 120, 200), dtype=np.uint8)
    cv2.imwrite(str(folder / f"{stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    document = {"text": queries, "is_sentence": is_sentence, "shapes": SHAPES}
    (folder / f"{stem}.json").write_bytes(json.dumps(document, ensure_ascii=False).encode(encoding))


@pytest.fixture
def reason_seg_root(tmp_path):
    root = tmp_path / "reason_seg" / "ReasonSeg"
    long_queries = [
        "What in this picture keeps food cold?",
        "Which object would you use to boil water?",
        "Where would a cat most likely sleep?",
        "What could hold the flowers?",
    ]
    write_image(root / "train", "a_long", long_queries, True)
    write_image(root / "train", "b_short", ["Coffee Mug"], False)
    write_image(root / "val", "c_val", ["What provides light at night?", "unused second query"], True)
    (root / "explanatory").mkdir()
    explanations = [{"image": "a_long.jpg", "query": long_queries[0], "outputs": "The fridge keeps food cold."}]
    (root / "explanatory" / "train.json").write_text(json.dumps(explanations))
    return root


def test_mask_rules_flag_ignore_order_and_truncation(reason_seg_root):
    mask, queries, is_sentence = load_annotation(reason_seg_root / "train" / "a_long.json", HEIGHT, WIDTH)
    np.testing.assert_array_equal(mask, expected_mask())
    assert is_sentence is True and len(queries) == 4


def test_mask_of_no_shapes_is_empty():
    assert not reason_seg_mask([], 5, 6).any()
    only_flag = [{"label": "flag", "points": rectangle(0, 0, 5, 4)}]
    assert not reason_seg_mask(only_flag, 5, 6).any()


def test_cp1252_json_is_read(tmp_path):
    write_image(tmp_path, "x", ["Which caf\u00e9 sign is lit\u2019?"], True, encoding="cp1252")
    with pytest.raises(UnicodeDecodeError):
        (tmp_path / "x.json").read_bytes().decode("utf-8")
    _, queries, _ = load_annotation(tmp_path / "x.json", HEIGHT, WIDTH)
    assert queries == ["Which caf\u00e9 sign is lit\u2019?"]


def test_training_sample_without_explanations(reason_seg_root):
    dataset = ReasonSegDataset(reason_seg_root, splits=("train",), explanatory_rate=None)
    assert len(dataset) == 2
    sample = dataset.get(0, np.random.default_rng(0))  # a_long: 4 queries -> 3 sampled
    assert sample.source == "reason_seg" and sample.image.shape == (HEIGHT, WIDTH, 3)
    assert len(sample.conversations) == 3 and len(sample.masks) == 3
    suffixes = [t.replace("{sentence} ", "") for t in templates.LONG_QUESTION_TEMPLATES]
    asked = []
    for conversation, mask in zip(sample.conversations, sample.masks):
        (question, answer), = conversation
        query, suffix = question.split("? ", 1)
        assert suffix in suffixes
        asked.append(query + "?")
        assert answer in templates.ANSWER_TEMPLATES
        np.testing.assert_array_equal(mask, expected_mask())
    assert len(set(asked)) == 3  # drawn without replacement
    # the JPEG colour survives within compression error
    assert np.abs(sample.image.astype(int) - (30, 120, 200)).max() <= 3


def test_short_query_uses_short_templates_lower_cased(reason_seg_root):
    dataset = ReasonSegDataset(reason_seg_root, explanatory_rate=None)
    sample = dataset.get(1, np.random.default_rng(3))
    (question, _), = sample.conversations[0]
    assert question in [t.format(name="coffee mug") for t in templates.SHORT_QUESTION_TEMPLATES]
    assert sample.meta["is_sentence"] is False


def test_explanatory_modes(reason_seg_root):
    always_text = ReasonSegDataset(reason_seg_root, explanatory_rate=1.0)
    sample = always_text.get(0, np.random.default_rng(0))
    assert sample.meta["explanatory_mode"] == templates.TEXT_ONLY
    assert sample.masks == []
    for (question, answer), in sample.conversations:
        assert answer == "The fridge keeps food cold."
        assert "segmentation" not in question

    never_text = ReasonSegDataset(reason_seg_root, explanatory_rate=0.0)
    modes = set()
    for seed in range(20):
        sample = never_text.get(0, np.random.default_rng(seed))
        modes.add(sample.meta["explanatory_mode"])
        assert len(sample.masks) == 3
        if sample.meta["explanatory_mode"] == templates.EXPLAINED:
            (question, answer), = sample.conversations[0]
            assert any(question.endswith(" " + s) for s in templates.EXPLANATORY_QUESTION_SUFFIXES)
            assert answer.endswith(" The fridge keeps food cold.")
            assert answer[: -len(" The fridge keeps food cold.")] in templates.ANSWER_TEMPLATES
    assert modes == {templates.PLAIN, templates.EXPLAINED}
    # an image without an explanation always gets plain answers
    assert never_text.get(1, np.random.default_rng(0)).meta["explanatory_mode"] == templates.PLAIN


def test_eval_sample_is_the_official_validation_protocol(reason_seg_root):
    dataset = ReasonSegDataset(reason_seg_root, splits=("val",))
    sample = dataset.eval_sample(0)
    assert sample.conversations == [
        [("What provides light at night? Please output segmentation mask.", "[SEG].")]
    ]
    np.testing.assert_array_equal(sample.masks[0], expected_mask())
    np.testing.assert_array_equal(sample.query_ground_truth(0), expected_mask())
    assert sample.meta["is_sentence"] is True


def test_same_rng_same_sample(reason_seg_root):
    dataset = ReasonSegDataset(reason_seg_root)
    first = dataset.get(0, np.random.default_rng(7))
    second = dataset.get(0, np.random.default_rng(7))
    assert first.conversations == second.conversations


def test_errors_name_the_problem(tmp_path, reason_seg_root):
    with pytest.raises(InputError, match="split folder not found"):
        ReasonSegDataset(reason_seg_root, splits=("test",))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(InputError, match="no .jpg images"):
        ReasonSegDataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    write_image(bad / "train", "z", ["q"], True)
    (bad / "train" / "z.json").write_text(json.dumps({"text": ["q"], "shapes": []}))
    with pytest.raises(InputError, match="is_sentence"):
        ReasonSegDataset(bad, explanatory_rate=None).get(0, np.random.default_rng(0))
