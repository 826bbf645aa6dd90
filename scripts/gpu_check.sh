#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool), from the repository root:
#   the CUDA tests of the Triton paths, then `tokenmill bench suite` on the llama-1b shape in bf16
#   (tokenmill against transformers on the same GPU). Results go to $OUT (or ./gpu-results).
# That machine has torch with CUDA, Triton and transformers, and no network: run with PYTHONPATH=.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. TOKENMILL_LOG_LEVEL=WARNING
out="${OUT:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
if python3 -c "import pytest" 2>/dev/null; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/unit/test_triton_kernels.py \
    tests/unit/test_attention_backends.py tests/models/test_parity.py -k "triton" 2>&1 | tail -25 | tee "$out/tests.txt"
else
  echo "pytest is not installed here: GPU tests skipped" | tee "$out/tests.txt"
fi
timeout 300 python3 -m tokenmill bench suite llama-1b --dtype bfloat16 --kv-cache-memory 16GiB \
  --output-json "$out/suite-llama-1b-bf16.json" 2>&1 | tail -25 | tee "$out/suite.txt"
