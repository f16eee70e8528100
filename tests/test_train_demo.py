"""training.demo's shipped config: the data it trains on."""

from pathlib import Path

from training.config import load_config
from training.data import build_mixture
from training.data.synthetic import ABSENT_ANSWER


def test_demo_config_trains_on_explained_answers():
    config = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.yaml")
    assert config.finetune == "full" and config.tiny_model is not None
    dataset = build_mixture(config.datasets, config.epoch_samples, config.seed)
    answers = [answer for index in range(20) for conversation in dataset[index].conversations
               for _, answer in conversation]
    for answer in answers:
        assert answer == ABSENT_ANSWER or answer.startswith("[SEG]"), answer
    explained = [a for a in answers if a != ABSENT_ANSWER]
    assert explained and all(a.split("[SEG]")[-1].startswith(". ") and len(a.split(". ", 1)[1]) > 10
                             for a in explained)
