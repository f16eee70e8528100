"""What a model's [SEG] prompt encodes: the share of its variance that follows the question template,
the queried colour and the image, on the synthetic benchmark.

    python -m training.probe --model models/demo [--images 8]

For every image x short question template x colour, the question "<template> <colour> shape" is answered
with "[SEG]." by teacher forcing, and the [SEG] state is projected into SAM's prompt space (what SAM
receives). Each factor's share is the variance of the prompts averaged over the other two factors,
divided by the total variance (the main effects of a three-factor layout; a share near 1 means the
prompt follows that factor alone). A model that segments by colour needs a large colour share; a prompt that follows the template
gives SAM the phrasing instead of the target (models/demo/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import numpy as np
import torch

from lisa_core.pipeline import LisaPipeline
from training.collate import LisaCollator
from training.data.sample import Sample
from training.data.synthetic import COLOURS, SyntheticReasonSeg
from training.data.templates import EVAL_ANSWER, SHORT_QUESTION_TEMPLATES
from training.model import LisaForTraining


@torch.no_grad()
def seg_prompts(pipeline: LisaPipeline, images: list[np.ndarray]) -> np.ndarray:
    """Projected [SEG] prompts (images, templates, colours, prompt_dim)."""
    model, tokenizer = pipeline.model, pipeline.tokenizer
    collator = LisaCollator(tokenizer, model.config, max_length=512)
    module = LisaForTraining(model, tokenizer)
    prompts = np.zeros((len(images), len(SHORT_QUESTION_TEMPLATES), len(COLOURS), model.config.out_dim))
    for i, image in enumerate(images):
        placeholder = np.zeros(image.shape[:2], dtype=np.uint8)
        for t, template in enumerate(SHORT_QUESTION_TEMPLATES):
            samples = [Sample(image, [[(template.format(name=f"{colour} shape"), EVAL_ANSWER)]], [placeholder],
                              "probe", {}) for colour in COLOURS]
            batch = collator(samples).to(next(model.parameters()).device)
            hidden, _ = module.language_outputs(batch)
            states, _ = module.seg_states(batch.input_ids, hidden)
            prompts[i, t] = model.project_seg(states).float().cpu().numpy()
    return prompts


def variance_shares(prompts: np.ndarray) -> dict[str, float]:
    """{"image", "template", "colour"}: each factor's share of the total variance of `prompts`."""
    total = prompts.reshape(-1, prompts.shape[-1]).var(axis=0).sum()
    if total == 0:
        raise ValueError("the [SEG] prompts do not vary at all")
    shares = {}
    for name, axis in (("image", 0), ("template", 1), ("colour", 2)):
        others = tuple(a for a in range(3) if a != axis)
        shares[name] = float(prompts.mean(axis=others).var(axis=0).sum() / total)
    return shares


def probe(pipeline: LisaPipeline, num_images: int = 8, seed: int = 0) -> dict[str, float]:
    scenes = SyntheticReasonSeg("val", seed=seed, size=num_images)
    return variance_shares(seg_prompts(pipeline, [scenes.scene(i).image for i in range(num_images)]))


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder lisa_core loads")
    parser.add_argument("--images", type=int, default=8, help="validation scenes to use")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shares = probe(LisaPipeline.from_pretrained(args.model), args.images)
    print(json.dumps({name: round(value, 3) for name, value in shares.items()}))
    return shares


if __name__ == "__main__":
    main()
