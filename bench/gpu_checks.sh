#!/usr/bin/env bash
# Every GPU check and timing in one run (for a machine with one CUDA GPU and PyTorch, no network):
# the GPU tests, then bench/bench_gpu.py on the LISA-7B architecture. Missing pure-Python packages
# (segment-anything, the pinned transformers, bitsandbytes) can be brought as wheels in .whl/.
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
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/test_speed_settings.py tests/test_preprocess.py tests/test_pipeline_gpu.py} 2>&1 | tail -4 | tee "$out/gpu_tests.txt"
timeout "${BENCH_TIMEOUT:-420}" python3 bench/bench_gpu.py --preset lisa_7b --device cuda --dtype bf16 \
    ${BENCH_ARGS:-} --results "$out/results_gpu.md" --json "$out/gpu.json" 2>&1 | grep -v "^W1127" | tee "$out/bench_log.txt" | tail -45
