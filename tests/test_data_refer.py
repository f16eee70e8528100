"""refCOCO-family reader on small files written in the refer layout (refs(unc).p + instances.json)."""

import json
import os
import pickle

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from lisa_core.errors import InputError
from training.data import templates
from training.data.refer import ReferDataset, annotation_mask, load_refs, ref_in_split

HEIGHT, WIDTH = 10, 12


def polygon_mask():
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[2:6, 2:8] = 1  # COCO rasterises the polygon (2,2)-(8,6) to rows 2-5, columns 2-7
    return mask


def rle_mask():
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[7:9, 1:4] = 1
    mask[0, 10:12] = 1
    return mask


def uncompressed_counts(mask):
    """COCO's uncompressed RLE: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def write_refer(root, dataset="refcoco", split_by="unc"):
    data_dir = root / dataset
    data_dir.mkdir(parents=True)
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True)
    for name in ("COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"):
        cv2.imwrite(str(image_dir / name), np.full((HEIGHT, WIDTH, 3), 90, dtype=np.uint8))
    compressed = coco_mask.encode(np.asfortranarray(rle_mask()))
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": HEIGHT, "width": WIDTH},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": HEIGHT, "width": WIDTH},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]], "bbox": [2, 2, 6, 4]},
            {"id": 11, "image_id": 1, "category_id": 2,
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": compressed["counts"].decode()}, "bbox": [1, 0, 11, 9]},
            {"id": 12, "image_id": 2, "category_id": 2,
             "segmentation": {"size": [HEIGHT, WIDTH], "counts": uncompressed_counts(rle_mask())}, "bbox": [1, 0, 11, 9]},
            {"id": 13, "image_id": 2, "category_id": 1, "segmentation": [], "bbox": [0, 0, 1, 1]},
        ],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "plate"}],
    }
    (data_dir / "instances.json").write_text(json.dumps(instances))
    refs = [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "category_id": 1, "split": "train",
         "sentences": [{"sent": "Left Cup ", "sent_id": 0, "tokens": ["left", "cup"], "raw": "Left Cup"},
                       {"sent": "the cup near the edge", "sent_id": 1, "tokens": [], "raw": ""}]},
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "category_id": 2, "split": "train",
         "sentences": [{"sent": "white plate", "sent_id": 2, "tokens": [], "raw": ""},
                       {"sent": "plate at the bottom", "sent_id": 3, "tokens": [], "raw": ""}]},
        {"ref_id": 2, "ann_id": 12, "image_id": 2, "category_id": 2, "split": "testA",
         "sentences": [{"sent": "the plate", "sent_id": 4, "tokens": [], "raw": ""}]},
        {"ref_id": 3, "ann_id": 13, "image_id": 2, "category_id": 1, "split": "val",
         "sentences": [{"sent": "nothing", "sent_id": 5, "tokens": [], "raw": ""}]},
    ]
    with open(data_dir / f"refs({split_by}).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    return refs


@pytest.fixture
def refer_root(tmp_path):
    root = tmp_path / "refer_seg"
    write_refer(root)
    return root


def test_annotation_masks_polygon_compressed_and_uncompressed_rle():
    polygon = {"segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]}
    np.testing.assert_array_equal(annotation_mask(polygon, HEIGHT, WIDTH), polygon_mask())
    compressed = coco_mask.encode(np.asfortranarray(rle_mask()))
    as_text = {"segmentation": {"size": [HEIGHT, WIDTH], "counts": compressed["counts"].decode()}}
    np.testing.assert_array_equal(annotation_mask(as_text, HEIGHT, WIDTH), rle_mask())
    as_list = {"segmentation": {"size": [HEIGHT, WIDTH], "counts": uncompressed_counts(rle_mask())}}
    np.testing.assert_array_equal(annotation_mask(as_list, HEIGHT, WIDTH), rle_mask())
    assert not annotation_mask({"segmentation": []}, HEIGHT, WIDTH).any()
    # two overlapping polygon parts stay binary
    two_parts = {"segmentation": [[2, 2, 8, 2, 8, 6, 2, 6], [2, 2, 8, 2, 8, 6, 2, 6]]}
    assert annotation_mask(two_parts, HEIGHT, WIDTH).max() == 1


def test_load_refs_reads_plain_pickles_of_both_protocols(tmp_path, refer_root):
    refs = load_refs(refer_root / "refcoco" / "refs(unc).p")
    assert [r["ref_id"] for r in refs] == [0, 1, 2, 3]
    path = tmp_path / "refs0.p"
    path.write_bytes(pickle.dumps([{"ref_id": 5, "tags": {1, 2}, "box": (1.0, 2.0)}], protocol=0))
    assert load_refs(path) == [{"ref_id": 5, "tags": {1, 2}, "box": (1.0, 2.0)}]


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_load_refs_refuses_pickles_that_would_run_code(tmp_path):
    path = tmp_path / "evil.p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _RunsCode()}]))
    with pytest.raises(InputError, match="refusing to load .*getcwd"):
        load_refs(path)
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(InputError, match="list of dicts"):
        load_refs(path)


def test_split_rule():
    assert ref_in_split({"split": "testA"}, "testA") and ref_in_split({"split": "testAB"}, "testB")
    assert ref_in_split({"split": "testB"}, "test") and not ref_in_split({"split": "testB"}, "train")
    assert ref_in_split({"split": "val"}, "val") and not ref_in_split({"split": "train"}, "val")


def test_training_samples_pair_each_sentence_with_its_mask(refer_root):
    dataset = ReferDataset(refer_root, "refcoco", split="train")
    assert len(dataset) == 1  # only image 1 has train refs
    expected = {"Left Cup": polygon_mask(), "the cup near the edge": polygon_mask(),
                "white plate": rle_mask(), "plate at the bottom": rle_mask()}
    sample = dataset.get(0, np.random.default_rng(0))
    assert sample.source == "refcoco" and len(sample.conversations) == 3 and len(set(sample.meta["queries"])) == 3
    for query, conversation, mask in zip(sample.meta["queries"], sample.conversations, sample.masks):
        (question, answer), = conversation
        assert question in [t.format(name=query.lower()) for t in templates.SHORT_QUESTION_TEMPLATES]
        assert answer in templates.ANSWER_TEMPLATES
        np.testing.assert_array_equal(mask, expected[query])


def test_test_split_and_eval_sample(refer_root):
    dataset = ReferDataset(refer_root, "refcoco", split="testA")
    sample = dataset.eval_sample(0)
    assert sample.conversations == [
        [("What is the plate in this image? Please output segmentation mask.", "[SEG].")]
    ]
    np.testing.assert_array_equal(sample.masks[0], rle_mask())


def test_grefcoco_style_lists_of_annotations(tmp_path):
    root = tmp_path / "refer_seg"
    refs = write_refer(root, dataset="grefcoco")
    refs[0]["ann_id"] = [10, 11]
    refs[1]["ann_id"] = [-1]
    with open(root / "grefcoco" / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle)
    dataset = ReferDataset(root, "grefcoco", split="train")
    sample = dataset.eval_sample(0)
    by_query = dict(zip(sample.meta["queries"], sample.masks))
    np.testing.assert_array_equal(by_query["left cup"], polygon_mask() | rle_mask())
    assert not by_query["white plate"].any()


def test_refcocog_defaults_to_umd_and_missing_files_are_named(tmp_path):
    write_refer(tmp_path, dataset="refcocog", split_by="umd")
    assert len(ReferDataset(tmp_path, "refcocog", split="train")) == 1
    with pytest.raises(InputError, match=r"refs\(unc\)\.p"):
        ReferDataset(tmp_path, "refcocog", split_by="unc")
    with pytest.raises(InputError, match="no refs in split"):
        ReferDataset(tmp_path, "refcocog", split="testC")
