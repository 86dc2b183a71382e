#!/usr/bin/env bash
# XLA CPU flags vs the ConvNet BackProp step (flax's max_pool and pp.max_pool).
# XLA reads its flags once per process, so every setting runs in its own process; the settings
# alternate, ROUNDS times, to spread the machine's load changes over all of them.
#   bash benchmarks/conv_xla_flags.sh [ROUNDS]
set -uo pipefail
cd "$(dirname "$0")/.."
FLAGS=("" "--xla_cpu_use_onednn=true" "--xla_cpu_use_xnnpack=false"
       "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"
       "--xla_cpu_experimental_ynn_fusion_type=dot" "--xla_cpu_multi_thread_eigen=false")
echo "| round | XLA_FLAGS | BackProp step, flax max_pool (ms) | BackProp step, pp.max_pool (ms) |"
echo "|---|---|---|---|"
for round in $(seq "${1:-2}"); do
  for flags in "${FLAGS[@]}"; do
    row=$(XLA_FLAGS="$flags" python -m benchmarks.conv_floor --modes backprop --repeats 8 \
          2>/dev/null | grep '^| backprop |')
    IFS='|' read -r _ _ before after _ <<< "${row:-| | failed | failed |}"
    echo "| $round | \`$flags\` |$before|$after|"
  done
done
