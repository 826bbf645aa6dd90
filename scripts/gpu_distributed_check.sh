#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool), from the repository root: the model
# parity tests on CUDA (Triton backend; every dense and mixture-of-experts architecture), the Triton
# kernel tests, and tensor x pipeline parallelism with all four ranks on the one GPU (gloo through
# host memory) against one process. Results go to $OUT (or ./gpu-results).
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_parity.py -k "triton" 2>&1 | tail -15 \
  | tee "$out/parity.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/e2e/test_pipeline_parallel.py -k "gpu" 2>&1 | tail -15 \
  | tee "$out/distributed.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/unit/test_triton_kernels.py 2>&1 | tail -8 \
  | tee "$out/triton-kernels.txt"
