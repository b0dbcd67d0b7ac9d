#!/usr/bin/env bash
# What no CPU can show, in one run of at most 8 minutes on one CUDA GPU (docs/gpu.md holds the results):
#   1. the CUDA tests (tests/test_cuda.py: bf16 batch = single, save/load onto the GPU, a LoRA step, the fine-tuning
#      program in bf16) and the model tests that take a device;
#   2. scripts/benchmark.py's inference rows (and its training rows, where it has --train) on the GPU in bfloat16;
#   3. scripts/size_check.py: the published openvla-7b shapes in bfloat16 (predict_action, a LoRA step).
#
#   bash scripts/gpu_check.sh            # results in $OUT, else outputs/gpu_check
#
# On a machine whose Python lacks the project's pins, put their wheels in .whl/ first (e.g. transformers 5.25, as
# `pip download --no-deps -d .whl transformers==5.25.0 ...`); they are installed into /tmp/site and put first on the path.
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/scripts:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch, transformers, peft, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_modeling.py 2>&1 | tee "$OUT/tests.log"

timeout 120 "$PYTHON" scripts/benchmark.py --device cuda --dtype bfloat16 --json "$OUT/benchmark_inference.json" 2>&1 | tee "$OUT/benchmark.log"
if "$PYTHON" scripts/benchmark.py --help | grep -q -- "--train"; then
    timeout 120 "$PYTHON" scripts/benchmark.py --train --device cuda --dtype bfloat16 --json "$OUT/benchmark_train.json" 2>&1 | tee -a "$OUT/benchmark.log"
fi

timeout 150 "$PYTHON" scripts/size_check.py --device cuda --json "$OUT/size_check.json" 2>&1 | tee "$OUT/size_check.log"
