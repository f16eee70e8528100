"""Per-stage CPU timings of the tiny LISA through LisaPipeline, KV-cached and reference decoding.

The answer is forced to a fixed length (ordinary greedy tokens, EOS banned, [SEG] forced at the end),
so both modes generate the same tokens and do the same work. Prints a table and appends it, with the
machine and library versions, to bench/results_core.md.

    python bench/bench_core.py --preset tiny --device cpu
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lisa_core.pipeline import LisaPipeline  # noqa: E402
from lisa_core.tiny import save_tiny_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results_core.md"
QUERY = "What object on the table could I use to hold water? Please output segmentation mask."
MODES = ("reference", "cached")
STAGES = ("clip", "sam_encoder", "prefill", "decode", "mask_decoder", "postprocess", "total")


def seg_at_the_end(seg_id: int, eos_id: int, new_tokens: int):
    """Greedy, except EOS is banned and [SEG] is forced as the last new token."""

    def processor(generated_ids, logits):
        logits = logits.clone()
        logits[eos_id] = float("-inf")
        if len(generated_ids) == new_tokens - 1:
            logits[seg_id] = float("inf")
        return logits

    return processor


def machine_line() -> str:
    import transformers

    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch threads, load average {load:.1f} at start; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


def measure(pipeline: LisaPipeline, image: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per stage and mode; the modes alternate run by run so machine load hits both alike.

    Every run recomputes CLIP and SAM (no frame_key)."""
    runs: dict[str, list] = {mode: [] for mode in MODES}
    for repeat in range(repeats + 1):
        for mode in MODES:
            pipeline.generation_mode = mode
            result = pipeline.segment(image, QUERY)
            if repeat > 0:  # the first round is the warm-up
                runs[mode].append(result)
    for mode_runs in runs.values():
        assert all(run.output_ids == runs["cached"][0].output_ids for run in mode_runs)
    return {
        mode: {stage: statistics.median(run.timings.get(stage, 0.0) for run in mode_runs) for stage in STAGES}
        for mode, mode_runs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny",))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to results_core.md")
    args = parser.parse_args()

    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        save_tiny_checkpoint(Path(folder) / "tiny")
        start = time.perf_counter()
        pipeline = LisaPipeline.from_pretrained(Path(folder) / "tiny", device=args.device)
        load_seconds = time.perf_counter() - start
        pipeline.max_new_tokens = args.new_tokens
        pipeline.logits_processor = seg_at_the_end(pipeline.seg_token_id, pipeline.eos_token_id, args.new_tokens)
        results = measure(pipeline, image, args.repeats)

    per_token = {mode: results[mode]["decode"] / (args.new_tokens - 1) for mode in results}
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, preset {args.preset}, {args.device}, fp32",
        "",
        f"Machine: {machine_line()}.",
        f"Image {args.width}x{args.height}, {args.new_tokens} new tokens (one [SEG]), median of {args.repeats} "
        f"runs after one warm-up; model load {load_seconds * 1000:.0f} ms.",
        "",
        "| stage (ms) | reference (no cache) | cached (KV cache) |",
        "|---|---|---|",
    ]
    for stage in STAGES:
        lines.append(f"| {stage} | {results['reference'][stage] * 1000:.1f} | {results['cached'][stage] * 1000:.1f} |")
    lines.append(
        f"| decode per token | {per_token['reference'] * 1000:.2f} | {per_token['cached'] * 1000:.2f} |"
    )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        header = "" if RESULTS.exists() else "# lisa_core CPU benchmark (bench/bench_core.py)\n\n"
        with RESULTS.open("a") as handle:
            handle.write(header + text + "\n")


if __name__ == "__main__":
    main()
