"""A run's model and tokenizer: built from its training config, or loaded from one of its checkpoints.

`build_model` makes what `Trainer` trains: a LISA folder (`model`, with `vision_tower` for the released
layout) or a random tiny LISA (`tiny_model`, whose tokenizer learns the named corpora).
`load_trained` rebuilds a run from its config.yaml exactly as trained (the same base, the same LoRA
adapters) and loads a checkpoint's weights: what training.export merges and saves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file

from lisa_core.checkpoint import from_pretrained
from lisa_core.config import LisaConfig
from lisa_core.errors import CheckpointError, ConfigurationError
from lisa_core.model import LisaModel
from lisa_core.tiny import build_tiny_tokenizer
from training.config import TrainConfig, load_config
from training.data import corpus as synthetic_corpus
from training.data.templates import template_corpus
from training.model import prepare_for_finetuning

TOKENIZER_CORPORA = {"synthetic": synthetic_corpus, "templates": template_corpus}
# accelerate saves the prepared training module, whose LisaModel sits under `model.`.
TRAINING_PREFIX = "model."


def _merge_dicts(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_tiny(spec: dict) -> tuple[LisaModel, object]:
    """A random LISA from `tiny_model`: {seed, corpus: [names], config: LisaConfig.tiny() overrides,
    seg_projection_gain, embedding_gain}.

    The tokenizer is lisa_core.tiny's, trained on the named corpora (e.g. the synthetic benchmark's
    vocabulary); `config` overrides LisaConfig.tiny() field by field (nested dicts merge);
    `seg_projection_gain` scales the initial output layer of text_hidden_fcs and `embedding_gain` the
    initial token embeddings (both default 1: the plain initialisation).
    """
    known = {"seed", "corpus", "config", "seg_projection_gain", "embedding_gain"}
    unknown = set(spec) - known
    if unknown:
        raise ConfigurationError(f"tiny_model accepts {sorted(known)}; unknown: {sorted(unknown)}")
    texts: list[str] = []
    for name in spec.get("corpus", ()):
        if name not in TOKENIZER_CORPORA:
            raise ConfigurationError(f"unknown tokenizer corpus {name!r}; known: {sorted(TOKENIZER_CORPORA)}")
        texts += TOKENIZER_CORPORA[name]()
    tokenizer = build_tiny_tokenizer(texts)
    base = LisaConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    config = LisaConfig.from_dict(_merge_dicts(base, spec.get("config", {})))
    config.language_model.vocab_size = len(tokenizer)
    config.language_model.bos_token_id = tokenizer.bos_token_id
    config.language_model.eos_token_id = tokenizer.eos_token_id
    config.language_model.pad_token_id = tokenizer.pad_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(spec.get("seed", 0)))
    try:
        model = LisaModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        # SAM's own tokens start at N(0, 1); a default-initialised projection gives [SEG] prompts of RMS
        # ~0.25, too faint for a random mask decoder to notice, which stalls training from scratch.
        seg_gain = float(spec.get("seg_projection_gain", 1.0))
        model.text_hidden_fcs[0][2].weight.mul_(seg_gain)
        model.text_hidden_fcs[0][2].bias.mul_(seg_gain)
        # At Llama's init the state that predicts [SEG] is mostly the embedding of its own token (which
        # varies with the answer template), not the query and image it should encode; smaller token
        # embeddings let the context dominate from the first step.
        model.language_model.get_input_embeddings().weight.mul_(float(spec.get("embedding_gain", 1.0)))
    return model, tokenizer


def build_model(config: TrainConfig) -> tuple[LisaModel, object]:
    """(LisaModel in fp32, tokenizer) from `config.model` or `config.tiny_model`."""
    if config.model is not None:
        return from_pretrained(config.model, vision_tower=config.vision_tower)
    if config.tiny_model is not None:
        return build_tiny(config.tiny_model)
    raise ConfigurationError("set `model` (a LISA folder) or `tiny_model` in the training config")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    folders = [p for p in (output_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(folders, key=lambda p: int(p.name.split("_")[1]))


def load_trained(run_dir: Union[str, Path], checkpoint: str = "latest") -> tuple[LisaModel, object]:
    """The model of a training run with a checkpoint's weights loaded (LoRA adapters still separate)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    if checkpoint == "latest":
        found = checkpoint_dirs(run_dir)
        if not found:
            raise CheckpointError(f"{run_dir}: no checkpoints under {run_dir / 'checkpoints'}")
        folder = found[-1]
    else:
        folder = Path(checkpoint)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"{weights}: not found (a DeepSpeed checkpoint? consolidate it with zero_to_fp32.py, or train "
            "with export_dir set)"
        )
    model, tokenizer = build_model(config)
    prepare_for_finetuning(model, config)
    state = {
        name[len(TRAINING_PREFIX):]: tensor
        for name, tensor in load_file(str(weights)).items()
        if name.startswith(TRAINING_PREFIX)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model, tokenizer
