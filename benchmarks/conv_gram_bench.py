"""The conv Gram ``AᵀA`` by im2col patches vs by shifts, per layer of the paper's ConvNet.

    python -m benchmarks.conv_gram_bench [--batch-size 500] [--repeats 10]

For each conv layer of the paper's ConvNet (input 32x32x3, 16x16x16, 8x8x20; 5x5 SAME),
times interleaved (median): the forward convolution, its backward pass (input and
kernel cotangents, what BackProp pays), and ``AᵀA`` (with bias) by
``conv_gram.gram(method="patches")`` and ``method="shifts"``, with the FLOP estimates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
from jax import lax

from proxprop_jax import conv_gram

LAYERS = [((32, 32), 3, 16), ((16, 16), 16, 20), ((8, 8), 20, 20)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  window, pads, ones = (5, 5), ((2, 2), (2, 2)), (1, 1)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; batch "
        f"{args.batch_size}, float32, median of {args.repeats} interleaved runs (ms)\n")
  print("| layer input | conv forward | conv backward (dx, dW) | Gram by patches | Gram by shifts "
        "| GFLOP patches / shifts |")
  print("|---|---|---|---|---|---|")
  for spatial, cin, cout in LAYERS:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(keys[0], (args.batch_size, *spatial, cin))
    w = jax.random.normal(keys[1], (*window, cin, cout))
    g = jax.random.normal(keys[2], (args.batch_size, *spatial, cout))
    conv = lambda x, w: lax.conv_general_dilated(x, w, ones, pads,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fns = {
        "forward": (jax.jit(conv), (x, w)),
        "backward": (jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)), (x, w, g)),
    }
    for method in ("patches", "shifts"):
      fns[method] = (jax.jit(lambda x, m=method: conv_gram.gram(x, window, ones, pads, ones,
                                                               True, method=m)), (x,))
    times = {k: [] for k in fns}
    for k, (f, a) in fns.items():
      jax.block_until_ready(f(*a))
    for _ in range(args.repeats):
      for k, (f, a) in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(f(*a))
        times[k].append(1e3 * (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = [conv_gram.gram_flops(x.shape, window, ones, pads, ones, True, m) / 1e9
             for m in ("patches", "shifts")]
    print(f"| {args.batch_size}x{spatial[0]}x{spatial[1]}x{cin} | {med['forward']:.1f} "
          f"| {med['backward']:.1f} | {med['patches']:.1f} | {med['shifts']:.1f} "
          f"| {flops[0]:.1f} / {flops[1]:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
