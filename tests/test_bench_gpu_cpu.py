"""bench/bench_gpu.py runs its real code paths on the CPU with the tiny preset (CI has no GPU)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_measures_every_mode(tmp_path):
    bench = load_bench()
    results, numbers_file = tmp_path / "results.md", tmp_path / "numbers.json"
    bench.main([
        "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--height", "48", "--width", "64",
        "--repeats", "1", "--reference-repeats", "1", "--no-compile",
        "--results", str(results), "--json", str(numbers_file),
    ])
    numbers = json.loads(numbers_file.read_text())
    for mode in ("reference", "eager", "fast"):
        for answer in ("short", "explanatory"):
            assert numbers[f"{mode}_{answer}_s"] > 0
            assert {"prefill", "decode", "mask_decoder"} <= set(numbers["stage_timings"][f"{mode}_{answer}"])
    assert numbers["eager_tracking_fps"] > 0 and numbers["fast_tracking_fps"] > 0
    # Cached decoding reproduces the official no-cache method exactly in fp32; the fast path resizes
    # frames with torch instead of PIL, so a few mask pixels may differ.
    assert numbers["mask_agreement_eager_vs_reference"] == 1.0
    assert numbers["mask_agreement_fast_vs_reference"] >= 0.95
    report = results.read_text()
    assert "| fast |" in report and "fast vs reference" in report
