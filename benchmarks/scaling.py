"""How ProxProp's cost grows with batch size and width (MLP), as a ratio to BackProp.

    python -m benchmarks.scaling [--batch-sizes 100,500,2000] [--widths 1000,4000,8000]
                                 [--modes ...] [--repeats 5] [--json PATH]

For each (batch size, width) the MLP ``3072-w-w/4-w-10`` (``w = 4000`` is the paper's
``3072-4000-1000-4000-10``) is compiled in every mode and a plain-flax BackProp, the
steps are timed interleaved (`benchmarks.step_time.run_model`), and the ratios to
BackProp are printed as one Markdown table per mode.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import common, step_time

DEFAULT_MODES = ("backprop", "gradient", "prox_exact", "prox_cg1", "prox_cg3", "prox_cg10")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-sizes", default="100,500,2000")
  parser.add_argument("--widths", default="1000,4000,8000")
  parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batch_sizes.split(",")]
  widths = [int(w) for w in args.widths.split(",")]
  modes = [m for m in args.modes.split(",") if m]
  if "backprop" not in modes:
    modes.insert(0, "backprop")
  log = lambda s: print(s, file=sys.stderr, flush=True)
  rows = []
  for width in widths:
    for batch in batches:
      log(f"width {width}, batch {batch}")
      rows += step_time.run_model("mlp", modes, batch, args.repeats, args.warmup,
                                  hidden=(width, width // 4, width), log=log)
  env = common.environment()
  print(f"device: {env['device']}, jax {env['jax']}, flax {env['flax']}; MLP 3072-w-w/4-w-10, "
        f"float32, {args.repeats} interleaved repeats after {args.warmup} warm-up, median")
  table = {(r["batch_size"], r["hidden"][0], r["mode"]): r for r in rows}
  for mode in modes:
    print(f"\n**{mode}**: " + ("step time of BackProp (ms)" if mode == "backprop"
                               else "ratio to BackProp"))
    print()
    print("| width \\ batch | " + " | ".join(str(b) for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for width in widths:
      cells = []
      for batch in batches:
        r = table[(batch, width, mode)]
        cells.append(f"{r['median_ms']:.0f}" if mode == "backprop" else f"{r['ratio']:.2f}")
      print(f"| {width} | " + " | ".join(cells) + " |")
  common.write_json(args.json, env, args, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
