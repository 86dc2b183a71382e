"""Re-measures the planner's cost constants (`proxprop_jax.planner.COSTS`) on this machine.

    python -m benchmarks.calibrate [--size 512] [--columns 1024] [--repeats 7]

The planner counts costs in matrix-product FLOPs. This script times, interleaved (median),
a float32 ``n × n`` by ``n × k`` product and each operation the cost model charges
differently: a Cholesky factorisation and an ``eigh`` (per ``n³``), a triangular solve (per
its ``n²k`` FLOPs), one CG step's vector updates and one step of the eigenbasis recurrence
(per ``n·k`` element). Each constant is that time divided by the product's time per FLOP.
It prints the measured constants next to the ones in use, in the form of ``COSTS``, and the
plans both give for every layer of the paper's MLP and ConvNet, the ResNet and the ViT
(batch 500): paste the dictionary into ``planner.COSTS`` when the plans differ.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from proxprop_jax import planner, solvers
from proxprop_jax.modes import parse_mode


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure(n: int, k: int, repeats: int) -> dict:
  """The cost constants of `planner.COSTS` measured for an ``n × n`` system, ``k`` columns."""
  keys = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(keys[0], (n, n))
  spd = a @ a.T / n + jnp.eye(n)
  rhs = jax.random.normal(keys[1], (n, k))
  evals = jnp.abs(jax.random.normal(keys[2], (n,)))
  high = lax.Precision.HIGHEST
  ops = {
      "matmul": (jax.jit(lambda m, b: jnp.matmul(m, b, precision=high)), (spd, rhs)),
      "cholesky": (jax.jit(jnp.linalg.cholesky), (spd,)),
      "eigh": (jax.jit(jnp.linalg.eigh), (spd,)),
      "trsm": (jax.jit(lambda m, b: lax.linalg.triangular_solve(m, b, left_side=True,
                                                                 lower=True)), (spd, rhs)),
      # One CG step is one product plus the vector updates: time both, keep the updates.
      "cg_step": (jax.jit(lambda m, b: solvers.gram_cg(m, b, 1.0, 2)), (spd, rhs)),
      "eig_cg_step": (jax.jit(lambda s, c: solvers.eig_cg(s, c, 1.0, 10)), (evals, rhs)),
  }
  times = {name: [] for name in ops}
  for fn, args in ops.values():
    jax.block_until_ready(fn(*args))  # compile
  for _ in range(repeats):
    for name, (fn, args) in ops.items():
      times[name].append(_timed(fn, *args))
  t = {name: statistics.median(v) for name, v in times.items()}
  per_flop = t["matmul"] / (2.0 * n * n * k)
  return {
      "cholesky": t["cholesky"] / per_flop / n**3,
      "eigh": t["eigh"] / per_flop / n**3,
      "trsm": t["trsm"] / per_flop / (n * n * k),
      "cg_step": max(t["cg_step"] - 2 * t["matmul"], 0.0) / 2 / per_flop / (n * k),
      "eig_cg_step": t["eig_cg_step"] / 10 / per_flop / (n * k),
  }


def model_problems(names=("mlp", "convnet", "resnet", "vit"), batch_size: int = 500) -> dict:
  """``{"model: layer sizes": Problem}``: every distinct system the layers of these models
  (`benchmarks.common`'s, batch ``batch_size``) plan a direction for, recorded by tracing
  one backward pass (`planner.recording`)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from benchmarks import common  # pylint: disable=import-outside-toplevel

  problems = {}
  x = jax.ShapeDtypeStruct((batch_size, *common.INPUT_SHAPE), jnp.float32)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  for name in names:
    step, state = common.train_step(*common.build(name, "prox_exact"))
    with planner.recording() as recorded:
      jax.eval_shape(step, state, x, y)
    for problem, _ in recorded:
      label = (f"{name}: B={problem.blocks} rows={problem.rows} p={problem.params} "
               f"k={problem.columns}")
      problems.setdefault(label, problem)
  return problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=512, help="n of the n × n system")
  parser.add_argument("--columns", type=int, default=1024, help="k right-hand sides")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--models", default="mlp,convnet,resnet,vit",
                      help="whose layers' plans to show (comma-separated)")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  measured = measure(args.size, args.columns, args.repeats)
  in_use = planner.COSTS.get(backend) or planner.COSTS["accelerator"]
  print(f"device: {jax.devices()[0].device_kind} ({backend}); n={args.size}, k={args.columns}, "
        f"median of {args.repeats} interleaved runs\n")
  print(f"| constant | in use for {backend!r} | measured |\n|---|---|---|")
  for name, value in measured.items():
    print(f"| {name} | {in_use[name]:g} | {value:.3g} |")
  print(f"\nCOSTS[{backend!r}] = dict(" + ", ".join(f"{k}={v:.3g}" for k, v in measured.items())
        + f", unroll_steps={in_use['unroll_steps']})\n")
  changed = 0
  print("| layer | mode | plan with the constants in use | plan with the measured ones |")
  print("|---|---|---|---|")
  for label, problem in model_problems(args.models.split(","), 500).items():
    for mode in map(parse_mode, ("prox_exact", "prox_cg3", "prox_cg10")):
      now = planner.plan(problem, mode, backend)
      with planner.planning(backend, **measured):
        new = planner.plan(problem, mode)
      changed += now != new
      print(f"| {label} | {mode.name} | {now} | {new}{' ← differs' if now != new else ''} |")
  print(f"\n{changed} plan(s) differ")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
