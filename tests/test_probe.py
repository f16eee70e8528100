"""training.probe: variance shares of the [SEG] prompt, on constructed prompts and the shipped model."""

from pathlib import Path

import numpy as np
import pytest

from training.probe import main, variance_shares

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"


def test_shares_of_additive_factors():
    rng = np.random.default_rng(0)
    image, template, colour = rng.normal(size=(8, 1, 1, 5)), rng.normal(size=(1, 4, 1, 5)), rng.normal(size=(1, 1, 6, 5))
    image, template, colour = (f - f.mean(axis=tuple(range(3)), keepdims=True) for f in (image, template, colour))
    prompts = 1.0 * image + 2.0 * template + 3.0 * colour + np.zeros((8, 4, 6, 5))
    total = sum(w ** 2 * f.reshape(-1, 5).var(axis=0).sum() for w, f in ((1, image), (2, template), (3, colour)))
    shares = variance_shares(prompts)
    assert shares["image"] == pytest.approx(image.reshape(-1, 5).var(axis=0).sum() / total)
    assert shares["template"] == pytest.approx(4 * template.reshape(-1, 5).var(axis=0).sum() / total)
    assert shares["colour"] == pytest.approx(9 * colour.reshape(-1, 5).var(axis=0).sum() / total)
    assert sum(shares.values()) == pytest.approx(1.0)
    only_colour = variance_shares(colour + np.zeros((8, 4, 6, 5)))
    assert only_colour["colour"] == pytest.approx(1.0) and only_colour["template"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="do not vary"):
        variance_shares(np.ones((2, 4, 6, 3)))


def test_shipped_model_prompts_follow_the_colour_not_the_template():
    shares = main(["--model", str(DEMO_MODEL), "--images", "4", "--threads", "1"])
    assert shares["colour"] > 0.5 and shares["template"] < 0.1, shares
