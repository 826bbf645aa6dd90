#!/usr/bin/env bash
# CUDA graphs of decode steps on a lent GPU (the device tool), from the repository root: the CUDA-graph tests
# (beside the rest, 4 processes), batch-1 latency of the llama-1b shape in bf16 eager and with graphs, with
# int8/int4 weights and the int8 and fp8 KV caches, the quantized matmul against bf16 at decode shapes, then
# kernel time per output token (torch.profiler over graph replays) for bf16 and int8 weights. Results in $OUT.
source "$(dirname "$0")/gpu_env.sh"
export PYTHONUNBUFFERED=1
(timeout 200 python3 -m pytest -q -p no:cacheprovider -n 4 -rfEs tests/e2e/test_cuda_graphs.py > "$out/tests.txt" 2>&1) &
tests=$!
timeout 120 python3 scripts/quant_linear_bench.py --rows 1 8 32 128 2>&1 | tee "$out/quant_linear.txt"
wait $tests
tail -8 "$out/tests.txt"
for variant in "--enforce-eager" "" "--quantization int8" "--quantization int4" "--kv-cache-dtype int8" \
               "--kv-cache-dtype fp8_e4m3"; do
  name=$(echo "bf16 $variant" | tr ' ' '_')
  TOKENMILL_LOG_LEVEL=INFO timeout 90 python3 -m tokenmill bench latency llama-1b --dtype bfloat16 $variant \
    --num-iters 3 --output-len 64 --kv-cache-memory 8GiB 2>&1 \
    | grep -E "ms per output|first token|floor|CUDA graphs|Error|error" | sed "s/^/$name: /" | tee -a "$out/latency.txt"
done
for variant in "" "--quantization int8"; do
  name=$(echo "bf16 $variant" | tr ' ' '_')
  timeout 90 python3 -m tokenmill bench latency llama-1b --dtype bfloat16 $variant --num-iters 1 --output-len 64 \
    --kv-cache-memory 8GiB --profile "/tmp/profile_$name" 2>&1 | sed -n '/^profile:/,$p' | sed "s/^/$name: /" \
    | tee -a "$out/profile.txt"
done
