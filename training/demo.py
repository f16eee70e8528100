"""Train, export and measure the demo model shipped in models/demo/, with one command.

    python -m training.demo [--config training/configs/demo.yaml] [--out models/demo] [--processes N] [--threads N]

Steps:
1. `training.train` with the demo config, on `--processes` local DDP workers (each on the config's
   `num_threads`; 2, the default, is how the shipped model was trained; 1 trains in this process): a
   small LISA built from random weights (lisa_core's tiny tokenizer trained on the synthetic
   benchmark's vocabulary, a few-layer Llama, a small CLIP and SAM at 128 px), fully fine-tuned
   (`finetune: full`: LoRA cannot teach a random network) on the synthetic reasoning benchmark
   (training.data.synthetic) with explained answers ("[SEG]. <explanation>"; the config says why);
2. export of the final weights to `--out` in lisa_core's format (what the node loads by default);
3. `training.evaluate` on EVALUATION_SETS: the val split and the test split (compositions never seen
   in training) with the official question on square frames, and the test split on 16:9 frames
   asked in trained and in held-out phrasings (training.data.phrasing), each in generation mode (what
   users get: gIoU, well-formed answers, confidence against IoU) and the official forced-"[SEG]." mode;
4. `--out`/results.json (the full report), `--out`/loss_curve.png, `--out`/RESULTS.md (command,
   wall time, machine, numbers).
The run folder (checkpoints, metrics.jsonl) goes to the config's output_dir (out/runs/demo, ignored by
git); `--set resume=latest` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from training.config import add_config_arguments, load_config
from training.data.phrasing import HELD_OUT, OFFICIAL, TRAINED
from training.data.synthetic import is_well_formed
from training.evaluate import evaluate, format_table, load_split
from training.launch import run_processes
from training.train import Trainer

DEFAULT_CONFIG = "training/configs/demo.yaml"
DEFAULT_PROCESSES = 2
EVAL_SHORT_SIDE = 128  # the evaluation scenes' short side (the test split as first shipped: 128 x 128)
# name -> (split, aspect ratio, phrasing)
EVALUATION_SETS = {
    "val": ("val", "1:1", OFFICIAL),
    "test": ("test", "1:1", OFFICIAL),
    "test 16:9 trained": ("test", "16:9", TRAINED),
    "test 16:9 held-out": ("test", "16:9", HELD_OUT),
    "test 1:1 held-out": ("test", "1:1", HELD_OUT),
}


def machine_description(processes: int, threads: int) -> str:
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        memory = ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{memory}, "
        f"torch {torch.__version__}, {processes} process(es) x {threads} thread(s), Python {platform.python_version()}"
    )


def _share(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_markdown(command: str, train_seconds: float, machine: str, report: dict, config_path: str) -> str:
    lines = [
        "# Demo model: results",
        "",
        "A small LISA (random initialisation, full fine-tuning) trained on the synthetic reasoning benchmark",
        "(training/data/synthetic.py). The test split holds colour/shape compositions never seen in training;",
        "held-out phrasings (training/data/phrasing.py) are templates and nouns no training sample uses.",
        "",
        f"- Command: `{command}`",
        f"- Config: `{config_path}`",
        f"- Training wall time: {train_seconds / 60:.1f} min",
        f"- Machine: {machine}",
        "",
        "| set | frames | phrasing | mode | gIoU | cIoU | queries | [SEG] count right | well-formed | "
        "confidence-IoU Spearman | confidence range |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, modes in report["splits"].items():
        _, aspect, phrasing = EVALUATION_SETS[name]
        for mode, values in modes.items():
            generation = mode == "generation"
            confidence_range = values.get("confidence_range")
            lines.append(
                f"| {name} | {aspect} | {phrasing} | {mode} | {values['gIoU']:.4f} | {values['cIoU']:.4f} | "
                f"{values['queries']} | {_share(values.get('seg_count_accuracy')) if generation else '-'} | "
                f"{_share(values.get('well_formed')) if generation else '-'} | "
                f"{_number(values.get('confidence_iou_spearman')) if generation else '-'} | "
                + (f"{confidence_range[0]:.3f}..{confidence_range[1]:.3f} |" if generation and confidence_range else "- |")
            )
    lines += [
        "",
        "Generation mode is what users get (the answer is generated; the prediction is the union of its masks);",
        "the forced mode (the official validation protocol) always decodes one mask, so absent-target queries",
        "score 0 there. Well-formed: the answer is a sentence the benchmark's generator writes, with as many",
        "[SEG]s as masks. Spearman: each generated target's confidence against its IoU with the ground truth.",
        "",
        "Per query kind:",
        "",
        "```",
        format_table({name: {"generation": modes["generation"]} for name, modes in report["splits"].items()}),
        "```",
        "",
        "Reproduce one set alone, e.g. `python -m training.evaluate --model models/demo --splits test "
        "--aspect-ratio 16:9 --phrasing held_out --out results.json`. Training curve: loss_curve.png.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="Train, export and evaluate the demo model.")
    add_config_arguments(parser)
    parser.add_argument("--out", default="models/demo", help="folder of the shipped model")
    parser.add_argument(
        "--processes", type=int, default=DEFAULT_PROCESSES,
        help=f"DDP workers on this machine (default {DEFAULT_PROCESSES}: the shipped model's; 1 = no DDP)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the config's)")
    parser.add_argument("--eval-size", type=int, default=None, help="scenes per evaluated split (default: all)")
    args = parser.parse_args(argv)
    config_path = args.config or DEFAULT_CONFIG
    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"num_threads={args.threads}")
    out = Path(args.out)
    overrides.append(f"export_dir={out}")
    config = load_config(config_path, overrides)

    started = time.time()
    if args.processes == 1:
        Trainer(config).run()
    else:
        run_processes(
            args.processes,
            ["--config", config_path, *(arg for item in overrides for arg in ("--set", item))],
            threads=config.num_threads,
        )
    train_seconds = time.time() - started
    threads = config.num_threads or torch.get_num_threads()

    from lisa_core.pipeline import LisaPipeline

    pipeline = LisaPipeline.from_pretrained(out)
    splits = {}
    for name, (split, aspect_ratio, phrasing) in EVALUATION_SETS.items():
        dataset = load_split("synthetic", split, root=None, size=args.eval_size, seed=0, image_size=EVAL_SHORT_SIDE,
                             aspect_ratio=aspect_ratio, phrasing=phrasing)
        splits[name] = [dataset.eval_sample(index) for index in range(len(dataset))]
    report = {
        "model": str(out),
        "data": "synthetic",
        "splits": evaluate(pipeline, splits, answer_check=is_well_formed),
        "train_seconds": train_seconds,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    curve = Path(config.output_dir) / "loss_curve.png"
    if curve.is_file():
        shutil.copyfile(curve, out / "loss_curve.png")
    command = "python -m training.demo" + (f" --config {args.config}" if args.config else "") + "".join(
        f" --set {item}" for item in args.overrides
    ) + (f" --processes {args.processes}" if args.processes != DEFAULT_PROCESSES else "") + (
        f" --threads {args.threads}" if args.threads is not None else ""
    )
    (out / "RESULTS.md").write_text(
        results_markdown(command, train_seconds, machine_description(args.processes, threads), report, config_path)
    )
    print(format_table(report["splits"]))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
