"""End-to-end LISA query latency, tracking rate and memory, through our real LisaPipeline.

On a GPU: the LISA-7B architecture at full size with random weights (nothing can be downloaded), bf16,
1280x720 input. Three ways of answering are measured side by side in one run:
  reference  the official method: no KV cache, every new token re-runs the whole sequence;
  eager      plain KV-cached greedy decoding (DynamicCache), modules run eagerly;
  fast       static KV cache + torch.compile'd decode step (CUDA graphs), compiled CLIP and SAM
             encoders replayed as CUDA graphs, the SAM encoder on its own CUDA stream beside CLIP,
             prefill and decoding, frames resized on the GPU.
The answers are forced to a fixed length (a logits processor picks the tokens) so every mode does the
same work: "short" = 8 new tokens with one [SEG], "explanatory" = 48 new tokens with one [SEG].

On the CPU with --preset tiny it runs the same code paths at toy size (CI runs it this way).

    python bench/bench_gpu.py --preset lisa_7b --device cuda --dtype bf16 --results bench/results_gpu.md
    python bench/bench_gpu.py --preset tiny --device cpu --dtype fp32 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lisa_core.checkpoint import SEG_TOKEN  # noqa: E402
from lisa_core.config import LisaConfig  # noqa: E402
from lisa_core.model import LisaModel  # noqa: E402
from lisa_core.pipeline import DTYPES, LisaPipeline  # noqa: E402
from lisa_core.tiny import build_tiny_tokenizer  # noqa: E402

QUERY = (
    "I am really thirsty after the long walk and I would like something to drink right now. Which "
    "object on the table could I use to hold water for me, and please explain why it is the right one?"
)
ANSWER_LENGTHS = {"short": 8, "explanatory": 48}


def build_model(preset: str, device: torch.device, dtype: torch.dtype, tokenizer) -> LisaModel:
    config = LisaConfig.lisa_7b() if preset == "lisa_7b" else LisaConfig.tiny(vocab_size=len(tokenizer))
    if len(tokenizer) > config.language_model.vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens, the {preset} vocabulary {config.language_model.vocab_size}")
    config.language_model.bos_token_id = tokenizer.bos_token_id
    config.language_model.eos_token_id = tokenizer.eos_token_id
    config.language_model.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LisaModel(config)
    finally:
        torch.set_default_dtype(default_dtype)
    for module in model.modules():  # buffers stay float32, as lisa_core's checkpoint loader leaves them
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module.register_buffer(name, buffer.float(), persistent=name not in module._non_persistent_buffers_set)
    return model.eval()


def forced_answer(tokenizer, length: int) -> list[int]:
    """`length` ordinary tokens, the second to last [SEG], the last EOS (answers end with EOS)."""
    words = tokenizer("it is the object that holds water because it is hollow and open at the top",
                      add_special_tokens=False).input_ids
    body = [words[i % len(words)] for i in range(length - 2)]
    return body + [tokenizer.convert_tokens_to_ids(SEG_TOKEN), tokenizer.eos_token_id]


def forcing_processor(answer_ids: list[int]):
    def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        forced[answer_ids[len(output_ids)]] = 0.0
        return forced

    return force


def make_frame(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    frame[top:top + height // 3, left:left + width // 5] = (30, 120, 220)
    return frame


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_queries(pipeline: LisaPipeline, frames, answer_ids: list[int], repeats: int, warmup: int):
    """Median seconds per query (image and query in, masks and answer out) and the last result."""
    pipeline.logits_processor = forcing_processor(answer_ids)
    seconds, result = [], None
    for index in range(warmup + repeats):
        frame = frames[index % len(frames)]
        synchronize(pipeline.device)
        start = time.perf_counter()
        result = pipeline.segment(frame, QUERY, max_new_tokens=len(answer_ids))
        synchronize(pipeline.device)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    if result.output_ids != answer_ids or len(result.targets) != 1:
        raise RuntimeError(f"forced answer not reproduced: {result.output_ids[:12]}..., {len(result.targets)} targets")
    return statistics.median(seconds), result


def time_tracking(pipeline: LisaPipeline, frames, embedding: torch.Tensor, repeats: int, warmup: int) -> float:
    """Frames per second of SAM-only tracking, every frame new (no embedding cache hit)."""
    for frame in frames[:warmup]:
        pipeline.track(frame, [embedding])
    synchronize(pipeline.device)
    start = time.perf_counter()
    for index in range(repeats):
        targets = pipeline.track(frames[index % len(frames)], [embedding])
        assert targets[0].mask.shape == frames[0].shape[:2]
    synchronize(pipeline.device)
    return repeats / (time.perf_counter() - start)


def environment(device: torch.device) -> dict:
    import transformers

    info = {
        "machine": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("lisa_7b", "tiny"), default="lisa_7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="fast mode without torch.compile")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), action="append", default=[],
                        help="also measure the language model quantized with bitsandbytes (GPU)")
    parser.add_argument("--results", type=Path, help="append a markdown record of this run here")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tokenizer = build_tiny_tokenizer()
    started = time.perf_counter()
    model = build_model(args.preset, device, dtype, tokenizer)
    build_seconds = time.perf_counter() - started
    frames = [make_frame(args.height, args.width, seed) for seed in range(8)]
    compile_ = not args.no_compile
    modes = {
        "reference": dict(generation_mode="reference"),
        "eager": dict(generation_mode="cached", cache_implementation="dynamic"),
        "fast": dict(generation_mode="cached", cache_implementation="static", compile_decoder=compile_,
                     compile_encoders=compile_, overlap_sam_encoder=True, preprocess_on_device=True),
    }
    numbers: dict = {"preset": args.preset, "dtype": args.dtype, "input": f"{args.width}x{args.height} rgb8",
                     "model_build_s": build_seconds, "environment": environment(device)}
    pipelines = {name: LisaPipeline(model, tokenizer, **settings) for name, settings in modes.items()}
    prompt_length = len(pipelines["eager"].prompt_builder(QUERY, (), 8))
    numbers["prompt_tokens"] = prompt_length

    stage_timings = {}
    embedding = None
    check_masks = {}
    for name, pipeline in pipelines.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        repeats = args.reference_repeats if name == "reference" else args.repeats
        warmup = 1 if name == "reference" else 2
        for answer, length in ANSWER_LENGTHS.items():
            started = time.perf_counter()
            seconds, result = time_queries(pipeline, frames, forced_answer(tokenizer, length), repeats, warmup)
            numbers[f"{name}_{answer}_s"] = seconds
            numbers[f"{name}_{answer}_first_calls_s"] = time.perf_counter() - started - seconds * repeats
            stage_timings[f"{name}_{answer}"] = result.timings
            embedding = result.targets[0].prompt_embedding
        pipeline.logits_processor = forcing_processor(forced_answer(tokenizer, ANSWER_LENGTHS["short"]))
        check = pipeline.segment(frames[0], QUERY, max_new_tokens=ANSWER_LENGTHS["short"])
        check_masks[name] = check.targets[0].mask
        if name != "reference":
            numbers[f"{name}_tracking_fps"] = time_tracking(pipeline, frames, embedding, args.repeats * 3, 2)
        if device.type == "cuda":
            numbers[f"{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    for answer in ANSWER_LENGTHS:
        numbers[f"speedup_{answer}_fast_vs_reference"] = numbers[f"reference_{answer}_s"] / numbers[f"fast_{answer}_s"]
        numbers[f"speedup_{answer}_fast_vs_eager"] = numbers[f"eager_{answer}_s"] / numbers[f"fast_{answer}_s"]
    numbers["stage_timings"] = stage_timings
    for name in ("eager", "fast"):  # same frame, same forced answer: how many mask pixels agree
        numbers[f"mask_agreement_{name}_vs_reference"] = float((check_masks[name] == check_masks["reference"]).mean())

    write_report(numbers, args)
    if args.quantization:  # last, and reported again, so a failure here loses nothing measured above
        del pipelines
        numbers.update(measure_quantized(model, tokenizer, args.quantization, frames, args))
        write_report(numbers, args)
    return numbers


def write_report(numbers: dict, args) -> None:
    report = format_report(numbers)
    print(report)
    if args.results:
        with args.results.open("a") as results:
            results.write(report + "\n")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1, default=float))


def measure_quantized(model: LisaModel, tokenizer, quantizations: list[str], frames, args) -> dict:
    """The eager pipeline with the language model's decoder layers quantized (SAM stays 16-bit).

    Each quantization starts from the same 16-bit layers, kept on the CPU meanwhile.
    """
    from lisa_core.pipeline import quantize_language_model

    device = model.mm_projector.weight.device
    body = model.language_model.model
    original_layers = copy.deepcopy(body.layers).to("cpu")
    numbers = {}
    for quantization in quantizations:
        body.layers = copy.deepcopy(original_layers)
        torch.cuda.empty_cache()
        quantize_language_model(model, quantization, DTYPES[args.dtype])
        body.layers.to(device)
        torch.cuda.reset_peak_memory_stats(device)
        pipeline = LisaPipeline(model, tokenizer, generation_mode="cached", cache_implementation="dynamic")
        for answer, length in ANSWER_LENGTHS.items():
            seconds, _ = time_queries(pipeline, frames, forced_answer(tokenizer, length), args.repeats, 2)
            numbers[f"{quantization}_{answer}_s"] = seconds
        numbers[f"{quantization}_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return numbers


def format_report(numbers: dict) -> str:
    env = numbers["environment"]
    where = env.get("card", env.get("cpu", "?"))
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {numbers['preset']} {numbers['dtype']}, "
        f"{numbers['input']}, on {where}",
        "",
        "environment: " + ", ".join(f"{key} {value}" for key, value in env.items()),
        f"prompt tokens: {numbers['prompt_tokens']}; model build {numbers['model_build_s']:.1f} s",
        "",
        "| mode | short answer (8 tokens) | explanatory (48 tokens) | tracking | peak memory |",
        "|---|---|---|---|---|",
    ]
    for mode in ("reference", "eager", "fast", "8bit", "4bit"):
        if f"{mode}_short_s" not in numbers:
            continue
        tracking = numbers.get(f"{mode}_tracking_fps")
        memory = numbers.get(f"{mode}_peak_memory_gb")
        lines.append(
            f"| {mode} | {numbers[f'{mode}_short_s'] * 1e3:.1f} ms | {numbers[f'{mode}_explanatory_s'] * 1e3:.1f} ms "
            f"| {f'{tracking:.1f} fps' if tracking else '-'} | {f'{memory:.1f} GB' if memory else '-'} |"
        )
    lines += [
        "",
        f"fast vs reference: short {numbers['speedup_short_fast_vs_reference']:.1f}x, explanatory "
        f"{numbers['speedup_explanatory_fast_vs_reference']:.1f}x; fast vs eager: short "
        f"{numbers['speedup_short_fast_vs_eager']:.1f}x, explanatory {numbers['speedup_explanatory_fast_vs_eager']:.1f}x",
        f"mask pixels equal to reference mode's: eager {numbers['mask_agreement_eager_vs_reference']:.4f}, "
        f"fast {numbers['mask_agreement_fast_vs_reference']:.4f}",
        f"first calls (compile, warm-up) of fast: short {numbers['fast_short_first_calls_s']:.1f} s, explanatory "
        f"{numbers['fast_explanatory_first_calls_s']:.1f} s",
        "",
        "stage times of the last query (ms; 'fast' overlaps the SAM encoder, its row shows the wait left):",
        "",
        "| run | " + " | ".join(STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
    ]
    for run, timings in numbers["stage_timings"].items():
        lines.append(f"| {run} | " + " | ".join(f"{timings.get(stage, 0.0) * 1e3:.1f}" for stage in STAGES) + " |")
    return "\n".join(lines) + "\n"


STAGES = ("clip", "sam_encoder", "prefill", "decode", "mask_decoder", "postprocess", "total")

if __name__ == "__main__":
    main()
