"""`pp.embed` and `pp.norm_affine` on 4 fake CPU devices against one device on the global batch.

tests/test_norms.py runs this in a subprocess (the device count must be set before JAX
starts) and asserts on the JSON it prints: for every (op, mode, style) the largest
difference of the direction relative to the one-device direction. Styles: ``shard_map``
with ``check_vma`` off (the per-device mean loss, reduced by the layers) and on
(differentiating ``pmean`` of the losses: autodiff sums replicated cotangents itself),
and ``jit`` on an Explicit mesh (no axis name; XLA reduces; ``norm_affine`` only, since
``jnp.take`` with sharded ids needs an ``out_sharding``, in flax's Embed too).

    python -m tests._norms_devices_worker
"""

import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import proxprop_jax as pp  # noqa: E402

MODES = ("prox_cg2",)  # the reductions are the same in every mode


def _losses(op, mode, axis_name):
  """The per-device (or whole-batch) mean loss of ``op`` as a function of its parameters."""
  if op == "embed":
    layer = lambda params, x: pp.embed(x, params, mode=mode, tau_prox=0.7, axis_name=axis_name)
  else:
    layer = lambda params, x: pp.norm_affine(x, *params, mode=mode, tau_prox=0.7,
                                             axis_name=axis_name)
  return lambda params, x, y: 0.5 * jnp.mean(jnp.sum((layer(params, x) - y) ** 2, -1))


def main():
  rng = np.random.default_rng(0)
  inputs = {"embed": jnp.asarray(rng.integers(0, 9, size=(8, 3)), jnp.int32),
            "norm_affine": jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32)}
  params = {"embed": jnp.asarray(rng.normal(size=(9, 4)), jnp.float32),
            "norm_affine": tuple(jnp.asarray(rng.normal(size=4), jnp.float32) for _ in "sb")}
  target = jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32)
  auto = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
  explicit = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
  results = {}
  for op in ("embed", "norm_affine"):
    for mode in MODES:
      want = jax.grad(_losses(op, mode, None))(params[op], inputs[op], target)
      local = _losses(op, mode, "data")
      specs = dict(mesh=auto, in_specs=(P(), P("data"), P("data")), out_specs=P())
      runs = {
          "shard_map": jax.shard_map(jax.grad(local), check_vma=False, **specs),
          "shard_map_vma": jax.shard_map(
              jax.grad(lambda *a: jax.lax.pmean(local(*a), "data")), check_vma=True, **specs),
      }
      got = {style: jax.jit(run)(params[op], inputs[op], target) for style, run in runs.items()}
      if op == "norm_affine":
        with jax.set_mesh(explicit):
          shard = lambda a: jax.device_put(a, NamedSharding(explicit, P("data")))
          got["jit_explicit"] = jax.jit(jax.grad(_losses(op, mode, None)))(
              params[op], shard(inputs[op]), shard(target))
      for style, d in got.items():
        err = max(float(np.abs(np.asarray(u) - np.asarray(v)).max() / np.abs(np.asarray(v)).max())
                  for u, v in zip(jax.tree.leaves(d), jax.tree.leaves(want)))
        results[f"{op}/{mode}/{style}"] = err
  print(json.dumps(results))


if __name__ == "__main__":
  main()
