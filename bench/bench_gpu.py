"""End-to-end LISA query latency, streaming, batching, cold start, tracking rate and memory, through
our real LisaPipeline.

On a GPU: the LISA-7B architecture at full size with random weights (nothing can be downloaded), bf16,
1280x720 input. Three ways of answering are measured side by side in one run:
  reference  the official method: no KV cache, every new token re-runs the whole sequence;
  eager      plain KV-cached greedy decoding (DynamicCache), modules run eagerly;
  fast       static KV cache + torch.compile'd decode step (CUDA graphs), compiled CLIP and SAM
             encoders replayed as CUDA graphs, the SAM encoder on its own CUDA stream beside CLIP,
             prefill and decoding, frames resized on the GPU.
The answers are forced to a fixed length (a logits processor picks the tokens) so every mode does the
same work: "short" = 8 new tokens with one [SEG], "explanatory" = 48 new tokens with one [SEG].

Per mode: both answers end to end, the first streamed token (segment's on_progress), prefill, decode
time per token (the explanatory answer's mean decoding step) and tracking. Then: the memory
floor of one decoded token (the language model's weights over the measured device copy bandwidth),
8 queries on 8 different frames through one segment_many against one query, the cold start (a fresh
process builds the model, then the fast pipeline is timed from its construction to its first answer,
compilation included; run twice, first with empty compile caches, then with the caches it left), and
the language model quantized with bitsandbytes (8-bit, 4-bit) where it can run.

On the CPU with --preset tiny it runs the same code paths at toy size (CI runs it this way).

    python bench/bench_gpu.py --preset lisa_7b --device cuda --dtype bf16 --results bench/results_gpu.md
    python bench/bench_gpu.py --preset tiny --device cpu --dtype fp32 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lisa_core.config import SEG_TOKEN, LisaConfig  # noqa: E402
from lisa_core.model import LisaModel  # noqa: E402
from lisa_core.pipeline import DTYPES, LisaPipeline, quantize_language_model  # noqa: E402
from lisa_core.precision import QUANTIZATIONS  # noqa: E402
from lisa_core.result import STAGE_GENERATING, SegmentRequest  # noqa: E402
from lisa_core.tiny import build_tiny_tokenizer  # noqa: E402

QUERY = (
    "I am really thirsty after the long walk and I would like something to drink right now. Which "
    "object on the table could I use to hold water for me, and please explain why it is the right one?"
)
ANSWER_LENGTHS = {"short": 8, "explanatory": 48}
MODES = ("reference", "eager", "fast")
QUANTIZED_MODES = tuple(quantization for quantization in QUANTIZATIONS if quantization is not None)
MANY_FRAMES = 8  # frames, one query each, in the segment_many measurement
MIN_SECONDS_FOR_QUANTIZED = 60.0  # a quantized measurement starts only with this much of --time-limit left
STAGES = ("clip", "sam_encoder", "prefill", "decode", "mask_decoder", "postprocess", "total")
COLD_CACHES = ("fresh", "kept")  # the two cold-start processes: empty compile caches, then the same ones again


def mode_settings(compile_: bool) -> dict[str, dict]:
    """LisaPipeline settings of each mode; "fast" holds every speed setting."""
    return {
        "reference": dict(generation_mode="reference"),
        "eager": dict(generation_mode="cached", cache_implementation="dynamic"),
        "fast": dict(generation_mode="cached", cache_implementation="static", compile_decoder=compile_,
                     compile_encoders=compile_, overlap_sam_encoder=True, preprocess_on_device=True),
    }


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


def check_forced(result, answer_ids: list[int]) -> None:
    if result.output_ids != answer_ids or len(result.targets) != 1:
        raise RuntimeError(f"forced answer not reproduced: {result.output_ids[:12]}..., {len(result.targets)} targets")


def time_queries(pipeline: LisaPipeline, frames, answer_ids: list[int], repeats: int, warmup: int):
    """Median seconds per query (image and query in, masks and answer out), the median of each stage's
    seconds, and the last result."""
    pipeline.logits_processor = forcing_processor(answer_ids)
    seconds, timings, result = [], [], None
    for index in range(warmup + repeats):
        frame = frames[index % len(frames)]
        synchronize(pipeline.device)
        start = time.perf_counter()
        result = pipeline.segment(frame, QUERY, max_new_tokens=len(answer_ids))
        synchronize(pipeline.device)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
            timings.append(result.timings)
    check_forced(result, answer_ids)
    stage_medians = {stage: statistics.median(t.get(stage, 0.0) for t in timings) for stage in timings[-1]}
    return statistics.median(seconds), stage_medians, result


def time_first_token(pipeline: LisaPipeline, frames, answer_ids: list[int], repeats: int, warmup: int):
    """Median seconds from calling segment to its first "generating" progress report (the first
    streamed token), and median seconds of the whole streamed query."""
    pipeline.logits_processor = forcing_processor(answer_ids)
    first_tokens, totals = [], []
    for index in range(warmup + repeats):
        first = []

        def on_progress(progress) -> bool:
            if progress.stage == STAGE_GENERATING and not first:
                first.append(time.perf_counter())
            return False

        synchronize(pipeline.device)
        start = time.perf_counter()
        result = pipeline.segment(frames[index % len(frames)], QUERY, max_new_tokens=len(answer_ids),
                                  on_progress=on_progress)
        synchronize(pipeline.device)
        check_forced(result, answer_ids)
        if index >= warmup:
            first_tokens.append(first[0] - start)
            totals.append(time.perf_counter() - start)
    return statistics.median(first_tokens), statistics.median(totals)


def time_many(pipeline: LisaPipeline, frames, answer_ids: list[int], repeats: int, warmup: int) -> float:
    """Median seconds of one segment_many call with one query on each of `frames` (all different)."""
    pipeline.logits_processor = forcing_processor(answer_ids)
    requests = [SegmentRequest(frame, QUERY, max_new_tokens=len(answer_ids)) for frame in frames]
    seconds = []
    for index in range(warmup + repeats):
        synchronize(pipeline.device)
        start = time.perf_counter()
        results = pipeline.segment_many(requests)
        synchronize(pipeline.device)
        for result in results:
            check_forced(result, answer_ids)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


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


def decode_seconds_per_token(stage_medians: dict[str, dict]) -> float:
    """Mean seconds of one decoding step in the explanatory answer (prefill gives its first token)."""
    return stage_medians["explanatory"]["decode"] / (ANSWER_LENGTHS["explanatory"] - 1)


def decoded_weight_bytes(model: LisaModel) -> int:
    """Bytes of language-model weights every decoding step reads: all of them but the input embedding
    table, of which a step reads one row."""
    language_model = model.language_model
    embeddings = language_model.get_input_embeddings().weight
    total = sum(parameter.nbytes for parameter in language_model.parameters())
    tied = language_model.get_output_embeddings().weight is embeddings
    return total if tied else total - embeddings.nbytes


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second that a device-to-device copy moves (each byte read once and written once)."""
    size = (1 << 30) if device.type == "cuda" else (64 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copies = 10
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(copies):
        target.copy_(source)
    synchronize(device)
    return 2 * size * copies / (time.perf_counter() - start)


def measure_mode(name: str, pipeline: LisaPipeline, frames, tokenizer, args) -> tuple[dict, dict, np.ndarray]:
    """Numbers of one mode, the last query's stage timings per answer, and the mask of a check query."""
    device = pipeline.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    repeats = args.reference_repeats if name == "reference" else args.repeats
    warmup = 1 if name == "reference" else 2
    numbers, stage_medians, last_timings, embedding = {}, {}, {}, None
    for answer, length in ANSWER_LENGTHS.items():
        started = time.perf_counter()
        seconds, stage_medians[answer], result = time_queries(
            pipeline, frames, forced_answer(tokenizer, length), repeats, warmup
        )
        numbers[f"{name}_{answer}_s"] = seconds
        numbers[f"{name}_{answer}_first_calls_s"] = time.perf_counter() - started - seconds * repeats
        last_timings[f"{name}_{answer}"] = result.timings
        embedding = result.targets[0].prompt_embedding
    numbers[f"{name}_prefill_s"] = stage_medians["short"]["prefill"]
    numbers[f"{name}_decode_per_token_s"] = decode_seconds_per_token(stage_medians)
    short_answer = forced_answer(tokenizer, ANSWER_LENGTHS["short"])
    numbers[f"{name}_first_token_s"], numbers[f"{name}_streamed_short_s"] = time_first_token(
        pipeline, frames, short_answer, repeats, 1
    )
    pipeline.logits_processor = forcing_processor(short_answer)
    check_mask = pipeline.segment(frames[0], QUERY, max_new_tokens=len(short_answer)).targets[0].mask
    if name != "reference":
        numbers[f"{name}_tracking_fps"] = time_tracking(pipeline, frames, embedding, args.repeats * 3, 2)
    if device.type == "cuda":  # one query at a time; the segment_many batch's peak is its own number
        numbers[f"{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    if name != "reference":
        for answer, length in ANSWER_LENGTHS.items():
            # No warm-up call: the pipeline is warm, and the median of --many-repeats drops a slow first batch.
            numbers[f"{name}_many_{answer}_s"] = time_many(
                pipeline, frames[:MANY_FRAMES], forced_answer(tokenizer, length), args.many_repeats, 0
            )
        if device.type == "cuda":
            numbers[f"{name}_many_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return numbers, last_timings, check_mask


@contextlib.contextmanager
def compile_caches(directory: Path):
    """torch.compile's on-disk caches (Inductor's FX graphs and AOT autograd, Triton's kernels) in
    `directory`, for this process and the processes it starts."""
    names = {
        "TORCHINDUCTOR_CACHE_DIR": str(directory),
        "TRITON_CACHE_DIR": str(directory / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cold_start_child(args) -> None:
    """In a fresh process: build the model, then time the fast pipeline from its construction to its
    first answer (compilation included) and a second answer; print the numbers as one JSON line."""
    device = torch.device(args.device)
    tokenizer = build_tiny_tokenizer()
    started = time.perf_counter()
    model = build_model(args.preset, device, DTYPES[args.dtype], tokenizer)
    synchronize(device)
    built = time.perf_counter()
    pipeline = LisaPipeline(model, tokenizer, **mode_settings(not args.no_compile)["fast"])
    answer_ids = forced_answer(tokenizer, ANSWER_LENGTHS["short"])
    pipeline.logits_processor = forcing_processor(answer_ids)
    answers = []
    for seed in range(2):
        result = pipeline.segment(make_frame(args.height, args.width, seed), QUERY, max_new_tokens=len(answer_ids))
        synchronize(device)
        check_forced(result, answer_ids)
        answers.append(time.perf_counter())
    print(json.dumps({
        "pid": os.getpid(),
        "model_build_s": built - started,
        "first_answer_s": answers[0] - built,
        "second_answer_s": answers[1] - answers[0],
    }))


def measure_cold_start(args, cache_dir: Path) -> dict:
    """cold_start_child in two fresh processes sharing `cache_dir` (empty before the first)."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--cold-start-child", "--preset", args.preset,
        "--device", args.device, "--dtype", args.dtype, "--height", str(args.height), "--width", str(args.width),
    ] + (["--no-compile"] if args.no_compile else [])
    numbers = {"cold_start_cache_dir": str(cache_dir)}
    for caches in COLD_CACHES:
        started = time.perf_counter()
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=args.cold_start_timeout)
        except subprocess.TimeoutExpired:
            numbers["cold_start_not_measured"] = f"the {caches}-cache process ran past {args.cold_start_timeout} s"
            return numbers
        if child.returncode != 0:
            numbers["cold_start_not_measured"] = (
                f"the {caches}-cache process failed ({child.returncode}): {child.stderr.strip()[-500:]}"
            )
            return numbers
        reports = [line for line in child.stdout.splitlines() if line.startswith('{"pid"')]
        if not reports:
            numbers["cold_start_not_measured"] = f"the {caches}-cache process printed no numbers"
            return numbers
        measured = json.loads(reports[-1])
        numbers[f"cold_start_{caches}_process_s"] = time.perf_counter() - started
        for key in ("pid", "model_build_s", "first_answer_s", "second_answer_s"):
            numbers[f"cold_start_{caches}_{key}"] = measured[key]
    return numbers


def quantized_unavailable(device: torch.device) -> Optional[str]:
    """Why the quantized measurements cannot run here, or None."""
    if device.type != "cuda":
        return "needs a CUDA device (bitsandbytes)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


def measure_quantized(model: LisaModel, tokenizer, quantization: str, original_layers, frames, args) -> dict:
    """The eager pipeline with the language model's decoder layers quantized (SAM stays 16-bit),
    starting from the 16-bit layers in `original_layers` (kept on the CPU)."""
    device = model.mm_projector.weight.device
    body = model.language_model.model
    body.layers = copy.deepcopy(original_layers)
    torch.cuda.empty_cache()
    quantize_language_model(model, quantization, DTYPES[args.dtype])
    body.layers.to(device)
    torch.cuda.reset_peak_memory_stats(device)
    pipeline = LisaPipeline(model, tokenizer, generation_mode="cached", cache_implementation="dynamic")
    numbers, stage_medians = {}, {}
    for answer, length in ANSWER_LENGTHS.items():
        numbers[f"{quantization}_{answer}_s"], stage_medians[answer], _ = time_queries(
            pipeline, frames, forced_answer(tokenizer, length), args.reference_repeats, 1
        )
    numbers[f"{quantization}_prefill_s"] = stage_medians["short"]["prefill"]
    numbers[f"{quantization}_decode_per_token_s"] = decode_seconds_per_token(stage_medians)
    numbers[f"{quantization}_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return numbers


def measure_or_explain_quantized(model: LisaModel, tokenizer, quantization: str, original_layers, frames, args,
                                 deadline: Optional[float]) -> dict:
    """measure_quantized, or the reason it was not measured (too little of --time-limit left, a failure)."""
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left < MIN_SECONDS_FOR_QUANTIZED:
        return {f"{quantization}_not_measured": f"{max(left, 0):.0f} s left of --time-limit"}
    try:
        return measure_quantized(model, tokenizer, quantization, original_layers, frames, args)
    except Exception as error:  # recorded in the report; the next quantization still runs
        traceback.print_exc()
        return {f"{quantization}_not_measured": f"failed: {type(error).__name__}: {error}"[:300]}


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


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("lisa_7b", "tiny"), default="lisa_7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference-repeats", type=int, default=2, help="also the quantized modes' repeats")
    parser.add_argument("--many-repeats", type=int, default=3, help="repeats of the 8-frame segment_many call")
    parser.add_argument("--no-compile", action="store_true", help="fast mode without torch.compile")
    parser.add_argument("--quantization", choices=QUANTIZED_MODES, nargs="*", default=["4bit", "8bit"],
                        help="the language model quantized with bitsandbytes (GPU), in this order (8-bit decodes "
                        "slowest, so it goes last); none when given no value")
    parser.add_argument("--no-cold-start", action="store_true", help="skip the two cold-start processes")
    parser.add_argument("--cold-start-timeout", type=float, default=300.0, help="seconds per cold-start process")
    parser.add_argument("--compile-cache", type=Path,
                        help="empty or new folder for torch.compile's caches (default: a new temporary folder)")
    parser.add_argument("--time-limit", type=float,
                        help="seconds this run may take: quantized measurements that would start late are skipped")
    parser.add_argument("--cold-start-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help="append a markdown record of this run here")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    return parser.parse_args(argv)


def empty_cache_dir(requested: Optional[Path], stack: contextlib.ExitStack) -> Path:
    """`requested` (created if new; refused if not empty), or a temporary folder removed at the end."""
    if requested is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lisa_bench_compile_")))
    if requested.exists() and any(requested.iterdir()):
        raise SystemExit(f"--compile-cache {requested} is not empty: the cold start needs empty caches")
    requested.mkdir(parents=True, exist_ok=True)
    return requested


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cold_start_child:
        cold_start_child(args)
        return {}
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    report = Report(args.results, args.json)
    with contextlib.ExitStack() as stack:
        cache_dir = empty_cache_dir(args.compile_cache, stack)
        stack.enter_context(compile_caches(cache_dir))
        numbers = {} if args.no_cold_start else measure_cold_start(args, cache_dir)
        measured, model, tokenizer, frames = measure_pipelines(args)
        numbers.update(measured)
        unavailable = quantized_unavailable(model.mm_projector.weight.device) if args.quantization else None
        if unavailable is not None:
            numbers.update({f"{quantization}_not_measured": unavailable for quantization in args.quantization})
        report.write(numbers)
        if args.quantization and unavailable is None:  # last, so a failure here loses nothing measured above
            original_layers = copy.deepcopy(model.language_model.model.layers).to("cpu")
            for quantization in args.quantization:
                numbers.update(measure_or_explain_quantized(
                    model, tokenizer, quantization, original_layers, frames, args, deadline
                ))
                report.write(numbers)
    return numbers


def measure_pipelines(args):
    """Every mode's numbers and the comparisons between them; also the model, tokenizer and frames."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tokenizer = build_tiny_tokenizer()
    started = time.perf_counter()
    model = build_model(args.preset, device, dtype, tokenizer)
    build_seconds = time.perf_counter() - started
    frames = [make_frame(args.height, args.width, seed) for seed in range(MANY_FRAMES)]
    numbers: dict = {"preset": args.preset, "dtype": args.dtype, "input": f"{args.width}x{args.height} rgb8",
                     "model_build_s": build_seconds, "environment": environment(device)}
    pipelines = {name: LisaPipeline(model, tokenizer, **settings)
                 for name, settings in mode_settings(not args.no_compile).items()}
    numbers["prompt_tokens"] = len(pipelines["eager"].prompt_builder(QUERY, (), ANSWER_LENGTHS["short"]).input_ids)
    stage_timings, check_masks = {}, {}
    for name, pipeline in pipelines.items():
        mode_numbers, timings, check_masks[name] = measure_mode(name, pipeline, frames, tokenizer, args)
        numbers.update(mode_numbers)
        stage_timings.update(timings)
    del pipelines
    for answer in ANSWER_LENGTHS:
        numbers[f"speedup_{answer}_fast_vs_reference"] = numbers[f"reference_{answer}_s"] / numbers[f"fast_{answer}_s"]
        numbers[f"speedup_{answer}_fast_vs_eager"] = numbers[f"eager_{answer}_s"] / numbers[f"fast_{answer}_s"]
        for name in ("eager", "fast"):
            numbers[f"{name}_many_{answer}_vs_one"] = numbers[f"{name}_many_{answer}_s"] / numbers[f"{name}_{answer}_s"]
    numbers["stage_timings"] = stage_timings
    for name in ("eager", "fast"):  # same frame, same forced answer: how many mask pixels agree
        numbers[f"mask_agreement_{name}_vs_reference"] = float((check_masks[name] == check_masks["reference"]).mean())
    numbers["decoded_weight_bytes"] = decoded_weight_bytes(model)
    numbers["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
    numbers["memory_floor_per_token_s"] = numbers["decoded_weight_bytes"] / numbers["copy_bandwidth_bytes_per_s"]
    return numbers, model, tokenizer, frames


class Report:
    """This run's markdown record, printed and rewritten in place (appended to earlier runs' records)
    each time numbers are added, and its numbers as JSON."""

    def __init__(self, results: Optional[Path], numbers_json: Optional[Path]) -> None:
        self.results = results
        self.numbers_json = numbers_json
        self.offset = results.stat().st_size if results is not None and results.exists() else 0

    def write(self, numbers: dict) -> None:
        report = format_report(numbers)
        print(report, flush=True)
        if self.results is not None:
            with self.results.open("a") as results:
                results.truncate(self.offset)
                results.write(report + "\n")
        if self.numbers_json is not None:
            self.numbers_json.write_text(json.dumps(numbers, indent=1, default=float))


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1e3:.1f} ms"


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
        "| mode | short answer (8 tokens) | explanatory (48 tokens) | first streamed token | prefill "
        "| decode per token | tracking | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES + QUANTIZED_MODES:
        if f"{mode}_not_measured" in numbers:
            lines.append(f"| {mode} | not measured: {numbers[f'{mode}_not_measured']} |" + " - |" * 6)
        if f"{mode}_short_s" not in numbers:
            continue
        tracking = numbers.get(f"{mode}_tracking_fps")
        memory = numbers.get(f"{mode}_peak_memory_gb")
        lines.append(
            f"| {mode} | {_ms(numbers[f'{mode}_short_s'])} | {_ms(numbers[f'{mode}_explanatory_s'])} "
            f"| {_ms(numbers.get(f'{mode}_first_token_s'))} | {_ms(numbers[f'{mode}_prefill_s'])} "
            f"| {numbers[f'{mode}_decode_per_token_s'] * 1e3:.2f} ms "
            f"| {f'{tracking:.1f} fps' if tracking else '-'} | {f'{memory:.1f} GB' if memory else '-'} |"
        )
    floor = numbers["memory_floor_per_token_s"]
    caches_note = ", with the caches the cold-start processes left" if "cold_start_kept_pid" in numbers else ""
    lines += [
        "",
        f"memory floor per decoded token: {floor * 1e3:.2f} ms = language-model weights read per token "
        f"{numbers['decoded_weight_bytes'] / 1e9:.3g} GB / measured copy bandwidth "
        f"{numbers['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; fast decodes at "
        f"{numbers['fast_decode_per_token_s'] / floor:.1f}x the floor",
        f"fast vs reference: short {numbers['speedup_short_fast_vs_reference']:.1f}x, explanatory "
        f"{numbers['speedup_explanatory_fast_vs_reference']:.1f}x; fast vs eager: short "
        f"{numbers['speedup_short_fast_vs_eager']:.1f}x, explanatory "
        f"{numbers['speedup_explanatory_fast_vs_eager']:.1f}x",
        format_many(numbers),
        format_cold_start(numbers),
        "first streamed token (segment's on_progress) against the whole streamed short answer: "
        + ", ".join(
            f"{mode} {_ms(numbers[f'{mode}_first_token_s'])} of {_ms(numbers[f'{mode}_streamed_short_s'])}"
            for mode in MODES
        ),
        f"mask pixels equal to reference mode's: eager {numbers['mask_agreement_eager_vs_reference']:.4f}, "
        f"fast {numbers['mask_agreement_fast_vs_reference']:.4f}",
        f"first calls (compile{caches_note}, warm-up) of fast in this process: short "
        f"{numbers['fast_short_first_calls_s']:.1f} s, "
        f"explanatory {numbers['fast_explanatory_first_calls_s']:.1f} s",
        "",
        "stage times of the last query (ms; 'fast' overlaps the SAM encoder, its row shows the wait left):",
        "",
        "| run | " + " | ".join(STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
    ]
    for run, timings in numbers["stage_timings"].items():
        lines.append(f"| {run} | " + " | ".join(f"{timings.get(stage, 0.0) * 1e3:.1f}" for stage in STAGES) + " |")
    return "\n".join(lines) + "\n"


def format_many(numbers: dict) -> str:
    parts = []
    for name, how in (("eager", "one LLM batch"), ("fast", "one by one")):
        part = f"{name} ({how})" + ",".join(
            f" {answer} {_ms(numbers[f'{name}_many_{answer}_s'])} = {numbers[f'{name}_many_{answer}_vs_one']:.1f}x"
            for answer in ANSWER_LENGTHS
        )
        if f"{name}_many_peak_memory_gb" in numbers:
            part += f", peak {numbers[f'{name}_many_peak_memory_gb']:.1f} GB"
        parts.append(part)
    return f"{MANY_FRAMES} queries on {MANY_FRAMES} frames in one segment_many, against one query of the mode: " + (
        "; ".join(parts)
    )


def format_cold_start(numbers: dict) -> str:
    measured = [
        f"{caches} compile caches {numbers[f'cold_start_{caches}_first_answer_s']:.1f} s "
        f"(then {_ms(numbers[f'cold_start_{caches}_second_answer_s'])} a query; process "
        f"{numbers[f'cold_start_{caches}_process_s']:.1f} s)"
        for caches in COLD_CACHES
        if f"cold_start_{caches}_first_answer_s" in numbers
    ]
    if "cold_start_not_measured" in numbers:
        measured.append(f"not measured: {numbers['cold_start_not_measured']}")
    if "cold_start_cache_dir" not in numbers:
        measured.append("not measured (--no-cold-start)")
    return "cold start, fast pipeline constructed to first answer (new process, model built before): " + "; ".join(
        measured
    )


if __name__ == "__main__":
    main()
