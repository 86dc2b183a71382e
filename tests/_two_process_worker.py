"""Three sharded training steps in one process of a (possibly) multi-process JAX job.

tests/test_parallel.py starts two of these on loopback (4 fake CPU devices each, gloo
collectives) and one with 8 devices alone, and compares the parameters they write:

    python tests/_two_process_worker.py --devices 4 --coordinator-address 127.0.0.1:PORT \\
        --num-processes 2 --process-id 0 --out p0.npz
    python tests/_two_process_worker.py --devices 8 --out ref.npz

Every process builds the same models (same seed) and the same global batches, feeds *its
slice* of each global batch to `parallel.shard_batch`, and steps with
`parallel.make_sharded_step` on a mesh over all processes' devices. Models: the small MLP
in ``prox_cg3`` (batch-space solve: rows of both processes) and the small ConvNet in
``prox_exact`` (parameter-space Gram summed over both processes), both replicated on a 1-D
mesh, and the small MLP in ``prox_exact`` with its kernels split as its annotations say
(`experiments.models`: column- then row-parallel over ``model``) on a mesh
``data=4, model=2``, the batch over ``data``.
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

  from jax.experimental import multihost_utils

  from experiments import models
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

  grid = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  builders = _models()

  def sharded_mlp(mode, axis_name, rngs):
    del axis_name, rngs  # the annotated MLP of the experiments, small
    return models.build("mlp", mode=mode, input_shape=(16,), tau_prox=0.05,
                        hidden_sizes=(32, 24), sharding_rules=models.sharding_rules(
                            grid.axis_names))

  builders["mlp_sharded"] = (sharded_mlp, (16,))
  out = {}
  for name, mode, on, axes in (("mlp", "prox_cg3", mesh, None),
                               ("convnet", "prox_exact", mesh, None),
                               ("mlp_sharded", "prox_exact", grid, "data")):
    cls, shape = builders[name]
    with jax.set_mesh(on):  # flax splits annotated variables (and their optimizer state)
      model = cls(mode, None, nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, optax.sgd(0.5, momentum=0.9, nesterov=True),
                                wrt=nnx.Param)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      value = multihost_utils.process_allgather(var.get_value(), tiled=True)
      out["init/" + name + "/" + "/".join(map(str, path))] = np.asarray(value)
    if axes is None:
      parallel.replicate((model, optimizer), on)
    else:
      parallel.place((model, optimizer), on)
    step = parallel.make_sharded_step(step_fn, on)
    rng = np.random.default_rng(42)
    for _ in range(STEPS):
      x = rng.normal(size=(GLOBAL_BATCH, *shape)).astype(np.float32)
      y = rng.integers(0, 10, size=GLOBAL_BATCH).astype(np.int32)
      rows = slice(index * GLOBAL_BATCH // processes, (index + 1) * GLOBAL_BATCH // processes)
      loss = step(model, optimizer, *parallel.shard_batch((x[rows], y[rows]), on, axes))
    out[f"{name}/loss"] = np.asarray(loss)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      value = var.get_value()
      # Replicated stays replicated; the hidden kernels stay split over `model`.
      if axes is None or (path[0] == "hidden" and path[-1] == "kernel"):
        assert value.is_fully_replicated == (axes is None), (path, value.sharding)
      out[name + "/" + "/".join(map(str, path))] = np.asarray(
          multihost_utils.process_allgather(value, tiled=True))
  np.savez(args.out, **out)
  if distributed:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
