"""training.config and training.train: the recipe defaults, overrides, schedule, data order, resume."""

import json

import numpy as np

import pytest
import torch
from safetensors.torch import load_file

from lisa_core.errors import ConfigurationError
from training.config import LANGUAGE_MODEL_QV_REGEX, TrainConfig, load_config
from training.train import ProcessBatchSampler, Trainer, deepspeed_config, warmup_linear_decay

TINY_RUN = {
    "tiny_model": {"seed": 0, "corpus": ["synthetic"]},
    "datasets": [{"type": "synthetic", "split": "train", "size": 50}],
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "batch_size": 1,
    "grad_accumulation": 2,
    "warmup_steps": 1,
    "max_length": 400,
    "lr": 1e-3,
    "num_threads": 1,
}


def test_defaults_are_the_official_recipe():
    config = TrainConfig()
    assert (config.finetune, config.lora_r, config.lora_alpha, config.lora_dropout) == ("lora", 8, 16, 0.05)
    assert set(config.trainable_modules) == {"lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs"}
    assert (config.lr, config.betas, config.weight_decay) == (3e-4, (0.9, 0.95), 0.0)
    assert (config.warmup_steps, config.max_steps, config.grad_clip) == (100, 5000, 1.0)
    assert (config.batch_size, config.grad_accumulation, config.mixed_precision) == (2, 10, "bf16")
    assert config.gradient_checkpointing is True
    assert (config.ce_weight, config.bce_weight, config.dice_weight) == (1.0, 2.0, 0.5)
    import re

    pattern = re.compile(LANGUAGE_MODEL_QV_REGEX)
    assert pattern.fullmatch("language_model.model.layers.11.self_attn.q_proj")
    assert pattern.fullmatch("language_model.model.layers.0.self_attn.v_proj")
    assert not pattern.fullmatch("language_model.model.layers.0.self_attn.k_proj")
    assert not pattern.fullmatch("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("visual_model.mask_decoder.transformer.layers.0.self_attn.q_proj")


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nbatch_size: 4\nfinetune: full\n")
    config = load_config(path, ["batch_size=8", "betas=[0.8, 0.99]"])
    assert config.lr == pytest.approx(1e-4) and isinstance(config.lr, float)
    assert config.batch_size == 8
    assert config.finetune == "full"
    assert config.betas == (0.8, 0.99)
    with pytest.raises(ConfigurationError, match="unknown config keys"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ConfigurationError, match="finetune"):
        load_config(None, ["finetune=qlora"])
    with pytest.raises(ConfigurationError, match="lr must be a float"):
        load_config(None, ["lr=fast"])


def test_warmup_then_linear_decay():
    factor = warmup_linear_decay(100, 5000)
    assert factor(0) == 0.0
    assert factor(50) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(1.0)
    assert factor(2550) == pytest.approx(0.5)
    assert factor(5000) == 0.0


def test_deepspeed_zero2_config_follows_the_training_config():
    assert deepspeed_config(TrainConfig()) is None
    ds = deepspeed_config(TrainConfig(deepspeed_zero_stage=2))
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 10
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_micro_batches_are_dealt_to_processes_in_turn():
    def first(sampler, count):
        iterator = iter(sampler)
        return [next(iterator) for _ in range(count)]

    assert first(ProcessBatchSampler(2, 0, 1), 3) == [[0, 1], [2, 3], [4, 5]]
    assert first(ProcessBatchSampler(2, 0, 2), 2) == [[0, 1], [4, 5]]
    assert first(ProcessBatchSampler(2, 1, 2), 2) == [[2, 3], [6, 7]]
    # resuming after 3 consumed micro-batches: process 1 continues at global batch 3, process 0 at 4
    assert first(ProcessBatchSampler(2, 1, 2, start_batch=3), 1) == [[6, 7]]
    assert first(ProcessBatchSampler(2, 0, 2, start_batch=3), 1) == [[8, 9]]


def _config(tmp_path, name, **overrides):
    return TrainConfig(**{**TINY_RUN, "output_dir": str(tmp_path / name), **overrides})


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    config = _config(tmp_path, "run", max_steps=6, save_every=3, finetune="full", lr=3e-3)
    Trainer(config).run()
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["lr"] == pytest.approx(3e-3)  # after the one warm-up step
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]
    assert load_config(out / "config.yaml").max_steps == 6


def test_resume_gives_identical_next_steps(tmp_path):
    # LoRA dropout stays on: resuming must restore the random state too.
    straight = _config(tmp_path, "straight", max_steps=4, save_every=2)
    Trainer(straight).run()
    resumed = _config(tmp_path, "resumed", max_steps=4, save_every=2,
                      resume=str(tmp_path / "straight" / "checkpoints" / "step_2"))
    Trainer(resumed).run()
    rows_straight = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rows_resumed = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_resumed] == [3, 4]
    for a, b in zip(rows_straight[2:], rows_resumed):
        for key in ("loss", "ce", "bce", "dice", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    final_straight = _weights(tmp_path / "straight" / "checkpoints" / "step_4")
    final_resumed = _weights(tmp_path / "resumed" / "checkpoints" / "step_4")
    assert final_straight.keys() == final_resumed.keys()
    for name in final_straight:
        torch.testing.assert_close(final_straight[name], final_resumed[name], rtol=0, atol=1e-6, msg=name)
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state == {"step": 4, "micro_batches": 8}


def test_missing_data_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="datasets"):
        Trainer(_config(tmp_path, "none", datasets=[], max_steps=1))


@pytest.mark.parametrize("name", ["lisa_7b_reason_seg.yaml", "demo.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / name)
    assert config.datasets


def test_gradient_checkpointing_gives_the_same_gradients():
    import numpy as np

    from training.collate import LisaCollator
    from training.data import SyntheticReasonSeg
    from training.model import LisaForTraining, enable_gradient_checkpointing
    from training.build import build_tiny

    model, tokenizer = build_tiny({"seed": 0, "corpus": ["synthetic"]})
    samples = [SyntheticReasonSeg("train", size=4).get(i, np.random.default_rng(i)) for i in range(2)]
    batch = LisaCollator(tokenizer, model.config, 400)(samples)
    module = LisaForTraining(model.train(), tokenizer)

    def gradients():
        model.zero_grad()
        losses = module(batch)
        losses["loss"].backward()
        return float(losses["loss"].detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = gradients()
    enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.language_model.modules())
    checkpointed_loss, checkpointed = gradients()
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path):
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process; other tests in this session set mixed_precision="no".
    AcceleratorState._reset_state(reset_partial_state=True)
    rows_path = tmp_path / "bf16" / "metrics.jsonl"
    try:
        Trainer(_config(tmp_path, "bf16", mixed_precision="bf16", max_steps=2, save_every=2)).run()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(row["loss"]) for row in rows)
