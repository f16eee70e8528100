"""training.demo: the demo's data (canonical answers) and its shipped config."""

from pathlib import Path

import numpy as np

from training.config import load_config
from training.data import SyntheticReasonSeg
from training.demo import CanonicalAnswers, demo_dataset


def test_canonical_answers_keep_questions_and_masks():
    source = SyntheticReasonSeg("train", size=30, explanatory_rate=0.0)
    canonical = CanonicalAnswers(source)
    assert len(canonical) == 30 and canonical.name == "synthetic"
    seen_multi = seen_absent = False
    for index in range(30):
        original = source.get(index, np.random.default_rng(index))
        rewritten = canonical.get(index, np.random.default_rng(index))
        assert len(rewritten.masks) == len(original.masks)
        for a, b in zip(original.masks, rewritten.masks):
            assert np.array_equal(a, b)
        for conv_a, conv_b in zip(original.conversations, rewritten.conversations):
            (question_a, answer_a), (question_b, answer_b) = conv_a[0], conv_b[0]
            assert question_a == question_b
            count = answer_a.count("[SEG]")
            assert answer_b.count("[SEG]") == count
            if count == 0:
                assert answer_b == answer_a
                seen_absent = True
            elif count == 1:
                assert answer_b == "[SEG]."
            else:
                assert answer_b == ", ".join(["[SEG]"] * (count - 1)) + " and [SEG]."
                seen_multi = True
    assert seen_multi and seen_absent


def test_demo_config_builds_its_dataset():
    config = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.yaml")
    assert config.finetune == "full"
    dataset = demo_dataset(config)
    sample = dataset[0]
    assert all(answer.startswith("[SEG]") or "[SEG]" not in answer
               for conversation in sample.conversations for _, answer in conversation)
