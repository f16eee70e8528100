"""training.sam_points and `sam_point_steps`: SAM trained on its own task (points -> mask) before LISA's."""

import json

import numpy as np
import pytest
import torch

from lisa_core.errors import ConfigurationError
from training.build import build_tiny
from training.config import TrainConfig
from training.losses import LossWeights
from training.sam_points import POINTS_MAX, point_prompt_loss, sample_points
from training.train import Trainer

RUN = {
    "tiny_model": {"seed": 0, "corpus": ["synthetic"]},
    "datasets": [{"type": "synthetic", "split": "train", "size": 50}],
    "finetune": "full",
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "batch_size": 2,
    "grad_accumulation": 1,
    "warmup_steps": 0,
    "max_length": 400,
    "lr": 3e-3,
    "num_threads": 1,
}


def test_points_lie_inside_the_mask_in_sams_frame():
    mask = torch.zeros(60, 90)
    mask[10:20, 50:70] = 1
    points = sample_points(mask, 50, (0.5, 0.5), torch.Generator().manual_seed(0))
    assert points.shape == (50, 2)
    x, y = points[:, 0] / 0.5, points[:, 1] / 0.5
    assert bool(((x >= 50) & (x < 70) & (y >= 10) & (y < 20)).all())
    assert len({tuple(p) for p in points.tolist()}) > 10  # drawn, not one pixel repeated


def test_negative_steps_are_refused():
    with pytest.raises(ConfigurationError, match="sam_point_steps"):
        TrainConfig(**RUN, sam_point_steps=-1)


def _fixed_batch(trainer):
    return trainer.collator([trainer.stream[i] for i in range(4)])


@torch.no_grad()
def _point_loss(model, batch):
    loss, _, _ = point_prompt_loss(
        model.visual_model, batch, LossWeights(), torch.Generator().manual_seed(1), model.config.sam.image_size
    )
    return float(loss)


def test_point_steps_train_sam_alone_before_lisa(tmp_path):
    config = TrainConfig(**RUN, output_dir=str(tmp_path / "run"), max_steps=1, sam_point_steps=12)
    trainer = Trainer(config)
    untrained, _ = build_tiny(config.tiny_model)
    rows = [json.loads(line) for line in (tmp_path / "run" / "sam_points.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert all(np.isfinite(row["bce"]) and 0 <= row["dice"] <= 1 for row in rows)
    trained = dict(trainer.model.named_parameters())
    changed = {name for name, value in untrained.named_parameters() if not torch.equal(value, trained[name])}
    assert changed and all(name.startswith("visual_model.") for name in changed), sorted(changed)[:5]
    assert any(".mask_decoder." in name for name in changed) and any(".image_encoder." in name for name in changed)
    batch = _fixed_batch(trainer)
    assert _point_loss(trainer.model, batch) < 0.8 * _point_loss(untrained, batch)
    assert all(p.grad is None for p in trainer.model.parameters())  # LISA's first step starts clean
    trainer.run()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_a_resumed_run_does_not_train_sam_on_points_again(tmp_path):
    first = TrainConfig(**RUN, output_dir=str(tmp_path / "run"), max_steps=1, sam_point_steps=2)
    Trainer(first).run()
    (tmp_path / "run" / "sam_points.jsonl").unlink()
    resumed = TrainConfig(**RUN, output_dir=str(tmp_path / "run"), max_steps=2, sam_point_steps=2, resume="latest")
    Trainer(resumed).run()
    assert not (tmp_path / "run" / "sam_points.jsonl").exists()


def test_one_to_points_max_points_per_mask(tmp_path):
    model, _ = build_tiny(RUN["tiny_model"])
    counts = []

    def count_points(module, args, kwargs):
        counts.append(kwargs["points"][0].shape[1])

    handle = model.visual_model.prompt_encoder.register_forward_pre_hook(count_points, with_kwargs=True)
    trainer = Trainer(TrainConfig(**RUN, output_dir=str(tmp_path / "run"), max_steps=1))
    batch = _fixed_batch(trainer)
    for seed in range(12):
        point_prompt_loss(model.visual_model, batch, LossWeights(), torch.Generator().manual_seed(seed),
                          model.config.sam.image_size)
    handle.remove()
    assert counts and set(counts) <= set(range(1, POINTS_MAX + 1)) and len(set(counts)) > 1
