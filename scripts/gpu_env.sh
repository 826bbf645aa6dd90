# Sourced by the scripts/gpu_*.sh checks: run from the repository root with the checkout on the
# Python path (the device machine has no network and no install), results in $OUT (or ./gpu-results)
# as $out, the GPU's name first.
set -u
cd "$(dirname "${BASH_SOURCE[1]}")/.."
export PYTHONPATH=. TOKENMILL_LOG_LEVEL=WARNING
out="${OUT:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
