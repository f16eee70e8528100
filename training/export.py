"""Merge LoRA into the base model and save a folder lisa_core loads.

    python -m training.export --run runs/lisa [--checkpoint latest|PATH] --out OUT [--layout ours|official]
                              [--dtype bf16] [--vision-tower-dir CLIP_OUT]

`--run` is a training output folder (its config.yaml rebuilds the model exactly as trained: the same
base, the same LoRA adapters); the weights come from a checkpoint saved by training.train (accelerate
state, `model.safetensors`). The LoRA adapters are folded into their Linear layers (W + B A x alpha/r)
and the result is written as
- `ours` (default): lisa_config.json + model.safetensors (CLIP included) + tokenizer
  (lisa_core.checkpoint.save_pretrained);
- `official`: the released LISA layout, config.json + pytorch_model-*.bin shards + tokenizer, CLIP left
  out as in the releases, or written as its own folder with `--vision-tower-dir`
  (lisa_core.checkpoint.save_official_layout).
Either loads with `LisaPipeline.from_pretrained(OUT)` (the official layout also needs the CLIP folder).

A run trained with DeepSpeed keeps its weights in DeepSpeed's own files: set `export_dir` in the
training config (the trainer then exports from memory at the end), or consolidate the checkpoint with
DeepSpeed's zero_to_fp32.py first.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

import torch

from lisa_core.checkpoint import save_official_layout, save_pretrained
from lisa_core.errors import ConfigurationError
from lisa_core.model import LisaModel
from lisa_core.pipeline import DTYPES
from training.build import load_trained
from training.model import merge_lora

LAYOUTS = ("ours", "official")


def export_model(
    model: LisaModel,
    tokenizer,
    directory: Union[str, Path],
    *,
    layout: str = "ours",
    dtype: Optional[torch.dtype] = None,
    vision_tower_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Merge LoRA adapters into `model` (in place) and save it; returns the folder."""
    if layout not in LAYOUTS:
        raise ConfigurationError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    model = merge_lora(model).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if layout == "official":
        return save_official_layout(model, tokenizer, directory, vision_tower_dir=vision_tower_dir, dtype=dtype)
    if dtype is not None:
        model = model.to(dtype)
    return save_pretrained(model, tokenizer, directory)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Merge LoRA and save a LISA folder lisa_core loads.")
    parser.add_argument("--run", required=True, help="training output folder (holds config.yaml)")
    parser.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="ours")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="convert floating weights")
    parser.add_argument("--vision-tower-dir", default=None, help="official layout: also write CLIP here")
    args = parser.parse_args(argv)
    model, tokenizer = load_trained(args.run, args.checkpoint)
    dtype = DTYPES[args.dtype] if args.dtype else None
    out = export_model(
        model, tokenizer, args.out, layout=args.layout, dtype=dtype, vision_tower_dir=args.vision_tower_dir
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
