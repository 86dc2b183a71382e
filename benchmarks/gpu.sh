#!/usr/bin/env bash
# The performance benchmarks on one GPU, in under 10 minutes:
#   1. the step-time table (every mode vs plain-flax BackProp, batch 500);
#   2. one epoch of CIFAR-shaped synthetic data (45 000 x 32 x 32 x 3) per mode and model,
#      and from it the time of the paper's grid (50 epochs per run);
#   3. each mode's direction against float64 at solve_precision HIGHEST and DEFAULT;
#   4. the planner's cost constants measured on the GPU, and the plans they give.
# Needs jax with CUDA (pip install -e ".[cuda12]"). Writes Markdown and JSON to $OUT
# (default benchmarks/out/) and prints both tables; paste them into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python - <<'PY'
import jax
dev = jax.devices()[0]
assert dev.platform == "gpu", f"no GPU visible to jax: {jax.devices()}"
print(f"GPU: {dev.device_kind}, jax {jax.__version__}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$SECONDS
timeout 240 python -m benchmarks.step_time --repeats 30 --warmup 3 \
  --json "$OUT/step_time_gpu.json" | tee "$OUT/step_time_gpu.md"
echo "step_time: $((SECONDS - start)) s"
timeout 240 python -m benchmarks.epoch --json "$OUT/epoch_gpu.json" | tee "$OUT/epoch_gpu.md"
timeout 120 python -m benchmarks.accuracy --json "$OUT/accuracy_gpu.json" \
  | tee "$OUT/accuracy_gpu.md"
timeout 90 python -m benchmarks.calibrate | tee "$OUT/calibrate_gpu.md"
echo "total: $((SECONDS - start)) s"
