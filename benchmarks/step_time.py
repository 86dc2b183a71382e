"""Step time of ProxProp vs plain BackProp on the paper's models (and a ResNet and a ViT).

    python -m benchmarks.step_time [--model mlp|convnet|resnet|vit|all]
                                   [--modes backprop,gradient,...] [--batch-size 500]
                                   [--repeats 20] [--json PATH]

Builds the paper's MLP and/or ConvNet once per mode (hidden layers ``pp.Linear`` /
``pp.Conv``; ``backprop`` = the same model from plain flax layers), compiles one
training step per mode in this process (loss, backward pass, optax update; the batch
is a jit argument), then times all modes interleaved (after warm-up, every round runs
each mode once, in a shuffled order) with ``block_until_ready`` and prints a Markdown
table: median step time,
ratio to BackProp, compile time (``lower().compile()``), peak memory (XLA's memory
analysis of the compiled step: arguments + outputs + temporaries − donated/aliased
bytes; on a GPU the process-wide device peak is printed below the table) and the
device and library versions.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from benchmarks import common

DEFAULT_MODES = ("backprop", "gradient", "prox_exact", "prox_cg1", "prox_cg3", "prox_cg10")

#: The reference PyTorch implementation measured on a 2-core CPU, ratio to BackProp.
REFERENCE = {
    "mlp": {"gradient": 2.9, "prox_cg1": 5.6, "prox_cg3": 9.5, "prox_cg10": 21.6,
            "prox_exact": 8.4},
    "convnet": {"gradient": 2.1, "prox_cg1": 3.5, "prox_cg3": 5.4, "prox_cg10": 12.5},
}


def target(model: str, mode: str) -> float | None:
  """This project's CPU target for the ratio to BackProp (None: no target)."""
  if mode == "backprop":
    return None
  if mode == "gradient":
    return 1.05
  if model == "mlp":
    return 1.15 if mode == "prox_exact" else 1.3
  ref = REFERENCE["convnet"].get(mode)
  return 2.5 if ref is None else min(2.5, ref / 2)


def run_model(model: str, modes, batch_size: int, repeats: int, warmup: int, hidden=None,
              log=print) -> list[dict]:
  """Compiles and times ``modes`` of ``model``; returns one row per mode."""
  x, y = common.synthetic_batch(batch_size)
  entries = []
  for mode in modes:
    entry = common.compile_step(model, mode, x, y, hidden=hidden)
    log(f"  compiled {model}/{mode} in {entry.compile_s:.1f} s")
    entries.append(entry)
  times = common.time_interleaved(entries, x, y, repeats=repeats, warmup=warmup)
  base = common.median(times["backprop"]) if "backprop" in times else None
  base_mem = next((e.memory_bytes for e in entries if e.name == "backprop"), None)
  rows = []
  for e in entries:
    t = common.median(times[e.name])
    rows.append(dict(
        model=model, mode=e.name, batch_size=batch_size, hidden=hidden,
        median_ms=1e3 * t, min_ms=1e3 * min(times[e.name]),
        ratio=None if base is None else t / base,
        reference_ratio=REFERENCE.get(model, {}).get(e.name),
        target=target(model, e.name),
        compile_s=e.compile_s, memory_mb=None if e.memory_bytes is None else e.memory_bytes / 2**20,
        memory_ratio=(None if e.memory_bytes is None or not base_mem
                      else e.memory_bytes / base_mem),
        memory_detail=e.memory_detail, times_ms=[1e3 * s for s in times[e.name]]))
  del entries
  return rows


def _fmt(v, spec):
  return "–" if v is None else format(v, spec)


def markdown(rows) -> str:
  lines = ["| model | mode | step (ms) | ratio to BackProp | target | reference | compile (s) "
           "| peak memory (MiB) | memory ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ok = ""
    if r["target"] is not None and r["ratio"] is not None:
      ok = " ✓" if r["ratio"] <= r["target"] else " ✗"
    lines.append(
        f"| {r['model']} | {r['mode']} | {r['median_ms']:.1f} | {_fmt(r['ratio'], '.2f')}{ok} "
        f"| {_fmt(r['target'], '.2f')} | {_fmt(r['reference_ratio'], '.1f')} "
        f"| {r['compile_s']:.1f} | {_fmt(r['memory_mb'], '.0f')} "
        f"| {_fmt(r['memory_ratio'], '.2f')} |")
  return "\n".join(lines)


def header(env: dict, args) -> str:
  return (f"device: {env['device']} (x{env['devices']}), jax {env['jax']}, jaxlib "
          f"{env['jaxlib']}, flax {env['flax']}, optax {env['optax']}; batch "
          f"{args.batch_size}, float32, {args.repeats} interleaved rounds (shuffled order) after "
          f"{args.warmup} warm-up steps, median; OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="all", choices=("mlp", "convnet", "resnet", "vit", "all"),
                      help="all: the paper's two models")
  parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                      help="comma-separated; 'backprop' is always added (the baseline)")
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--hidden", default=None,
                      help="MLP hidden sizes, comma-separated (default 4000,1000,4000)")
  parser.add_argument("--json", default=None, help="write the rows (with every timing) here")
  args = parser.parse_args(argv)

  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  if "backprop" not in modes:
    modes.insert(0, "backprop")
  hidden = None if args.hidden is None else [int(h) for h in args.hidden.split(",")]
  models = ("mlp", "convnet") if args.model == "all" else (args.model,)
  env = common.environment()
  log = lambda s: print(s, file=sys.stderr, flush=True)
  rows = []
  for model in models:
    rows += run_model(model, modes, args.batch_size, args.repeats, args.warmup,
                      hidden=hidden if model == "mlp" else None, log=log)
  print(header(env, args))
  print()
  print(markdown(rows))
  if jax.devices()[0].platform == "gpu":
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      print(f"\ndevice peak memory of the whole process (all modes loaded): "
            f"{stats['peak_bytes_in_use'] / 2**20:.0f} MiB")
  common.write_json(args.json, env, args, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
