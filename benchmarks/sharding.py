"""ProxProp with sharded parameters and spread solves on 1, 2, 4 and 8 devices: memory, solve
FLOPs per device and the step time against BackProp with the same sharding.

    python -m benchmarks.sharding [--models mlp,transformer] [--devices 1,2,4,8]
                                  [--repeats 5] [--json PATH]

Without accelerators it runs on 8 fake CPU devices (``--xla_force_host_platform_device_count``,
set here before JAX starts). Models: the paper's MLP 3072-4000-1000-4000-10 (batch 512, which
8 devices divide) and a 4-block transformer (the experiments' ViT, width 128, 4 heads, MLP 256,
8x8 patches of 4x4 pixels: 64 tokens; batch 64), both ``prox_cg3``. Shardings, on ``n``
devices:

* ``dp``: data parallel (the batch over ``data=n``), parameters replicated;
* ``dp+spread``: the same with ``distribute_solves=True``;
* ``fsdp``: the batch and every kernel's model width over ``fsdp=n``;
* ``tp``: the batch over ``data=n/2``, heads and hidden widths over ``model=2`` (Megatron).

Per row: the per-device bytes of parameters and optimizer state (XLA's arguments) and XLA's
peak (arguments + outputs + temporaries − donated), the solve FLOPs per device (XLA's cost
analysis of the ProxProp step minus the BackProp step's, same sharding: products only; on
CPU the factorisations and triangular solves are LAPACK calls it does not count), and the
step time of ProxProp over BackProp (interleaved, median). Fake CPU devices share the host's
cores, so their times only indicate the programs' cost, not a multi-device speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks import common  # noqa: E402
from experiments import models  # noqa: E402
from proxprop_jax import parallel  # noqa: E402

MODE = "prox_cg3"
MODELS = {
    "mlp": dict(model="mlp", batch=512, sizes={}),
    "transformer": dict(model="vit", batch=64, sizes=dict(dim=128, depth=4, heads=4,
                                                         mlp_dim=256, patch=4)),
}
SHARDINGS = ("dp", "dp+spread", "fsdp", "tp")


def mesh_of(sharding: str, n: int):
  """``(mesh axes {name: size}, batch axes)`` of a sharding on ``n`` devices."""
  if sharding == "fsdp":
    return {"fsdp": n}, ("fsdp",)
  if sharding == "tp":
    return {"data": n // 2, "model": 2}, ("data",)
  return {"data": n}, ("data",)


def compile_step(name, spec, mode, sharding, n):
  """A `common.Compiled` step of ``spec``'s model in ``mode`` on ``n`` devices, its state
  placed as ``sharding`` says, and the batch for it."""
  axes, batch_axes = mesh_of(sharding, n)
  mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                       devices=jax.devices()[:n])
  with jax.set_mesh(mesh):
    net, opt = common.build(spec["model"], mode, sharding_rules=models.sharding_rules(axes),
                            distribute_solves=sharding == "dp+spread" and mode != "backprop",
                            **spec["sizes"])
    parallel.place((net, opt), mesh)
    step, state = common.train_step(net, opt)
    x, y = (jax.device_put(a, NamedSharding(mesh, P(batch_axes)))
            for a in common.synthetic_batch(spec["batch"]))
    shardings = (jax.tree.map(lambda a: a.sharding, state), NamedSharding(mesh, P()))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0, out_shardings=shardings).lower(
        state, x, y).compile()
  peak, detail = common.memory_of(compiled)
  entry = common.Compiled(name, compiled, state, time.perf_counter() - start, peak, detail)
  return entry, (x, y), float(compiled.cost_analysis()["flops"])


def run(model: str, counts, repeats: int, log) -> list[dict]:
  spec = MODELS[model]
  rows = []
  for n in counts:
    for sharding in SHARDINGS if n > 1 else ("dp",):
      log(f"{model}: {sharding} on {n} device(s)")
      prox, batch, prox_flops = compile_step(MODE, spec, MODE, sharding, n)
      base, _, base_flops = compile_step("backprop", spec, "backprop",
                                         "dp" if sharding == "dp+spread" else sharding, n)
      times = common.time_interleaved([prox, base], *batch, repeats=repeats)
      rows.append(dict(
          model=model, devices=n, sharding=sharding,
          state_mb=prox.memory_detail["argument"] / 2**20, peak_mb=prox.memory_bytes / 2**20,
          solve_gflops=(prox_flops - base_flops) / 1e9,
          backprop_ms=1e3 * common.median(times["backprop"]),
          ratio=common.median(times[MODE]) / common.median(times["backprop"])))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  counts = [int(n) for n in args.devices.split(",")]
  if max(counts) > jax.device_count() or any(n > 1 and n % 2 for n in counts):
    parser.error(f"--devices: 1 or even counts up to the {jax.device_count()} devices; got "
                 f"{args.devices}")
  log = lambda s: print(s, file=sys.stderr, flush=True)
  rows = [r for m in args.models.split(",") for r in run(m, counts, args.repeats, log)]
  env = common.environment()
  print(f"device: {env['device']} x {env['devices']}, jax {env['jax']}, flax {env['flax']}; "
        f"{MODE}, float32, {args.repeats} interleaved repeats, median. Fake CPU devices share "
        f"the host's cores: times are only indicative.\n")
  print("| model | devices | sharding | params+opt MB/device | peak MB/device | "
        "solve GFLOP/device | BackProp ms | ProxProp / BackProp |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['devices']} | {r['sharding']} | {r['state_mb']:.1f} | "
          f"{r['peak_mb']:.1f} | {r['solve_gflops']:.2f} | {r['backprop_ms']:.0f} | "
          f"{r['ratio']:.2f} |")
  common.write_json(args.json, env, args, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
