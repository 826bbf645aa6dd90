#!/usr/bin/env bash
# KV tiers and the offload plan on a lent GPU (the device tool), from the repository root:
#   1. CUDA tests of the KV tiers (pinned CPU memory and disk, float and int8 caches);
#   2. time to first token after a 2,048-token prefix of the llama-1b shape in bf16: recomputed,
#      a device prefix hit, restored from pinned CPU memory, restored from disk (page cache dropped);
#   3. `analyze --offload` for llama-1b on this GPU with a 2 GiB budget and 16 GiB of pinned CPU
#      memory, and the engine run with the options it chose (--measure).
source "$(dirname "$0")/gpu_env.sh"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/e2e/test_kv_offload.py -k cuda 2>&1 | tail -4 \
  | tee "$out/tests.txt"
timeout 120 python3 -m tokenmill bench kv-offload llama-1b --dtype bfloat16 --kv-cache-memory 4GiB \
  --kv-offload-memory 8GiB --prefix-len 2048 --num-iters 3 2>&1 | tail -12 | tee "$out/ttft-memory.txt"
mkdir -p /tmp/kvtier
timeout 120 python3 -m tokenmill bench kv-offload llama-1b --dtype bfloat16 --kv-cache-memory 4GiB \
  --kv-offload-folder /tmp/kvtier --prefix-len 2048 --num-iters 3 2>&1 | tail -12 | tee "$out/ttft-disk.txt"
timeout 150 python3 -m tokenmill analyze --offload --model llama-3.2-1b --hardware h100-sxm --gpu-memory 2GiB \
  --cpu-memory 16GiB --dtype bf16 --input-len 128 --output-len 64 --measure llama-1b 2>&1 | tail -16 \
  | tee "$out/plan.txt"
