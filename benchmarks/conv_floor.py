"""The CPU floor of the paper's ConvNet: flax's ``max_pool`` vs ``proxprop_jax.pooling.max_pool``.

    python -m benchmarks.conv_floor [--modes backprop,prox_exact,prox_cg3] [--batch-size 500]
                                    [--repeats 15]

A plain BackProp step of the paper's ConvNet on CPU spends about a third of its time in the
backward pass of its two 2×2 max pools (XLA's ``select_and_scatter``). This script builds the
ConvNet (conv5×5 3→16 SAME, ReLU, pool 2 → conv5×5 16→20, ReLU, pool 2 → conv5×5 20→20, ReLU
→ Linear 1280→10, Adam; hidden convs ``pp.Conv`` in the ProxProp modes, plain ``nnx.Conv``
for ``backprop``) twice per mode — pooling with ``flax.nnx.max_pool`` and with
``proxprop_jax.pooling.max_pool`` — compiles one training step each (the batch a jit
argument, the state donated), and times all of them interleaved (shuffled order per round),
median. It also times the pool alone (forward + backward on the first pool's input).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import proxprop_jax as pp
from benchmarks import common
from proxprop_jax import pooling

POOLS = {"flax": nnx.max_pool, "pooling": pooling.max_pool}
TAU = 1.0  # the paper's ConvNet step size


class ConvNet(nnx.Module):
  """The paper's ConvNet for 32×32×3 inputs, with the given max-pool function."""

  def __init__(self, mode: str, pool, rngs: nnx.Rngs):
    def conv(cin, cout):
      if mode == "backprop":
        return nnx.Conv(cin, cout, (5, 5), padding="SAME", rngs=rngs)
      return pp.Conv(cin, cout, (5, 5), padding="SAME", mode=mode, tau_prox=TAU, rngs=rngs)

    self.pool = pool
    self.conv1, self.conv2, self.conv3 = conv(3, 16), conv(16, 20), conv(20, 20)
    self.head = nnx.Linear(8 * 8 * 20, 10, rngs=rngs)

  def __call__(self, x):
    x = self.pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = self.pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = nnx.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


def compile_step(name: str, mode: str, pool, x, y) -> common.Compiled:
  net = ConvNet(mode, pool, nnx.Rngs(0))
  return common.compile_train_step(name, net, nnx.Optimizer(net, optax.adam(1e-3), wrt=nnx.Param),
                                   x, y)


def pool_only(pool, batch_size: int):
  """Forward + backward of one pool on the first pool's input (batch, 32, 32, 16)."""
  x = jax.random.uniform(jax.random.key(1), (batch_size, 32, 32, 16))
  g = jax.random.normal(jax.random.key(2), (batch_size, 16, 16, 16))
  fn = jax.jit(jax.grad(lambda v, g: jnp.vdot(pool(v, (2, 2), strides=(2, 2)), g)))
  step = lambda state, x, y: (state, fn(x, g))
  return step, x


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--modes", default="backprop,prox_exact,prox_cg3")
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  if "backprop" not in modes:
    modes.insert(0, "backprop")

  x, y = common.synthetic_batch(args.batch_size)
  entries = []
  for mode in modes:
    for pool_name, pool in POOLS.items():
      entries.append(compile_step(f"{mode}/{pool_name}", mode, pool, x, y))
      print(f"  compiled {mode} with {pool_name} max_pool in {entries[-1].compile_s:.1f} s",
            file=sys.stderr, flush=True)
  times = common.time_interleaved(entries, x, y, repeats=args.repeats)
  del entries
  pool_entries = []
  for pool_name, pool in POOLS.items():
    step, pool_x = pool_only(pool, args.batch_size)
    pool_entries.append(common.Compiled(f"pool/{pool_name}", step, None, 0.0, None, {}))
  pool_times = common.time_interleaved(pool_entries, pool_x, None, repeats=args.repeats)

  ms = {k: 1e3 * statistics.median(v) for k, v in {**times, **pool_times}.items()}
  env = common.environment()
  print(f"device: {env['device']}, jax {env['jax']}, flax {env['flax']}; ConvNet, batch "
        f"{args.batch_size}, float32, {args.repeats} interleaved rounds (shuffled order), "
        f"median\n")
  print("| step | flax max_pool (ms) | pooling.max_pool (ms) | after / before "
        "| ratio to BackProp, before | ratio to BackProp, after |")
  print("|---|---|---|---|---|---|")
  for mode in modes:
    before, after = ms[f"{mode}/flax"], ms[f"{mode}/pooling"]
    print(f"| {mode} | {before:.0f} | {after:.0f} | {after / before:.2f} "
          f"| {before / ms['backprop/flax']:.2f} | {after / ms['backprop/pooling']:.2f} |")
  before, after = ms["pool/flax"], ms["pool/pooling"]
  print(f"| one 2×2 pool, forward + backward, on (batch, 32, 32, 16) | {before:.1f} "
        f"| {after:.1f} | {after / before:.2f} | – | – |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
