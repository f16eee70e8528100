#!/usr/bin/env bash
# Every GPU timing and check in one run (for a machine with one CUDA GPU and PyTorch, no network):
# bench/bench_gpu.py on the LISA-7B architecture (its cold-start processes included), then the GPU
# tests. Missing pure-Python packages (segment-anything, the pinned transformers, bitsandbytes) can be
# brought as wheels in .whl/. Expected to take about 6 minutes on an H200; at most BENCH_TIMEOUT +
# TEST_TIMEOUT seconds (defaults 400 + 140).
# Usage: bench/gpu_checks.sh OUTPUT_DIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench_timeout=${BENCH_TIMEOUT:-400}
timeout "$bench_timeout" python3 bench/bench_gpu.py --preset lisa_7b --device cuda --dtype bf16 \
    --cold-start-timeout 170 --time-limit $((bench_timeout - 30)) \
    ${BENCH_ARGS:-} --results "$out/results_gpu.md" --json "$out/gpu.json" 2>&1 \
    | grep -Ev '^[WI][0-9]{4} ' | tee "$out/bench_log.txt" | tail -40
timeout "${TEST_TIMEOUT:-140}" python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/test_speed_settings.py tests/test_preprocess.py tests/test_pipeline_gpu.py} 2>&1 | tail -4 | tee "$out/gpu_tests.txt"
