#!/usr/bin/env bash
# Quantization on a lent GPU (the device tool), from the repository root: the Triton tests of the
# weight-only int8/int4 kernel and of the int8 KV cache on CUDA, then batch-1 latency of the
# llama-1b shape in bf16 with float, int8 and int4 weights and an int8 KV cache. Results in $OUT.
source "$(dirname "$0")/gpu_env.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_quantization.py tests/e2e/test_int8_kv_cache.py \
  -k "triton" 2>&1 | tail -15 | tee "$out/tests.txt"
for variant in "" "--quantization int8" "--quantization int4" "--kv-cache-dtype int8"; do
  name=$(echo "bf16 $variant" | tr ' ' '_')
  timeout 70 python3 -m tokenmill bench latency llama-1b --dtype bfloat16 $variant --num-iters 2 --output-len 64 \
    --kv-cache-memory 8GiB --output-json "$out/latency-$name.json" 2>&1 | grep -E "ms per output|first token|read per" \
    | sed "s/^/$name: /" | tee -a "$out/latency.txt"
done
