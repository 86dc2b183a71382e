"""Step time of a transformer built from plain flax layers, converted by ``pp.convert``,
vs the same model trained by BackProp.

    python -m benchmarks.convert_step [--modes backprop,gradient,prox_exact,...]
        [--blocks 2] [--width 256] [--heads 4] [--seq-len 64] [--batch-size 16]
        [--repeats 20] [--json PATH]

The model: ``blocks`` pre-norm transformer blocks (``nnx.LayerNorm``,
``nnx.MultiHeadAttention``, an ``nnx.Linear``-GELU-``nnx.Linear`` MLP of width
4·d) and a linear head, from plain flax layers. Each ProxProp mode converts every
layer ``pp.convert`` has a counterpart for (the head excluded); ``backprop`` keeps
the plain model. One step is loss, backward pass and an Adam update, compiled with
``jax.jit`` (state donated, batch as argument); all modes are timed interleaved in
this process (`common.time_interleaved`), median of ``repeats`` rounds.
"""

from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx

import proxprop_jax as pp
from benchmarks import common

DEFAULT_MODES = ("backprop", "gradient", "prox_exact", "prox_cg1", "prox_cg3", "prox_cg10")
CLASSES = 10


class Block(nnx.Module):
  """A pre-norm transformer block from plain flax layers."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.norm1, self.norm2 = nnx.LayerNorm(width, rngs=rngs), nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.mlp = nnx.Sequential(nnx.Linear(width, 4 * width, rngs=rngs), jax.nn.gelu,
                              nnx.Linear(4 * width, width, rngs=rngs))

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class Transformer(nnx.Module):

  def __init__(self, blocks: int, width: int, heads: int, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(blocks)])
    self.head = nnx.Linear(width, CLASSES, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def compile_step(mode: str, args, x, y) -> tuple[common.Compiled, pp.Report | None]:
  model = Transformer(args.blocks, args.width, args.heads, nnx.Rngs(0))
  report = None if mode == "backprop" else pp.convert(model, mode=mode, tau_prox=1.0,
                                                      exclude=("head",))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  loss = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return common.compile_train_step(mode, model, optimizer, x, y, loss), report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
  parser.add_argument("--blocks", type=int, default=2)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  for mode in modes:
    if mode != "backprop":
      pp.parse_mode(mode)  # a typo fails before anything compiles
  x = jax.random.normal(jax.random.key(0), (args.batch_size, args.seq_len, args.width))
  y = jax.random.randint(jax.random.key(1), (args.batch_size, args.seq_len), 0, CLASSES)
  entries, reports = [], {}
  for mode in modes:
    entry, reports[mode] = compile_step(mode, args, x, y)
    print(f"  compiled {mode} in {entry.compile_s:.1f} s", flush=True)
    entries.append(entry)
  times = common.time_interleaved(entries, x, y, repeats=args.repeats, warmup=args.warmup)
  base = common.median(times["backprop"]) if "backprop" in times else None
  env = common.environment()
  print(f"\nTransformer: {args.blocks} blocks, width {args.width}, {args.heads} heads, "
        f"batch {args.batch_size} x {args.seq_len} tokens; {env['device']}, jax {env['jax']}, "
        f"median of {args.repeats} interleaved rounds\n")
  print("| mode | step (ms) | ratio to BackProp | compile (s) | ProxProp parameters |")
  print("|---|---:|---:|---:|---:|")
  rows = []
  for entry in entries:
    step = common.median(times[entry.name])
    report = reports[entry.name]
    share = "–" if report is None else (
        f"{sum(r.params for r in report.converted) / sum(r.params for r in report.rows):.0%}")
    ratio = step / base if base else None
    print(f"| {entry.name} | {1e3 * step:.1f} | {'–' if ratio is None else f'{ratio:.2f}'} | "
          f"{entry.compile_s:.1f} | {share} |")
    rows.append(dict(mode=entry.name, step_s=step, ratio=ratio, compile_s=entry.compile_s,
                     times_s=times[entry.name]))
  if reports.get(modes[-1]) is not None:
    print(f"\nConverted layers ({modes[-1]}):\n\n{reports[modes[-1]].to_markdown()}")
  common.write_json(args.json, env, args, rows)


if __name__ == "__main__":
  main()
