"""The appearance loss: per-pixel shape and colour classes of synthetic scenes, placed as SAM sees the
image, predicted from SAM's embedding; training-only, left out of the exported model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lisa_core.errors import ConfigurationError, InputError
from lisa_core.preprocess import sam_resized_shape
from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer
from training.collate import IGNORE_INDEX, LisaCollator
from training.config import TrainConfig
from training.data import Sample, corpus
from training.data.sample import APPEARANCE_KEY, IGNORE_LABEL
from training.data.synthetic import APPEARANCE_CLASSES, COLOURS, SHAPES, UNNAMED, SyntheticReasonSeg
from training.losses import LossWeights, appearance_cross_entropy
from training.model import LisaForTraining, prepare_for_finetuning
from training.train import Trainer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(corpus())


@pytest.fixture()
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


def _scene_dataset():
    return SyntheticReasonSeg(split="train", size=8, seed=0, aspect_ratios=("16:9",), unnamed_colour_rate=0.5)


def test_synthetic_samples_label_every_object_pixel_with_its_shape_and_colour():
    dataset = _scene_dataset()
    seen_unnamed = False
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        labels = dataset.get(index, np.random.default_rng(index)).meta[APPEARANCE_KEY]
        assert labels.shape == (2, *scene.image.shape[:2]) and labels.dtype == np.uint8
        covered = np.zeros(scene.image.shape[:2], bool)
        for obj, mask in zip(scene.objects, scene.masks):
            inside = mask == 1
            covered |= inside
            assert (labels[0][inside] == SHAPES.index(obj.shape) + 1).all()
            colour = IGNORE_LABEL if obj.colour == UNNAMED else list(COLOURS).index(obj.colour) + 1
            assert (labels[1][inside] == colour).all()
            seen_unnamed |= obj.colour == UNNAMED
        assert (labels[:, ~covered] == 0).all()
    assert seen_unnamed


def test_collator_places_the_maps_as_sam_places_the_image(tokenizer, model):
    sample = _scene_dataset().get(0, np.random.default_rng(0))
    size = model.config.sam.image_size
    batch = LisaCollator(tokenizer, model.config, 512, appearance_maps=2)([sample])
    assert batch.appearance.shape == (1, 2, size, size) and batch.appearance.dtype == torch.long
    new_h, new_w = sam_resized_shape(*sample.image.shape[:2], size)
    assert new_h < size  # a 16:9 frame leaves SAM's input padded below it
    assert (batch.appearance[0, :, new_h:] == IGNORE_INDEX).all()
    inside = batch.appearance[0, :, :new_h, :new_w]
    shapes = set(inside[0].unique().tolist())
    expected = {0} | {SHAPES.index(o.shape) + 1 for o in _scene_dataset().scene(0).objects}
    assert shapes == expected
    assert LisaCollator(tokenizer, model.config, 512)([sample]).appearance is None
    other = Sample(sample.image, sample.conversations, sample.masks, "refcoco")
    assert (LisaCollator(tokenizer, model.config, 512, appearance_maps=2)([other]).appearance == IGNORE_INDEX).all()
    wrong = Sample(sample.image, sample.conversations, sample.masks, "synthetic", {APPEARANCE_KEY: sample.meta[APPEARANCE_KEY][:1]})
    with pytest.raises(InputError, match="appearance maps are"):
        LisaCollator(tokenizer, model.config, 512, appearance_maps=2)([wrong])


def test_cross_entropy_is_the_mean_over_labelled_pixels_of_each_map():
    labels = torch.full((1, 2, 4, 4), IGNORE_INDEX)
    labels[0, 0, :2] = 1
    logits = (torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
    loss = appearance_cross_entropy(logits, labels)  # the second map has no labelled pixel: it adds 0
    assert loss.item() == pytest.approx(np.log(3), rel=1e-6)
    confident = torch.zeros(1, 3, 4, 4)
    confident[:, 1] = 20.0
    assert appearance_cross_entropy((confident, logits[1]), labels).item() < 1e-6


def test_appearance_loss_trains_the_sam_encoder_and_stays_out_of_the_exported_model(tokenizer, model):
    prepare_for_finetuning(model, TrainConfig(finetune="full"))
    sample = _scene_dataset().get(0, np.random.default_rng(0))
    batch = LisaCollator(tokenizer, model.config, 512, appearance_maps=2)([sample])
    module = LisaForTraining(model.train(), tokenizer, LossWeights(appearance=0.5), APPEARANCE_CLASSES)
    losses = module(batch)
    assert losses["appearance"].item() > 0
    total = losses["ce"] + losses["bce"] + losses["dice"] + losses["iou"] + losses["appearance"]
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    losses["appearance"].backward()
    assert module.appearance_head.classifier.weight.grad.abs().sum() > 0
    patch_embed = model.visual_model.image_encoder.patch_embed.proj.weight
    assert patch_embed.grad is not None and patch_embed.grad.abs().sum() > 0
    assert not any(name.startswith("appearance") for name in model.state_dict())
    with pytest.raises(ConfigurationError, match="class count"):
        LisaForTraining(model, tokenizer, LossWeights(appearance=0.5))
    without_maps = LisaCollator(tokenizer, model.config, 512)([sample])
    with pytest.raises(InputError, match="appearance maps"):
        module(without_maps)


def test_trainer_logs_the_appearance_term_and_exports_without_its_head(tmp_path):
    config = TrainConfig(
        tiny_model={"seed": 0, "corpus": ["synthetic"]},
        datasets=[{"type": "synthetic", "split": "train", "size": 20}],
        mixed_precision="no", gradient_checkpointing=False, batch_size=2, warmup_steps=1, max_length=400,
        num_threads=1, max_steps=2, finetune="full", appearance_weight=1.0,
        output_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "model"),
    )
    Trainer(config).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["appearance"] > 0 for row in rows)
    checkpoint = load_file(str(tmp_path / "run" / "checkpoints" / "step_2" / "model.safetensors"))
    assert any(name.startswith("appearance_head.") for name in checkpoint)
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not any("appearance" in name for name in exported)
