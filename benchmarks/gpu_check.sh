#!/usr/bin/env bash
# The GPU checks of issue 15, as one run (at most 9.5 minutes: each step has its own timeout):
#   1. the test suite's CUDA tests (tests/test_cuda.py: statistics on the device, the merged model back
#      on the caller's device and dtype, device="cuda" on CPU models = the CPU merge's assignments);
#   2. merge vs floor for resnet18 and resnet50 at 224 px, float32 and bfloat16 (benchmarks/speed.py,
#      wall seconds with the device drained at each reading; peak device memory).
# Usage (from the repository root):  bash benchmarks/gpu_check.sh [IMAGES] [OUT_DIR]
# IMAGES defaults to 5000 (the size); OUT_DIR (default: ${OUT:-gpu_check_out}) receives the logs
# and speed_gpu.jsonl.
set -u
IMAGES=${1:-5000}
OUT_DIR=${2:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT_DIR/gpu.txt"
timeout 150 python -m pytest tests/test_cuda.py -q -rs 2>&1 | tee "$OUT_DIR/test_cuda.log"
for dtype in float32 bfloat16; do
    timeout 210 python benchmarks/speed.py --device cuda --dtype "$dtype" --threads 4 --batch224 128 \
        --only "resnet18:224:$IMAGES" "resnet50:224:$IMAGES" --json "$OUT_DIR/speed_gpu.jsonl" \
        2>&1 | tee "$OUT_DIR/speed_$dtype.log"
done
