"""training.export: a LoRA-trained run merged and saved, then loaded back by lisa_core, gives the same masks."""

import numpy as np
import pytest
import torch

from lisa_core.checkpoint import from_pretrained
from lisa_core.pipeline import LisaPipeline
from training.collate import LisaCollator
from training.data import SyntheticReasonSeg
from training.build import load_trained
from training.export import export_model, main as export_main
from training.model import LisaForTraining, lora_module_names
from training.train import Trainer
from training.config import TrainConfig


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        tiny_model={"seed": 1, "corpus": ["synthetic"]},
        datasets=[{"type": "synthetic", "split": "train", "size": 20}],
        mixed_precision="no",
        gradient_checkpointing=False,
        batch_size=1,
        grad_accumulation=1,
        warmup_steps=0,
        max_steps=3,
        save_every=3,
        max_length=400,
        lr=5e-3,  # large enough that the adapters move visibly
        num_threads=1,
        output_dir=str(out),
    )
    Trainer(config).run()
    return out


def _eval_batch(model, tokenizer):
    samples = [SyntheticReasonSeg("val", size=3).eval_sample(i) for i in range(3)]
    samples = [s for s in samples if s.masks] or samples[:1]
    return LisaCollator(tokenizer, model.config, 512)(samples)


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_export_round_trip_through_lisa_core(trained_run, tmp_path, layout):
    model, tokenizer = load_trained(trained_run)
    assert lora_module_names(model)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in lora_b) > 1e-4  # the checkpoint holds trained adapters
    batch = _eval_batch(model, tokenizer)
    with torch.no_grad():
        expected = LisaForTraining(model.eval(), tokenizer).predict_masks(batch)

    out = tmp_path / layout
    clip_dir = tmp_path / "clip" if layout == "official" else None
    export_model(model, tokenizer, out, layout=layout, vision_tower_dir=clip_dir)
    loaded, loaded_tokenizer = from_pretrained(out, vision_tower=clip_dir)
    assert not lora_module_names(loaded)
    assert not any("lora_" in name or "base_layer" in name for name, _ in loaded.named_parameters())
    with torch.no_grad():
        got = LisaForTraining(loaded, loaded_tokenizer).predict_masks(batch)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # and the pipeline users run loads it
    pipeline = LisaPipeline.from_pretrained(out, vision_tower=clip_dir)
    result = pipeline.segment(np.zeros((64, 64, 3), np.uint8), "Which shape would roll?", max_new_tokens=4)
    assert result.image_size == (64, 64)


def test_export_command_line(trained_run, tmp_path):
    export_main(["--run", str(trained_run), "--out", str(tmp_path / "cli"), "--dtype", "bf16"])
    loaded, _ = from_pretrained(tmp_path / "cli")
    assert loaded.config.language_model.hidden_size == 64
