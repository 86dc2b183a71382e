"""Re-measures the planner's cost constants (`proxprop_jax.planner.COSTS`) on this machine.

    python -m benchmarks.calibrate [--size 512] [--columns 1024] [--repeats 7]

The planner counts costs in matrix-product FLOPs. This script times, interleaved (median),
a float32 ``n × n`` by ``n × k`` product and each operation the cost model charges
differently: a Cholesky factorisation and an ``eigh`` (per ``n³``), a triangular solve (per
its ``n²k`` FLOPs), one CG step's vector updates and one step of the eigenbasis recurrence
(per ``n·k`` element). Each constant is that time divided by the product's time per FLOP.
It prints the measured constants next to the ones in use, in the form of ``COSTS``, and the
plans both give for the paper's layers: paste the dictionary into ``planner.COSTS`` for a
new backend when the plans differ.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from proxprop_jax import layers, planner, solvers
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


def paper_problems() -> dict:
  """The hidden layers of the paper's models at batch 500."""
  conv = lambda shape, cin, cout: layers.Conv(True, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1))\
      .problem((500, *shape, cin), (5, 5, cin, cout), devices=1)
  return {"mlp 3072-4000": layers.Dense(True).problem((500, 3072), (3072, 4000), 1),
          "mlp 4000-1000": layers.Dense(True).problem((500, 4000), (4000, 1000), 1),
          "conv 32x32x3-16": conv((32, 32), 3, 16),
          "conv 16x16x16-20": conv((16, 16), 16, 20),
          "conv 8x8x20-20": conv((8, 8), 20, 20)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=512, help="n of the n × n system")
  parser.add_argument("--columns", type=int, default=1024, help="k right-hand sides")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  kind = "cpu" if backend == "cpu" else "accelerator"
  measured = measure(args.size, args.columns, args.repeats)
  in_use = planner.COSTS[kind]
  print(f"device: {jax.devices()[0].device_kind} ({backend}); n={args.size}, k={args.columns}, "
        f"median of {args.repeats} interleaved runs\n")
  print(f"| constant | in use (COSTS[{kind!r}]) | measured |\n|---|---|---|")
  for name, value in measured.items():
    print(f"| {name} | {in_use[name]:g} | {value:.3g} |")
  print(f"\nCOSTS[{kind!r}] = dict(" + ", ".join(f"{k}={v:.3g}" for k, v in measured.items())
        + ")\n")
  print("| layer | mode | plan with the constants in use | plan with the measured ones |")
  print("|---|---|---|---|")
  for name, problem in paper_problems().items():
    for mode in map(parse_mode, ("prox_exact", "prox_cg3", "prox_cg10")):
      now = planner.plan(problem, mode, backend)
      planner.COSTS["measured"] = measured
      try:
        new = planner.plan.__wrapped__(problem, mode, "measured")
      finally:
        del planner.COSTS["measured"]
      print(f"| {name} | {mode.name} | {now} | {new} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
