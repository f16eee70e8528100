"""Training configuration: the official LISA recipe as defaults, overridable by YAML and the CLI.

Precedence: dataclass defaults < YAML file (`--config file.yaml`) < `--set key=value` on the command
line (values are parsed as YAML, so `--set lr=1e-4`, `--set finetune=full`,
`--set "lora_target_modules=[q_proj, v_proj]"` all work). Unknown keys are refused with the list of
known ones.

Defaults (train_ds.py of the official code and the paper):
- LoRA r=8, alpha=16, dropout 0.05 on the language model's q_proj and v_proj only; CLIP has modules of
  the same names, so LoRA targets are matched by a regular expression on the full module name
  (`lora_target_regex`), not by a plain list of names.
- Also trained in full: lm_head, embed_tokens, the SAM mask decoder, text_hidden_fcs
  (`trainable_modules`, matched as substrings of parameter names). Everything else is frozen: CLIP,
  mm_projector, the SAM image and prompt encoders, the language model's other weights.
- `finetune: full` trains every parameter except those named in `frozen_modules_full` (by default
  nothing is frozen): this is what a model trained from random weights (the demo) needs.
- AdamW lr 3e-4, betas (0.9, 0.95), weight decay 0; 100 linear warm-up steps then linear decay to 0 at
  `max_steps`; gradient clipping 1.0; bf16; micro-batch 2 per process x 10 accumulation; 5000
  optimizer steps; gradient checkpointing; loss 1 CE + 2 BCE + 0.5 DICE.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from lisa_core.errors import ConfigurationError

# Matches q_proj / v_proj inside the language model's decoder layers only (not CLIP's encoder layers,
# not SAM). Module names look like `...language_model...layers.3.self_attn.q_proj`.
LANGUAGE_MODEL_QV_REGEX = r".*language_model.*\.layers\.\d+\.self_attn\.(q_proj|v_proj)$"


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------------------------------
    model: Optional[str] = None  # a folder lisa_core loads (ours or the official layout)
    vision_tower: Optional[str] = None  # CLIP folder, for official checkpoints that lack it
    tiny_model: Optional[dict] = None  # build a random model with lisa_core.tiny instead (the demo)
    finetune: str = "lora"  # "lora" (the recipe) or "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_regex: str = LANGUAGE_MODEL_QV_REGEX
    trainable_modules: list = field(
        default_factory=lambda: ["lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs"]
    )
    frozen_modules_full: list = field(default_factory=list)
    gradient_checkpointing: bool = True

    # --- data ------------------------------------------------------------------------------------
    datasets: list = field(default_factory=list)  # entries for training.data.build_mixture
    epoch_samples: int = 80000  # mixture items per epoch (official: 500 steps x 2 x 10 x 8 GPUs)
    max_length: int = 512  # tokens per sample; longer conversations are cut (answers last)
    num_workers: int = 0

    # --- optimisation ----------------------------------------------------------------------------
    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    max_steps: int = 5000  # optimizer steps
    grad_clip: float = 1.0
    batch_size: int = 2  # samples per process per micro-batch
    grad_accumulation: int = 10
    mixed_precision: str = "bf16"  # "no", "bf16" or "fp16" (accelerate's names)
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    iou_weight: float = 0.0  # SAM's IoU-prediction head (training.losses); the official recipe leaves it untrained
    appearance_weight: float = 0.0  # per-pixel shape and colour classes from SAM's embedding (synthetic data; training.losses)
    seed: int = 0

    # --- engine ----------------------------------------------------------------------------------
    cpu: bool = False  # force the CPU even where a GPU exists
    deepspeed_zero_stage: Optional[int] = None  # 2 = the recipe's DeepSpeed ZeRO-2; None = DDP
    deepspeed_config: Optional[str] = None  # a full DeepSpeed JSON instead of the stage alone
    num_threads: Optional[int] = None  # torch.set_num_threads on the CPU

    # --- output ----------------------------------------------------------------------------------
    output_dir: str = "runs/lisa"
    log_every: int = 1  # optimizer steps between metric lines
    save_every: int = 500  # optimizer steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    export_dir: Optional[str] = None  # merged model folder written at the end, if set

    def __post_init__(self) -> None:
        # PyYAML reads "1e-4" (no dot) as a string: convert numbers by the field's declared type.
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
                setattr(self, item.name, _number(item.name, value, float))
            elif item.type in ("int", "Optional[int]") and isinstance(value, str):
                setattr(self, item.name, _number(item.name, value, int))
        self.betas = tuple(_number("betas", beta, float) for beta in self.betas)
        self.validate()

    def validate(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ConfigurationError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigurationError(
                f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}"
            )
        if self.model is not None and self.tiny_model is not None:
            raise ConfigurationError("set either model (a folder) or tiny_model, not both")
        for name in ("batch_size", "grad_accumulation", "max_steps", "log_every", "save_every", "epoch_samples"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigurationError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2:
            raise ConfigurationError(f"betas must have two values, got {self.betas}")
        if self.deepspeed_zero_stage not in (None, 0, 1, 2, 3):
            raise ConfigurationError(f"deepspeed_zero_stage must be 0-3, got {self.deepspeed_zero_stage}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"{name} must be a {kind.__name__}, got {value!r}") from error


def known_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_keys(values: dict, source: str) -> None:
    unknown = sorted(set(values) - set(known_keys()))
    if unknown:
        raise ConfigurationError(f"unknown config keys in {source}: {unknown}; known keys: {known_keys()}")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["lr=1e-4", "finetune=full"]` -> {"lr": 1e-4, "finetune": "full"} (values parsed as YAML)."""
    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigurationError(f"override {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw)
    _check_keys(values, "--set")
    return values


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file at `path` (if any), then the `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
        _check_keys(loaded, str(path))
        values.update(loaded)
    values.update(parse_overrides(overrides))
    return TrainConfig(**values)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key (repeatable); the value is parsed as YAML",
    )
