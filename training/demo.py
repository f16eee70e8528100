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
3. `training.evaluate` on the benchmark's test split (compositions never seen in training) and val
   split, in generation mode (what users get) and the official forced-"[SEG]." mode;
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
from training.evaluate import evaluate, format_table, load_split
from training.launch import run_processes
from training.train import Trainer

DEFAULT_CONFIG = "training/configs/demo.yaml"
DEFAULT_PROCESSES = 2


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


def results_markdown(command: str, train_seconds: float, machine: str, report: dict, config_path: str) -> str:
    test = report["splits"]["test"]
    lines = [
        "# Demo model: results",
        "",
        "A small LISA (random initialisation, full fine-tuning) trained on the synthetic reasoning benchmark",
        "(training/data/synthetic.py). The test split holds colour/shape compositions never seen in training.",
        "",
        f"- Command: `{command}`",
        f"- Config: `{config_path}`",
        f"- Training wall time: {train_seconds / 60:.1f} min",
        f"- Machine: {machine}",
        "",
        "| split | mode | gIoU | cIoU | queries |",
        "|---|---|---|---|---|",
    ]
    for split, modes in report["splits"].items():
        for mode, values in modes.items():
            lines.append(f"| {split} | {mode} | {values['gIoU']:.4f} | {values['cIoU']:.4f} | {values['queries']} |")
    lines += [
        "",
        f"Generation mode on test: [SEG] count right for {test['generation']['seg_count_accuracy']:.1%} of queries;"
        + (
            f" absent targets answered without a mask {test['generation']['absent_accuracy']:.1%} of the time."
            if test["generation"]["absent_accuracy"] is not None else ""
        ),
        "The forced mode always decodes one mask, so absent-target queries score 0 there.",
        "",
        "Per query kind (test split):",
        "",
        "```",
        format_table({"test": test}),
        "```",
        "",
        "Reproduce the numbers alone: `python -m training.evaluate --model models/demo --splits val test "
        "--out results.json`. Training curve: loss_curve.png.",
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
    image_size = next(e for e in config.datasets if e["type"] == "synthetic").get("image_size", 128)
    splits = {}
    for split in ("val", "test"):
        dataset = load_split("synthetic", split, root=None, size=args.eval_size, seed=0, image_size=image_size)
        splits[split] = [dataset.eval_sample(index) for index in range(len(dataset))]
    report = {
        "model": str(out),
        "data": "synthetic",
        "splits": evaluate(pipeline, splits),
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
