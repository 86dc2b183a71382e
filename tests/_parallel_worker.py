"""One data-parallel training step in every style, compared with one device on the global batch.

tests/test_parallel.py runs this in subprocesses (the fake CPU device count must be set
before JAX starts) and asserts on the JSON it writes:

    python tests/_parallel_worker.py --plan convnet --out result.json

For each case (model, mode, style, device count) it steps a copy of the model on ``n``
devices and compares it with a reference copy stepped by ``nnx.jit`` on one device with the
concatenated batch (layers with ``axis_name=None``). It records the largest relative
differences of the parameters, of each layer's update ``θ⁺ − θ`` (all of its parameters
together: a stricter test, since the update is small against the parameters), and of the
loss, plus the systems the layers' plans solve (`proxprop_jax.planner.recording`):
``("batch", 16)`` for the MLP's dense layers means the batch-space system of the *global*
batch (16 rows, not the 2 rows of one device); the ConvNet's ``("parameter", p)`` Grams mean
parameter space.

This module imports nothing heavy at the top, so the test can read `plan` without JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STYLES = ("pmap", "shard_map", "shard_map_vma", "jit_explicit", "jit_auto")
MODES = ("gradient", "prox_exact", "prox_cg3")
COUNTS = (2, 4, 8)
GLOBAL_BATCH = 16
DEVICES = 8
# Fast compiles: the models are tiny, compile time dominates the test.
XLA_FLAGS = (f"--xla_force_host_platform_device_count={DEVICES} "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def plan(name: str) -> list[tuple[str, str, str, int]]:
  """The cases ``(model, mode, style, devices)`` one worker run covers.

  ``mlp``: the paper's MLP (small) in every mode, style and device count, plus the MLP
  made of ``pp.prox_module(nnx.Linear)`` layers (matrix-free `pp.proximal`) and of
  ``pp.linen.Dense`` layers on 8 devices. ``convnet``: every mode and style on 8 devices;
  on 2 and 4 devices each (mode, style) pair once, alternating (compile time).
  """
  if name == "mlp":
    cases = [("mlp", m, s, n) for n in COUNTS for m in MODES for s in STYLES]
    cases += [("mlp_generic", m, s, 8) for m in ("prox_exact", "prox_cg3") for s in STYLES]
    cases += [("mlp_linen", "prox_cg3", s, 8) for s in ("pmap", "shard_map_vma", "jit_explicit")]
    return cases
  if name == "convnet":
    cases = [("convnet", m, s, 8) for m in MODES for s in STYLES]
    cases += [("convnet", m, s, COUNTS[(i + j) % 2])
              for i, m in enumerate(MODES) for j, s in enumerate(STYLES)]
    return cases
  raise ValueError(f"unknown plan {name!r}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--plan", required=True, choices=("mlp", "convnet"))
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + XLA_FLAGS
  os.environ["JAX_PLATFORMS"] = "cpu"
  out = {"cases": run(plan(args.plan))}
  if args.plan == "mlp":
    out["checks"] = checks()
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


# ------------------------------------------------------------------------------ models


def _models():
  """The paper's two models (`experiments.models`), small, and the MLP from Linen layers.

  Each entry is ``name: (build(mode, axis_name, rngs), one example's shape)``.
  """
  import flax.linen as nn
  import jax.numpy as jnp
  from flax import nnx

  import proxprop_jax as pp
  from experiments import models

  def small(name, input_shape, tau_prox, prox_linear=pp.Linear, **sizes):
    def build(mode, axis_name, rngs):
      layers = models.Layers(mode, tau_prox, axis_name, rngs, prox_linear)
      return models.MODELS[name](input_shape, 10, layers, **sizes)
    return build, input_shape

  # MLP 16-32-24-10; ConvNet: three 3x3 SAME convs 3-4-6-6 on 8x8 inputs.
  mlp = dict(name="mlp", input_shape=(16,), tau_prox=0.05, hidden_sizes=(32, 24))
  convnet = dict(name="convnet", input_shape=(8, 8, 3), tau_prox=1.0, channels=(4, 6, 6),
                 kernel_size=3)

  class LinenMLP(nn.Module):
    """The MLP with ``pp.linen.Dense`` hidden layers."""

    mode: str
    axis_name: str | None

    @nn.compact
    def __call__(self, x):
      kw = dict(mode=self.mode, tau_prox=0.05, axis_name=self.axis_name)
      x = nn.relu(pp.linen.Dense(32, **kw)(x))
      x = nn.relu(pp.linen.Dense(24, **kw)(x))
      return nn.Dense(10)(x)

  class LinenModel(nnx.Module):
    """Wraps the Linen MLP as an NNX module (``nnx.bridge``), so every step helper runs it."""

    def __init__(self, mode, axis_name, rngs):
      from flax.nnx import bridge
      self.net = bridge.ToNNX(LinenMLP(mode, axis_name), rngs=rngs)
      bridge.lazy_init(self.net, jnp.zeros((1, 16)))

    def __call__(self, x):
      return self.net(x)

  return {"mlp": small(**mlp),
          "mlp_generic": small(**mlp, prox_linear=pp.prox_module(nnx.Linear)),  # matrix-free
          "convnet": small(**convnet), "mlp_linen": (LinenModel, (16,))}


# ------------------------------------------------------------------------------ the run


def run(cases):
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax import lax
  from jax.sharding import AxisType, PartitionSpec as P

  import proxprop_jax as pp
  from proxprop_jax import parallel

  assert jax.device_count() == DEVICES, jax.devices()
  builders = _models()

  def run_and_record(step, *args):
    """Runs a fresh step once; returns its loss and the systems its ProxProp layers solve
    (recorded while the step traces): ``[system, size]`` with the size of the solved
    matrix (rows for batch space, parameters otherwise)."""
    with pp.planner.recording() as plans:
      loss = float(step(*args))
    return loss, sorted({(plan.system, problem.rows if plan.system == "batch" else
                          problem.params) for problem, plan in plans
                         if plan.system != "gradient"})

  def build(name, mode, axis_name):
    cls, _ = builders[name]
    model = cls(mode, axis_name, nnx.Rngs(0))  # the same parameters for every axis_name
    # Nesterov SGD, lr 1 (not Adam: its first step would hide a scale error in D).
    optimizer = nnx.Optimizer(model, optax.sgd(1.0, momentum=0.9, nesterov=True), wrt=nnx.Param)
    return model, optimizer

  def mean_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  def global_step(model, optimizer, x, y):  # the global view: one device, or jit + sharding
    loss, grads = nnx.value_and_grad(mean_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  def shard_step(model, optimizer, x, y):  # pmap / shard_map: x, y are this device's shard
    loss, grads = nnx.value_and_grad(mean_loss)(model, x, y)
    optimizer.update(model, lax.pmean(grads, "data"))
    return loss

  def shard_map_vma_step(mesh):
    """``shard_map`` with ``check_vma=True``: differentiate the global mean ``pmean(loss)``."""

    @nnx.jit
    def step(model, optimizer, x, y):
      graphdef, state = nnx.split((model, optimizer))

      def per_device(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: lax.pmean(mean_loss(m, x, y), "data"))(model)
        optimizer.update(model, lax.pmean(grads, "data"))  # invariant already: no change
        return nnx.state((model, optimizer)), loss

      state, loss = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=P(), check_vma=True)(state, x, y)
      nnx.update((model, optimizer), state)
      return loss

    return step

  def layers(model):
    """Each layer's parameters as one float64 vector (kernel and bias together)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out = {}
    for path, var in flat:
      out.setdefault(path[:-1], []).append(np.asarray(var.get_value(), np.float64).ravel())
    return {k: np.concatenate(v) for k, v in sorted(out.items(), key=lambda kv: str(kv[0]))}

  def rel(got, want):
    return max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want)

  def make_step(style, devices, model, optimizer, x, y):
    if style == "pmap":
      return parallel.make_pmap_step(shard_step, "data", devices), (x, y)
    kind = AxisType.Auto if style in ("jit_auto", "shard_map_vma") else AxisType.Explicit
    mesh = parallel.make_mesh(devices, "data", axis_type=kind)
    parallel.replicate((model, optimizer), mesh)
    batch = parallel.shard_batch((x, y), mesh)
    if style == "shard_map":
      return parallel.make_shard_map_step(shard_step, mesh), batch
    if style == "shard_map_vma":
      return shard_map_vma_step(mesh), batch
    return parallel.make_sharded_step(global_step, mesh), batch

  rng = np.random.default_rng(0)
  data, refs, results = {}, {}, []
  for name, mode, style, n in cases:
    if name not in data:
      shape = builders[name][1]
      data[name] = (rng.normal(size=(GLOBAL_BATCH, *shape)).astype(np.float32),
                    rng.integers(0, 10, size=GLOBAL_BATCH).astype(np.int32))
    x, y = data[name]
    if (name, mode) not in refs:
      model, optimizer = build(name, mode, None)
      before = layers(model)
      device = jax.devices()[0]
      args = (model, optimizer, jax.device_put(x, device), jax.device_put(y, device))
      loss, solved = run_and_record(nnx.jit(global_step), *args)
      after = layers(model)
      refs[name, mode] = (before, after, {k: after[k] - before[k] for k in after}, loss,
                          solved)
    before, ref, ref_update, ref_loss, ref_solved = refs[name, mode]
    model, optimizer = build(name, mode, None if style.startswith("jit") else "data")
    step, batch = make_step(style, jax.devices()[:n], model, optimizer, x, y)
    loss, solved = run_and_record(step, model, optimizer, *batch)
    got = layers(model)
    results.append(dict(
        model=name, mode=mode, style=style, devices=n,
        params=rel(got, ref), update=rel({k: got[k] - before[k] for k in got}, ref_update),
        loss=abs(loss - ref_loss) / abs(ref_loss),
        replicated=all(v.sharding.is_fully_replicated
                       for v in jax.tree.leaves(nnx.state((model, optimizer)))),
        solved=solved, ref_solved=ref_solved))
    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
  return results


# ------------------------------------------------------------------------------ checks


def checks():
  """Bad input and a negative control; returns ``{name: message or number}``."""
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax import lax

  from proxprop_jax import parallel

  builders = _models()
  out = {}

  def error(fn):
    try:
      fn()
    except ValueError as e:
      return str(e)
    return None

  mlp = lambda axis: builders["mlp"][0]("prox_exact", axis, nnx.Rngs(0))
  with_opt = lambda m: (m, nnx.Optimizer(m, optax.sgd(1.0), wrt=nnx.Param))

  def step_fn(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, lax.pmean(grads, "data"))
    return loss

  def global_fn(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads)
    return loss

  x = np.ones((10, 16), np.float32)
  y = np.zeros(10, np.int32)
  mesh = parallel.make_mesh()
  out["shard_batch_uneven"] = error(lambda: parallel.shard_batch((x, y), mesh))
  out["shard_batch_mismatch"] = error(lambda: parallel.shard_batch((x[:8], y[:4]), mesh))
  pmap_step = parallel.make_pmap_step(step_fn, "data", jax.devices()[:4])
  out["pmap_uneven"] = error(lambda: pmap_step(*with_opt(mlp("data")), x, y))
  out["pmap_no_axis"] = error(lambda: pmap_step(*with_opt(mlp(None)), x[:8], y[:8]))
  sm_step = parallel.make_shard_map_step(step_fn, mesh)
  xs, ys = parallel.shard_batch((x[:8], y[:8]), mesh)
  out["shard_map_no_axis"] = error(lambda: sm_step(*with_opt(mlp(None)), xs, ys))
  jit_step = parallel.make_sharded_step(global_fn, mesh)
  out["jit_with_axis"] = error(lambda: jit_step(*with_opt(mlp("data")), xs, ys))
  out["jit_unsharded"] = error(lambda: jit_step(*with_opt(mlp(None)), x[:8], y[:8]))

  # Negative control: layers without axis_name under pmap (the check bypassed) use their
  # shard's direction; the result must differ clearly from one device on the global batch,
  # or the equality tests above would prove nothing.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(GLOBAL_BATCH, 16)).astype(np.float32)
  y = rng.integers(0, 10, size=GLOBAL_BATCH).astype(np.int32)
  ref_model, ref_opt = with_opt(mlp(None))
  before = np.asarray(ref_model.hidden[0].kernel.get_value())
  nnx.jit(global_fn)(ref_model, ref_opt, x, y)
  ref_update = np.asarray(ref_model.hidden[0].kernel.get_value()) - before
  check, parallel._check_layers = parallel._check_layers, lambda *args: None
  try:
    model, opt = with_opt(mlp(None))
    parallel.make_pmap_step(step_fn, "data", jax.devices())(model, opt, x, y)
  finally:
    parallel._check_layers = check
  update = np.asarray(model.hidden[0].kernel.get_value()) - before
  out["local_direction_update_rel"] = float(np.abs(update - ref_update).max()
                                            / np.abs(ref_update).max())
  return out


if __name__ == "__main__":
  main()
