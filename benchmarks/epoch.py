"""One epoch of CIFAR-shaped synthetic data per (model, mode), and the paper's grid.

    python -m benchmarks.epoch [--model mlp|convnet|all] [--modes ...] [--samples 45000]
                               [--batch-size 500] [--json PATH]

For every (model, mode): compiles the training step of `benchmarks.common`, puts
``samples`` random 32×32×3 images and labels on the device, runs one warm-up step,
then one full epoch (``samples // batch_size`` steps, batches sliced on the device
beforehand) and reports its wall time. From these it estimates how long the paper's grid
(`experiments.config.PAPER_GRID`, 50 epochs of each run: MLP BackProp, prox_exact, prox_cg3,
prox_cg5, prox_cg10; ConvNet BackProp, prox_cg3, prox_cg10) takes, training steps only (no
evaluation, no data loading).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from benchmarks import common
from experiments import config as config_lib

DEFAULT_MODES = {
    "mlp": ("backprop", "gradient", "prox_exact", "prox_cg1", "prox_cg3", "prox_cg5",
            "prox_cg10"),
    "convnet": ("backprop", "gradient", "prox_exact", "prox_cg1", "prox_cg3", "prox_cg10"),
}
PAPER_EPOCHS = 50  # of every run of the paper's grid


def epoch_time(model: str, mode: str, xs, ys) -> dict:
  """Compiles ``model``/``mode`` and times one epoch over the batches ``xs``, ``ys``."""
  entry = common.compile_step(model, mode, xs[0], ys[0])
  state, loss = entry.step(entry.state, xs[0], ys[0])  # warm-up
  jax.block_until_ready((state, loss))
  start = time.perf_counter()
  for x, y in zip(xs, ys):
    state, loss = entry.step(state, x, y)
  jax.block_until_ready((state, loss))
  seconds = time.perf_counter() - start
  return dict(model=model, mode=mode, steps=len(xs), epoch_s=seconds,
              step_ms=1e3 * seconds / len(xs), compile_s=entry.compile_s,
              final_loss=float(loss))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="all", choices=("mlp", "convnet", "all"))
  parser.add_argument("--modes", default=None, help="comma-separated (default: see source)")
  parser.add_argument("--samples", type=int, default=45000)
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  models = ("mlp", "convnet") if args.model == "all" else (args.model,)
  steps = args.samples // args.batch_size
  x, y = common.synthetic_batch(steps * args.batch_size, seed=1)
  xs = [x[i * args.batch_size:(i + 1) * args.batch_size] for i in range(steps)]
  ys = [y[i * args.batch_size:(i + 1) * args.batch_size] for i in range(steps)]
  jax.block_until_ready((xs, ys))
  env = common.environment()
  rows = []
  for model in models:
    modes = DEFAULT_MODES[model] if args.modes is None else args.modes.split(",")
    for mode in modes:
      row = epoch_time(model, mode, xs, ys)
      print(f"  {model}/{mode}: epoch {row['epoch_s']:.2f} s", file=sys.stderr, flush=True)
      rows.append(row)
  print(f"device: {env['device']}, jax {env['jax']}, flax {env['flax']}; one epoch of "
        f"{steps * args.batch_size} synthetic 32x32x3 samples, batch {args.batch_size}, float32")
  print()
  print("| model | mode | epoch (s) | step (ms) | compile (s) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['mode']} | {r['epoch_s']:.2f} | {r['step_ms']:.2f} "
          f"| {r['compile_s']:.1f} |")
  times = {(r["model"], r["mode"]): r["epoch_s"] for r in rows}
  common.write_json(args.json, env, args, rows)
  scale = 45000 / (steps * args.batch_size)
  grid = [(run.model, run.mode) for run in config_lib.PAPER_GRID]
  if all(k in times for k in grid):
    total = sum(times[k] for k in grid) * PAPER_EPOCHS * scale
    print(f"\nthe paper's grid ({len(grid)} runs x {PAPER_EPOCHS} epochs of 45 000 "
          f"samples, training steps only): {total / 60:.1f} min on this device")
  return 0


if __name__ == "__main__":
  sys.exit(main())
