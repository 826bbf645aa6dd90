#!/usr/bin/env bash
# Weight offloading on a lent GPU (the device tool), from the repository root: the CUDA tests of
# cpu_offload_gb, the pinned host-to-GPU bandwidth, and batch-1 decode of the llama-1b shape in bf16
# with 0, 1 and 2 GiB of its 2.5 GB of weights in pinned CPU memory (with and without prefetch).
source "$(dirname "$0")/gpu_env.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/e2e/test_weight_offload.py -k "cuda or gpu" 2>&1 | tail -8 \
  | tee "$out/tests.txt"
timeout 60 python3 - <<'PY' 2>&1 | tee "$out/bandwidth.txt"
import time, torch
host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
dev = torch.empty_like(host, device="cuda")
for _ in range(2):
    torch.cuda.synchronize(); t = time.perf_counter(); dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
print(f"pinned host -> GPU: {2**30 / (time.perf_counter() - t) / 1e9:.1f} GB/s (1 GiB copy)")
PY
for variant in "--cpu-offload-gb 0" "--cpu-offload-gb 1" "--cpu-offload-gb 1 --no-offload-prefetch" "--cpu-offload-gb 2"; do
  timeout 90 python3 -m tokenmill bench latency llama-1b --dtype bfloat16 $variant --num-iters 2 --output-len 32 \
    --kv-cache-memory 4GiB 2>&1 | grep -E "ms per output|first token|weight offload|Error" | sed "s/^/$variant: /" \
    | tee -a "$out/latency.txt"
done
# A batch of 64 reads each streamed unit once per step for all 64 sequences.
for variant in "--cpu-offload-gb 0" "--cpu-offload-gb 2"; do
  timeout 90 python3 -m tokenmill bench throughput llama-1b --dtype bfloat16 $variant --num-prompts 64 --input-len 128 \
    --output-len 64 --max-num-seqs 64 --kv-cache-memory 4GiB 2>&1 | grep -iE "tokens/s|Error" | sed "s/^/$variant: /" \
    | tee -a "$out/throughput.txt"
done
