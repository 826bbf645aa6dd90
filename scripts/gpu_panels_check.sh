#!/usr/bin/env bash
# The weight panels on a lent GPU machine (the device tool), from the repository root:
#   1. its CPU: the panel kernels' tests (another CPU than the 2-core EPYC these were written on);
#   2. CUDA: the Triton quantized-linear tests and engine parity with transformers (CUDA never
#      takes panels: float weights stay plain, codes stay in the row layout);
#   3. CUDA: batch-1 latency of the llama-1b shape in bf16 with float, int8 and int4 weights.
# Results in $OUT (or ./gpu-results).
source "$(dirname "$0")/gpu_env.sh"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$out/gpu.txt"
grep -o -w -E "avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$out/gpu.txt"
echo | tee -a "$out/gpu.txt"
# The device image's torch segfaults in any extension whose TORCH_CHECK message formats an integer
# (a 3-line extension does too), so the error-message test is left out there.
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_dense_panels.py tests/unit/test_quantization.py \
  -k "panel or dense" --deselect tests/unit/test_dense_panels.py::test_kernel_refuses_mismatched_inputs \
  2>&1 | tail -6 | tee "$out/cpu-panels.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_quantization.py tests/models/test_parity.py \
  -k "triton" 2>&1 | tail -6 | tee "$out/cuda-tests.txt"
for variant in "" "--quantization int8" "--quantization int4"; do
  name=$(echo "bf16 $variant" | tr ' ' '_')
  timeout 60 python3 -m tokenmill bench latency llama-1b --dtype bfloat16 $variant --num-iters 2 --output-len 32 \
    --kv-cache-memory 8GiB 2>&1 | grep -E "ms per output|first token" | sed "s/^/$name: /" | tee -a "$out/latency.txt"
done
