"""bench/bench_gpu.py runs its real code paths on the CPU with the tiny preset (CI has no GPU)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of the whole benchmark at toy size: the module, its numbers, and the folder it wrote in."""
    bench = load_bench()
    folder = tmp_path_factory.mktemp("bench")
    numbers = bench.main([
        "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--height", "48", "--width", "64",
        "--repeats", "1", "--reference-repeats", "1", "--many-repeats", "1", "--no-compile",
        "--compile-cache", str(folder / "compile_cache"),
        "--results", str(folder / "results.md"), "--json", str(folder / "numbers.json"),
    ])
    return bench, numbers, folder


def test_tiny_benchmark_measures_every_mode(tiny_run):
    bench, numbers, folder = tiny_run
    assert json.loads((folder / "numbers.json").read_text()) == json.loads(json.dumps(numbers, default=float))
    for mode in ("reference", "eager", "fast"):
        for answer in ("short", "explanatory"):
            assert numbers[f"{mode}_{answer}_s"] > 0
            assert {"prefill", "decode", "mask_decoder"} <= set(numbers["stage_timings"][f"{mode}_{answer}"])
        assert 0 < numbers[f"{mode}_prefill_s"] < numbers[f"{mode}_short_s"]
        assert 0 < numbers[f"{mode}_decode_per_token_s"] < numbers[f"{mode}_short_s"]
        assert 0 < numbers[f"{mode}_first_token_s"] < numbers[f"{mode}_streamed_short_s"]
    for mode in ("eager", "fast"):
        assert numbers[f"{mode}_tracking_fps"] > 0
        for answer in ("short", "explanatory"):
            # Eight frames, each encoded and answered, cost more than one query.
            assert numbers[f"{mode}_many_{answer}_s"] > numbers[f"{mode}_{answer}_s"]
            assert numbers[f"{mode}_many_{answer}_vs_one"] > 1
    assert numbers["decoded_weight_bytes"] > 0 and numbers["copy_bandwidth_bytes_per_s"] > 0
    assert numbers["memory_floor_per_token_s"] == pytest.approx(
        numbers["decoded_weight_bytes"] / numbers["copy_bandwidth_bytes_per_s"]
    )
    # Cold start: two processes of their own, sharing the compile cache folder.
    pids = {numbers["cold_start_fresh_pid"], numbers["cold_start_kept_pid"]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert numbers["cold_start_cache_dir"] == str(folder / "compile_cache")
    for caches in ("fresh", "kept"):
        assert 0 < numbers[f"cold_start_{caches}_first_answer_s"] < numbers[f"cold_start_{caches}_process_s"]
        assert numbers[f"cold_start_{caches}_second_answer_s"] > 0
    # No CUDA here: the quantized rows say why they were not measured.
    assert numbers["8bit_not_measured"] == numbers["4bit_not_measured"] == "needs a CUDA device (bitsandbytes)"
    # Cached decoding reproduces the official no-cache method exactly in fp32; the fast path resizes
    # frames with torch instead of PIL, so a few mask pixels may differ.
    assert numbers["mask_agreement_eager_vs_reference"] == 1.0
    assert numbers["mask_agreement_fast_vs_reference"] >= 0.95
    report = (folder / "results.md").read_text()
    assert report.count("### ") == 1 and "| fast |" in report and "fast vs reference" in report
    assert "| 8bit | not measured: needs a CUDA device" in report
    for line in ("memory floor per decoded token", "8 queries on 8 frames in one segment_many",
                 "cold start, fast pipeline constructed to first answer (new process, model built before): fresh",
                 "first streamed token"):
        assert line in report, line


def test_report_rewrites_its_own_record_only(tiny_run, tmp_path):
    """A run's record is rewritten as numbers are added; earlier runs' records stay."""
    bench, numbers, _ = tiny_run
    numbers = dict(numbers)
    results = tmp_path / "results.md"
    results.write_text("an earlier run\n")
    report = bench.Report(results, None)
    report.write(numbers)
    numbers["fast_short_s"] = 12.3456
    report.write(numbers)
    text = results.read_text()
    assert text.startswith("an earlier run\n### ") and text.count("### ") == 1 and "| fast | 12345.6 ms |" in text
    skipped = {key: value for key, value in numbers.items() if not key.startswith("cold_start")}
    assert bench.format_cold_start(skipped).endswith("not measured (--no-cold-start)")
