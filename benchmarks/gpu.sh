#!/usr/bin/env bash
# The GPU measurements in one call of about 6 minutes, on one GPU with jax[cuda] installed
# (the repository on PYTHONPATH or pip-installed). Each part runs under its own time limit and
# writes its file to $OUT the moment it is done, so a part that runs out of time loses only
# itself; the last line says which parts finished. At most 8 files, all in $OUT:
#
#   step_time.md/.json  the paper's MLP and ConvNet, every mode, batch 500, interleaved, plus
#                       MLP variants of the solve compared in the same process: CG unrolled
#                       (prox_cgN/unroll) and 3-pass solve precisions (prox_*/tf32_..., bf16_...)
#   vit.md              the ViT, batch 500
#   batch4096.md        the MLP at batch 4096 (the FLOP floor of RESULTS.md section 4), then
#                       MLP steps compiled with XLA's autotuning off (where a compile goes)
#   calibrate.md        the planner's cost constants measured here, and the plans they give
#   --- then, at once (their numbers do not depend on the timing of the others):
#   accuracy.md         every mode's direction against float64 at every solve_precision
#   pytest.txt          the `gpu` smoke set of the tests (pytest -m gpu)
#   cifar.txt           one experiments.cifar run on digits (its first-minute lines)
#
#   OUT=benchmarks/out bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Several processes share the GPU in the second half: none takes 75 % of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
done_parts=()

part() {  # part NAME SECONDS FILE COMMAND...: run COMMAND under a time limit into FILE
  local name=$1 limit=$2 file=$3 start=$SECONDS
  shift 3
  timeout "$limit" "$@" >"$OUT/$file.tmp" 2>&1
  local rc=$?
  mv "$OUT/$file.tmp" "$OUT/$file"
  echo "[$name] exit $rc after $((SECONDS - start)) s (limit $limit s) -> $OUT/$file"
  [ "$rc" -eq 0 ] && done_parts+=("$name")
  return 0
}

python -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', jax.devices(); \
print('GPU:', d.device_kind, 'jax', jax.__version__)" || exit 1

MODES=backprop,gradient,prox_exact,prox_cg1,prox_cg3,prox_cg10
VARIANTS=prox_cg3/unroll,prox_cg10/unroll,prox_exact/tf32_tf32_f32_x3,prox_cg3/tf32_tf32_f32_x3
VARIANTS=$VARIANTS,prox_cg3/bf16_bf16_f32_x3
part step_time 140 step_time.md python -m benchmarks.step_time --model mlp \
  --modes "$MODES,$VARIANTS" --repeats 20 --warmup 2 --json "$OUT/step_time.json"
part step_time_convnet 50 step_time_convnet.tmp.md python -m benchmarks.step_time \
  --model convnet --modes "$MODES" --repeats 20 --warmup 2
cat "$OUT/step_time_convnet.tmp.md" >>"$OUT/step_time.md" && rm "$OUT/step_time_convnet.tmp.md"
part vit 35 vit.md python -m benchmarks.step_time --model vit \
  --modes backprop,gradient,prox_exact,prox_cg1,prox_cg3 --repeats 15
part batch4096 35 batch4096.md python -m benchmarks.step_time --model mlp --batch-size 4096 \
  --modes backprop,prox_exact,prox_cg3,prox_cg3/tf32_tf32_f32_x3 --repeats 10
# Where a first compile goes: the same steps with XLA's autotuning off (their compile times).
part no_autotune 30 no_autotune.tmp.md env XLA_FLAGS=--xla_gpu_autotune_level=0 \
  python -m benchmarks.step_time --model mlp --modes backprop,prox_exact,prox_cg3 --repeats 3
cat "$OUT/no_autotune.tmp.md" >>"$OUT/batch4096.md" && rm "$OUT/no_autotune.tmp.md"
part calibrate 20 calibrate.md python -m benchmarks.calibrate

part accuracy 65 accuracy.md python -m benchmarks.accuracy --taus 1 \
  --settings highest,default,tf32_tf32_f32_x3,bf16_bf16_f32_x3,bf16_bf16_f32_x6 &
part pytest 65 pytest.txt python -m pytest -q -m gpu -n 4 -p no:cacheprovider tests &
part cifar 65 cifar.txt python -m experiments.cifar --dataset digits --model mlp \
  --mode prox_exact --optimizer nesterov --lr 1 --tau-prox 0.05 --epochs 2 --quiet \
  --out "$(mktemp -d)/run" --compile-cache "$(mktemp -d)" &
wait
echo "finished: ${done_parts[*]:-none} (accuracy, pytest and cifar ran in the background: see" \
  "their exit lines above)"
