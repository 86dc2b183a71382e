"""Three sharded training steps in one process of a (possibly) multi-process JAX job.

tests/test_parallel.py starts two of these on loopback (2 fake CPU devices each, gloo
collectives) and one with 4 devices alone, and compares the parameters they write:

    python tests/_two_process_worker.py --devices 2 --coordinator-address 127.0.0.1:PORT \\
        --num-processes 2 --process-id 0 --out p0.npz
    python tests/_two_process_worker.py --devices 4 --out ref.npz

Every process builds the same models (same seed) and the same global batches, feeds *its
slice* of each global batch to `parallel.shard_batch`, and steps with
`parallel.make_sharded_step` on a mesh over all processes' devices. Models: the small MLP
in ``prox_cg3`` (batch-space solve: rows of both processes) and the small ConvNet in
``prox_exact`` (parameter-space Gram summed over both processes).
"""

from __future__ import annotations

import argparse
import os

STEPS = 3
GLOBAL_BATCH = 16


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, required=True, help="local fake CPU devices")
  parser.add_argument("--coordinator-address", default=None)
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
      " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  os.environ["JAX_PLATFORMS"] = "cpu"

  import jax
  import numpy as np
  import optax
  from flax import nnx

  from proxprop_jax import parallel
  from _parallel_worker import _models  # this script's folder is on sys.path

  distributed = parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                                args.process_id)
  assert distributed == (args.num_processes is not None)
  assert jax.local_device_count() == args.devices
  processes, index = jax.process_count(), jax.process_index()
  mesh = parallel.make_mesh()  # all devices of all processes

  def step_fn(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads)
    return loss

  step = parallel.make_sharded_step(step_fn, mesh)
  builders = _models()
  out = {}
  for name, mode in (("mlp", "prox_cg3"), ("convnet", "prox_exact")):
    cls, shape = builders[name]
    model = cls(mode, None, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5, momentum=0.9, nesterov=True),
                              wrt=nnx.Param)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      out["init/" + name + "/" + "/".join(map(str, path))] = np.asarray(var.get_value())
    parallel.replicate((model, optimizer), mesh)
    rng = np.random.default_rng(42)
    for _ in range(STEPS):
      x = rng.normal(size=(GLOBAL_BATCH, *shape)).astype(np.float32)
      y = rng.integers(0, 10, size=GLOBAL_BATCH).astype(np.int32)
      rows = slice(index * GLOBAL_BATCH // processes, (index + 1) * GLOBAL_BATCH // processes)
      loss = step(model, optimizer, *parallel.shard_batch((x[rows], y[rows]), mesh))
    out[f"{name}/loss"] = np.asarray(loss)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      value = var.get_value()
      assert value.is_fully_replicated, (path, value.sharding)
      out[name + "/" + "/".join(map(str, path))] = np.asarray(value)
  np.savez(args.out, **out)
  if distributed:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
