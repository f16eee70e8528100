"""training.evaluate: gIoU/cIoU reports on small sets whose answers and masks are known."""

import json

import numpy as np
import pytest

from lisa_core.checkpoint import from_pretrained
from lisa_core.pipeline import LisaPipeline
from lisa_core.tiny import save_tiny_checkpoint
from training.data import Sample, SyntheticReasonSeg, corpus
from training.data.synthetic import is_well_formed
from training.evaluate import GroupedMeter, evaluate, evaluate_forced, main as evaluate_main, sample_groups


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0, extra_corpus=corpus())


@pytest.fixture(scope="module")
def samples():
    dataset = SyntheticReasonSeg("val", size=40)
    chosen = [dataset.eval_sample(i) for i in range(40)]
    absent = [s for s in chosen if not s.masks][:2]
    present = [s for s in chosen if s.masks][:4]
    assert len(absent) == 2 and len(present) == 4
    return present + absent


def _forced_pipeline(checkpoint, answer):
    model, tokenizer = from_pretrained(checkpoint)
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    def force(generated, logits):
        forced = logits.new_full(logits.shape, -1e9)
        forced[answer_ids[min(len(generated), len(answer_ids) - 1)]] = 0.0
        return forced

    return LisaPipeline(model, tokenizer, logits_processor=force)


def test_meter_against_hand_computed_ious():
    meter = GroupedMeter()
    gt = np.array([[1, 1, 0, 255]], dtype=np.uint8)
    # I = 1 (col 0), U = 3 (cols 0, 1, 2); col 3 is ignored though predicted
    assert meter.update(np.array([[1, 0, 1, 1]], bool), gt, ["short"]) == pytest.approx(1 / 3)
    # empty prediction on an empty ground truth: IoU 1, adds nothing to cIoU
    assert meter.update(np.zeros((1, 4), bool), np.zeros((1, 4), np.uint8), ["long"]) == 1.0
    # I = 2, U = 2
    assert meter.update(np.array([[1, 1, 0, 0]], bool), gt, ["long"]) == 1.0
    report = meter.summary()
    assert report["gIoU"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert report["cIoU"] == pytest.approx((1 + 0 + 2) / (3 + 0 + 2))
    assert report["queries"] == 3
    assert report["groups"]["short"]["gIoU"] == pytest.approx(1 / 3)
    assert report["groups"]["long"]["gIoU"] == pytest.approx(1.0)
    assert report["groups"]["long"]["cIoU"] == pytest.approx(1.0)


def test_generation_without_seg_scores_only_absent_queries(checkpoint, samples):
    pipeline = _forced_pipeline(checkpoint, "There is no such object in the image.")
    report = evaluate(pipeline, {"val": samples}, modes=("generation",))["val"]["generation"]
    assert report["queries"] == 6
    assert report["gIoU"] == pytest.approx(2 / 6)  # the two absent queries score 1, the rest 0
    assert report["cIoU"] == 0.0
    assert report["seg_count_accuracy"] == pytest.approx(2 / 6)
    assert report["absent_accuracy"] == 1.0
    assert report["groups"]["absent"] == {"gIoU": 1.0, "cIoU": 1.0, "queries": 2}


def test_generation_of_seg_equals_the_forced_protocol(checkpoint, samples):
    """Generating exactly "[SEG]." reads the same [SEG] state as feeding "[SEG]." in one pass."""
    pipeline = _forced_pipeline(checkpoint, "[SEG].")
    report = evaluate(pipeline, {"val": samples}, modes=("generation", "forced"), batch_size=4)["val"]
    generation, forced = report["generation"], report["forced"]
    assert generation["gIoU"] == pytest.approx(forced["gIoU"], abs=1e-3)
    assert generation["cIoU"] == pytest.approx(forced["cIoU"], abs=1e-3)
    # by hand: IoU of each [SEG] mask against the union ground truth, 255 ignored
    ious = []
    for sample in samples:
        result = pipeline.segment(sample.image, sample.conversations[0][0][0])
        prediction, truth = result.union_mask, sample.query_ground_truth(0)
        valid = truth != 255
        inter = np.count_nonzero(prediction & (truth == 1) & valid)
        union = np.count_nonzero((prediction | (truth == 1)) & valid)
        ious.append(1.0 if union == 0 else inter / union)
    assert generation["gIoU"] == pytest.approx(float(np.mean(ious)))


def test_forced_mode_batches_do_not_change_results(checkpoint, samples):
    model, tokenizer = from_pretrained(checkpoint)
    one = evaluate_forced(model, tokenizer, samples, batch_size=1)
    many = evaluate_forced(model, tokenizer, samples, batch_size=6)
    assert one["gIoU"] == pytest.approx(many["gIoU"], abs=1e-6)
    assert one["cIoU"] == pytest.approx(many["cIoU"], abs=1e-6)


def test_reason_seg_groups_are_short_and_long():
    image = np.zeros((4, 4, 3), np.uint8)
    long_query = Sample(image, [[("q", "[SEG].")]], [np.zeros((4, 4), np.uint8)], "reason_seg", {"is_sentence": True})
    short_query = Sample(image, [[("q", "[SEG].")]], [np.zeros((4, 4), np.uint8)], "reason_seg", {"is_sentence": False})
    assert sample_groups(long_query) == ["long"] and sample_groups(short_query) == ["short"]
    assert sample_groups(SyntheticReasonSeg("test", size=1).eval_sample(0))[0] in (
        "attribute", "size", "relation", "function", "multiple", "absent")


def test_command_line_writes_a_json_report(checkpoint, tmp_path):
    out = tmp_path / "report.json"
    evaluate_main(["--model", str(checkpoint), "--splits", "val", "test", "--limit", "3",
                   "--max-new-tokens", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["splits"]) == {"val", "test"}
    for split in ("val", "test"):
        assert set(report["splits"][split]) == {"generation", "forced"}
        assert report["splits"][split]["forced"]["queries"] == 3
        assert 0.0 <= report["splits"][split]["generation"]["gIoU"] <= 1.0


def test_generation_reports_well_formed_answers_and_confidence_ranks(checkpoint, samples):
    absent = _forced_pipeline(checkpoint, "There is no such object in the image.")
    report = evaluate(absent, {"val": samples}, modes=("generation",), answer_check=is_well_formed)["val"]["generation"]
    assert report["well_formed"] == 1.0 and report["targets"] == 0 and report["confidence_iou_spearman"] is None
    broken = _forced_pipeline(checkpoint, "[SEG]. The red circle would fly because it is round.")
    report = evaluate(broken, {"val": samples}, modes=("generation",), answer_check=is_well_formed)["val"]["generation"]
    assert report["well_formed"] == 0.0 and report["targets"] == len(samples)
    low, high = report["confidence_range"]
    assert 0.0 <= low <= high <= 1.0
    assert evaluate(broken, {"val": samples}, modes=("generation",))["val"]["generation"]["well_formed"] is None


def test_min_confidence_leaves_out_targets_as_the_node_does(checkpoint, samples):
    broken = _forced_pipeline(checkpoint, "[SEG]. The red circle would fly because it is round.")
    report = evaluate(broken, {"val": samples}, modes=("generation",), answer_check=is_well_formed)["val"]["generation"]
    low, high = report["confidence_range"]
    assert report["absent_accuracy"] == 0.0  # one mask for every query, the absent ones too
    kept = evaluate(broken, {"val": samples}, modes=("generation",), answer_check=is_well_formed,
                    min_confidence=low)["val"]["generation"]
    assert kept["targets"] == report["targets"] and kept["gIoU"] == report["gIoU"]
    assert high < 1.0  # the tiny model's IoU head: a threshold above every target exists
    none = evaluate(broken, {"val": samples}, modes=("generation",), answer_check=is_well_formed,
                    min_confidence=high + 1e-6)["val"]["generation"]
    assert none["targets"] == 0 and none["absent_accuracy"] == 1.0
    assert none["well_formed"] == report["well_formed"]  # judged on the [SEG]s written, not the masks kept


def test_command_line_refuses_a_min_confidence_outside_0_to_1(checkpoint, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--model", str(checkpoint), "--min-confidence", "1.5"])
    assert "--min-confidence must lie in [0, 1]" in capsys.readouterr().err
