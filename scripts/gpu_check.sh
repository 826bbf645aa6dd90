#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool), from the repository root:
#   the CUDA tests of the Triton paths, then `tokenmill bench suite` on the llama-1b shape in bf16
#   (tokenmill against transformers on the same GPU). Results go to $OUT (or ./gpu-results).
# That machine has torch with CUDA, Triton and transformers, and no network: run with PYTHONPATH=.
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
if python3 -c "import pytest" 2>/dev/null; then
  timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/unit/test_triton_kernels.py \
    tests/unit/test_attention_backends.py tests/models/test_parity.py -k "triton" 2>&1 | tail -25 | tee "$out/tests.txt"
else
  echo "pytest is not installed here: GPU tests skipped" | tee "$out/tests.txt"
fi
timeout 240 python3 -m tokenmill bench suite llama-1b --dtype bfloat16 --kv-cache-memory 16GiB \
  --output-json "$out/suite-llama-1b-bf16.json" 2>&1 | tail -25 | tee "$out/suite.txt"
# Quantized weights on CUDA (dequantized per call there: correct, not yet fast): a correctness
# check against the float formula, then batch-1 latency of the same shape.
timeout 60 python3 - <<'PY' 2>&1 | tee "$out/quant-check.txt"
import torch
from tokenmill.layers.quantization.quantized_matrix import QuantizedMatrix
from tokenmill.layers.quantization.rtn import quantize_rtn
for bits, group in ((8, -1), (4, 64)):
    codes, scales, zeros = quantize_rtn(torch.randn(256, 512), bits, group, sym=bits == 8)
    matrix = QuantizedMatrix(codes, scales, zeros, bits, group).cuda()
    x = torch.randn(3, 512, device="cuda")
    ref = x @ matrix.dequantize().T
    print(bits, group, "max error", (matrix(x) - ref).abs().max().item())
PY
for q in int8 int4; do
  timeout 75 python3 -m tokenmill bench latency llama-1b --dtype bfloat16 --quantization "$q" --num-iters 1 \
    --output-len 32 --output-json "$out/latency-llama-1b-$q.json" 2>&1 | tail -12 | tee "$out/latency-$q.txt"
done
