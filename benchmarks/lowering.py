"""What one training step lowers to for a GPU, counted without a GPU.

    python -m benchmarks.lowering [--model mlp|convnet|resnet|vit|all] [--modes ...]
                                  [--batch-size 500] [--platform cuda] [--json PATH]

``jax.export`` lowers a jitted step for another platform on this machine: the StableHLO
module a GPU would compile. This counts, per (model, mode), what a GPU runs as separate,
often latency-bound operations: the solver library calls (``custom_call @cusolver_*``),
triangular solves, ``while`` loops (each iteration launched from the host),
conditionals (``case``: the host reads the predicate first), and the matrix products and
convolutions by precision (``highest``: true float32, several times slower than the
TF32 ``default`` on a GPU; an algorithm preset such as ``bf16_x3``).

The exported module outlines repeated pieces into private functions; every count goes
through their calls, so it is the number of operations in the program text as a whole
(a loop body counts once, both branches of a conditional count). The counts are
static: they do not depend on the device, only on the program JAX hands to XLA.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

import jax

from proxprop_jax import planner

#: The planner's backend for each export platform (JAX calls CUDA and ROCm devices "gpu").
PLANNING_BACKEND = {"cuda": "gpu", "rocm": "gpu"}

_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")
_CUSTOM = re.compile(r"stablehlo\.custom_call @([\w.$-]+)")
_PRIMITIVE = re.compile(r"stablehlo\.(while|case|if|triangular_solve|dot_general|convolution)\b")
_ALGORITHM = re.compile(r"lhs_precision_type = (\w+).*?num_primitive_operations = (\d+)")
_PRECISION = re.compile(r"precision = \[(\w+), ")


def export_text(fn, *args, platform: str = "cuda") -> str:
  """The StableHLO text of ``jax.jit(fn)(*args)`` lowered for ``platform``, traced anew
  (a fresh function: JAX's trace cache would return a trace made under other plans)."""
  fresh = lambda *args: fn(*args)
  return jax.export.export(jax.jit(fresh), platforms=(platform,))(*args).mlir_module()


def _product_kind(line: str) -> str:
  algorithm = _ALGORITHM.search(line)
  if algorithm:
    kind, passes = algorithm.groups()
    return f"{kind}_x{passes}" if passes != "1" else kind
  precision = _PRECISION.search(line)
  return precision.group(1).lower() if precision else "default"


def _own_counts(lines) -> tuple[collections.Counter, list[str]]:
  counts, calls = collections.Counter(), []
  for line in lines:
    calls += _CALL.findall(line)
    for target in _CUSTOM.findall(line):
      counts[f"custom_call {target}"] += 1
    for op in _PRIMITIVE.findall(line):
      if op in ("dot_general", "convolution"):
        counts[f"{op} {_product_kind(line)}"] += 1
      else:
        counts[op] += 1
  return counts, calls


def count_ops(module: str, entry: str = "main") -> collections.Counter:
  """The operations of ``entry`` and, through every ``call``, of the functions it calls."""
  bodies, name = {}, None
  for line in module.splitlines():
    start = _FUNC.match(line)
    if start:
      name = start.group(1)
      bodies[name] = []
    if name is not None:
      bodies[name].append(line)
  parsed = {name: _own_counts(lines) for name, lines in bodies.items()}
  memo: dict[str, collections.Counter] = {}

  def total(name):
    if name not in memo:
      own, calls = parsed[name]
      memo[name] = own + sum((total(c) for c in calls if c in parsed), collections.Counter())
    return memo[name]

  return total(entry)


def summary(counts: collections.Counter) -> dict:
  """The counts that matter on a GPU, as one flat dict (zeros included)."""
  by_kind = collections.Counter()
  for k, v in counts.items():
    if k.startswith(("dot_general ", "convolution ")):
      by_kind[k.split(" ", 1)[1]] += v
  return {
      "cusolver": {k.split(" ", 1)[1]: v for k, v in counts.items()
                   if k.startswith("custom_call ") and "cusolver" in k},
      "triangular_solve": counts["triangular_solve"],
      "while": counts["while"],
      "conditional": counts["case"] + counts["if"],
      "products": sum(by_kind.values()),
      "products_by_precision": dict(sorted(by_kind.items())),
  }


def step_counts(model: str, mode: str, batch_size: int, platform: str = "cuda") -> dict:
  """`summary` of one training step of ``model`` in ``mode`` (the benchmarks' step)."""
  from benchmarks import common  # the models need flax/optax; imported only when used

  x, y = common.synthetic_batch(batch_size)
  net, opt = common.build(model, mode)
  step, state = common.train_step(net, opt)
  with planner.planning(PLANNING_BACKEND.get(platform, platform)):  # plan for the target
    text = export_text(step, state, x, y, platform=platform)
  return summary(count_ops(text))


def markdown(rows) -> str:
  lines = ["| model | mode | cusolver calls | triangular solves | while loops | conditionals "
           "| products (by precision) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    solver = ", ".join(f"{k.removeprefix('cusolver_').removesuffix('_ffi')} {v}"
                       for k, v in sorted(r["cusolver"].items())) or "–"
    products = ", ".join(f"{k} {v}" for k, v in r["products_by_precision"].items())
    lines.append(f"| {r['model']} | {r['mode']} | {solver} | {r['triangular_solve']} "
                 f"| {r['while']} | {r['conditional']} | {r['products']}: {products} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.lowering",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="all", choices=("mlp", "convnet", "resnet", "vit", "all"),
                      help="all: the paper's two models")
  parser.add_argument("--modes", default="backprop,gradient,prox_exact,prox_cg1,prox_cg3,prox_cg10")
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--platform", default="cuda", help="the platform to lower for")
  parser.add_argument("--json", default=None, help="also write the rows here")
  args = parser.parse_args(argv)
  models = ("mlp", "convnet") if args.model == "all" else (args.model,)
  rows = []
  for model in models:
    for mode in (m.strip() for m in args.modes.split(",") if m.strip()):
      rows.append(dict(model=model, mode=mode,
                       **step_counts(model, mode, args.batch_size, args.platform)))
      print(f"  lowered {model}/{mode}", file=sys.stderr, flush=True)
  print(f"one training step lowered for {args.platform} (jax {jax.__version__}), batch "
        f"{args.batch_size}; static counts through every outlined call\n")
  print(markdown(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
