"""ProxProp directions with sharded parameters on 8 fake CPU devices, against one device.

tests/test_sharding.py runs the two parts at once, in two subprocesses (the device count is
fixed when JAX starts), and asserts on the JSON they write:

    python tests/_sharding_worker.py --part shardings --out shardings.json
    python tests/_sharding_worker.py --part others --out others.json

One small model holds every ProxProp layer kind: a token branch (Embed, LayerNorm,
LinearGeneral into heads, a per-head Einsum, LinearGeneral out of the heads, two Linear)
and an image branch (two Conv with a BatchNorm between); the loss is the sum of both
branches' mean squared distances to random targets. Its parameters carry flax sharding
annotations (``nnx.with_partitioning``) for three shardings on a ``("data", "model")`` mesh
of 4 × 2 devices: ``fsdp`` (every kernel split over ``data``), ``tp`` (column- and
row-parallel kernels, heads and channels over ``model``) and ``both`` (replicated
parameters are the data-parallel tests' subject). The directions (``nnx.grad`` of the loss)
are compiled under ``jax.jit`` with the batch split over ``data``, in float64 unless said.

Both parts, for their runs (`RUNS`: ``prox_cg3`` in every sharding, ``prox_exact`` in
``both``):

* ``directions``: per layer kind the largest ``max|D − D₁| / max|D₁|`` against one device;
* ``collectives``: every collective of each compiled program (op, shapes, group size), and
  ``shapes``: the kernels of the layers split over ``model``;
* ``memory``: XLA's per-device argument (parameters, batch) and output (directions) bytes
  and the bytes of the device's parameter shards; ``param_bytes``: all parameters' bytes.

Part ``others`` also:

* ``float32``: the errors against float64 of ``tp`` in float32 on a mesh with Explicit axes
  (the layers whose output sharding is ambiguous get ``out_sharding``, as flax's layers do)
  and of one float32 device (``prox_exact``);
* ``distributed``: ``distribute_solves`` with replicated parameters on a 1-D mesh of 8
  devices, for a two-layer MLP: errors, and XLA's cost-analysis FLOPs per device with and
  without it and in ``gradient`` mode;
* ``errors``: the messages of settings that cannot work.
"""

from __future__ import annotations

import argparse
import json
import math
import os

DEVICES = 8
MESH = (("data", 4), ("model", 2))
BATCH, TOKENS, VOCAB = 8, 6, 24

# The annotations of every parameter, per sharding: {layer: (kernel spec, bias spec)} (norms
# and Embed: one spec). Kernel layouts as flax's: Linear (in, out); LinearGeneral (*in, *out);
# Einsum 'btnh,nhk->btnk' (heads, head dim, k); Conv (h, w, in, out); Embed (vocab, features).
SPECS = {
    "rep": {},
    "fsdp": dict(embed=("data", None), ln=("data",), q=(("data", None, None), None),
                 heads=((None, "data", None), None), out=((None, None, "data"), ("data",)),
                 mlp1=(("data", None), None), mlp2=(("data", None), None),
                 conv1=((None, None, None, "data"), None), bn=("data",),
                 conv2=((None, None, None, "data"), None)),
    "tp": dict(embed=(None, "model"), ln=("model",), q=((None, "model", None), ("model", None)),
               heads=(("model", None, None), ("model", None)), out=(("model", None, None), None),
               mlp1=((None, "model"), ("model",)), mlp2=(("model", None), None),
               conv1=((None, None, None, "model"), ("model",)), bn=("model",),
               conv2=((None, None, "model", None), None)),
    "both": dict(embed=("data", "model"), ln=("data",),
                 q=(("data", "model", None), ("model", None)),
                 heads=(("model", "data", None), ("model", None)),
                 out=(("model", None, "data"), ("data",)),
                 mlp1=(("data", "model"), ("model",)), mlp2=(("model", "data"), ("data",)),
                 conv1=((None, None, "data", "model"), ("model",)), bn=("model",),
                 conv2=((None, None, "model", "data"), ("data",))),
}
# On Explicit axes flax's BatchNorm keeps its running statistics unsplit: they cannot take
# the statistics of split channels.
SPECS["tp_explicit"] = {k: v for k, v in SPECS["tp"].items() if k != "bn"}
# The layers whose kernels `tp` and `both` split over `model` (column-, row-parallel, heads):
# their whole kernel must never be all-gathered.
TENSOR_PARALLEL = ("q", "heads", "out", "mlp1", "mlp2", "conv1", "conv2")
# The sharded float64 runs of each part: (mode, sharding).
RUNS = {"shardings": [("prox_cg3", s) for s in ("fsdp", "tp", "both")],
        "others": [("prox_exact", "both")]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", required=True, choices=("shardings", "others"))
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={DEVICES}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  jax.config.update("jax_enable_x64", True)
  with open(args.out, "w") as f:
    json.dump(run(args.part), f, indent=1)


def build(mode, sharding, dtype, distribute=False, explicit=False):
  """The model with ``sharding``'s annotations, its parameters in ``dtype`` (the values of
  the float64 model, rounded)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  import proxprop_jax as pp

  specs, rngs = SPECS[sharding], nnx.Rngs(0)
  init, small = nnx.initializers.lecun_normal(), nnx.initializers.normal(0.5)
  annotated = lambda fn, spec: nnx.with_partitioning(fn, spec) if spec else fn
  prox = dict(mode=mode, tau_prox=0.5, distribute_solves=distribute)

  def args(layer):
    kernel, bias = specs.get(layer, (None, None))
    return dict(kernel_init=annotated(init, kernel), bias_init=annotated(small, bias),
                param_dtype=jnp.float64, rngs=rngs, **prox)

  def norm(layer):
    return dict(scale_init=annotated(small, specs.get(layer)), param_dtype=jnp.float64,
                rngs=rngs, **prox)

  # On Explicit axes a product whose output sharding is ambiguous needs it (as in flax).
  row_out, conv_out = (P("data"), P("data")) if explicit else (None, None)

  class Net(nnx.Module):

    def __init__(self):
      self.embed = pp.Embed(VOCAB, 16, embedding_init=annotated(small, specs.get("embed")),
                            param_dtype=jnp.float64, rngs=rngs, **prox)
      self.ln = pp.LayerNorm(16, bias_init=small, **norm("ln"))
      self.q = pp.LinearGeneral(16, (4, 8), **args("q"))
      self.heads = pp.Einsum("btnh,nhk->btnk", (4, 8, 4), (4, 4), **args("heads"))
      self.out = pp.LinearGeneral((4, 4), 16, axis=(-2, -1), **args("out"))
      self.mlp1 = pp.Linear(16, 56, **args("mlp1"))
      self.mlp2 = pp.Linear(56, 16, **args("mlp2"))  # 57 parameters > 48 rows: batch space
      self.conv1 = pp.Conv(4, 8, (3, 3), **args("conv1"))
      self.bn = pp.BatchNorm(8, bias_init=small, dtype=dtype, **norm("bn"))
      self.conv2 = pp.Conv(8, 12, (3, 3), **args("conv2"))

    def __call__(self, ids, images):
      h = self.ln(self.embed(ids, out_sharding=row_out))
      h = h + self.out(jax.nn.relu(self.heads(self.q(h))), out_sharding=row_out)
      h = h + self.mlp2(jax.nn.relu(self.mlp1(h)), out_sharding=row_out)
      c = self.bn(jax.nn.relu(self.conv1(images, out_sharding=conv_out)))
      return h, jnp.mean(self.conv2(c, out_sharding=row_out), axis=(1, 2))

  model = Net()
  nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), nnx.state(model, nnx.Param)))
  return model


def loss(model, ids, images, token_targets, image_targets):
  import jax.numpy as jnp

  tokens, images = model(ids, images)
  return (0.5 * jnp.mean(jnp.sum((tokens - token_targets) ** 2, -1))
          + 0.5 * jnp.mean(jnp.sum((images - image_targets) ** 2, -1)))


def kinds(model):
  """``{parameter path: its layer's class name}``."""
  from flax import nnx

  return {(*path, name): type(node).__name__ for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) and path
          for name, value in vars(node).items() if isinstance(value, nnx.Param)}


def directions(model, batch, mesh=None):
  """``(directions by path, compiled program)``: ``nnx.grad`` of the loss under ``jit`` on
  ``mesh`` (parameters placed as annotated, the batch split over ``data``) or one device."""
  import contextlib

  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from proxprop_jax import parallel

  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    if mesh is not None:
      parallel.place(model, mesh)
      batch = tuple(jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(params, rest, *batch):
      return nnx.state(nnx.grad(loss)(nnx.merge(graphdef, params, rest), *batch), nnx.Param)

    shardings = jax.tree.map(lambda a: a.sharding, params) if mesh is not None else None
    compiled = jax.jit(grads, out_shardings=shardings).lower(params, rest, *batch).compile()
    result = compiled(params, rest, *batch)
  return ({tuple(path): np.asarray(v.get_value(), np.float64)
           for path, v in nnx.to_flat_state(result)}, compiled)


def errors(got, want, kind_of):
  """``{layer kind: max relative error}`` over the parameters of each kind."""
  import numpy as np

  out = {}
  for path, ref in want.items():
    err = float(np.abs(got[path] - ref).max() / np.abs(ref).max())
    out[kind_of[path]] = max(out.get(kind_of[path], 0.0), err)
  return out


def run(part):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import AxisType

  from proxprop_jax import sharding as pp_sharding

  assert jax.device_count() == DEVICES, jax.devices()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, VOCAB, size=(BATCH, TOKENS)).astype(np.int32)
  images, targets = rng.normal(size=(BATCH, 6, 6, 4)), rng.normal(size=(BATCH, TOKENS, 16))
  labels = rng.normal(size=(BATCH, 12))
  batch = lambda dtype: tuple(a.astype(dtype) if a.dtype.kind == "f" else a
                              for a in (ids, images, targets, labels))

  def mesh(kind=AxisType.Auto, shape=MESH):
    return jax.make_mesh(tuple(n for _, n in shape), tuple(a for a, _ in shape),
                         axis_types=(kind,) * len(shape))

  refs = {}

  def reference(mode, dtype):
    """One device's directions (no mesh: the annotations are only metadata)."""
    if (mode, dtype) not in refs:
      with nnx.use_eager_sharding(False):
        model = build(mode, "rep", dtype)
      refs[mode, dtype] = directions(model, batch(dtype))[0]
    return refs[mode, dtype]

  def sharded(mode, sharding, dtype, on, against=None, **kwargs):
    """``(errors by kind, compiled, per-device parameter bytes)`` of one sharded run against
    one device (in dtype ``against``, default ``dtype``)."""
    with jax.set_mesh(on):  # flax splits annotated parameters as it creates them
      model = build(mode, sharding, dtype, **kwargs)
    got, compiled = directions(model, batch(dtype), on)
    shards = sum(math.prod(v.sharding.shard_shape(v.shape)) * v.dtype.itemsize
                 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return errors(got, reference(mode, against or dtype), kinds(model)), compiled, shards

  with nnx.use_eager_sharding(False):
    plain = build("prox_cg3", "rep", jnp.float64)
  auto, explicit = mesh(), mesh(AxisType.Explicit)
  out = {"shapes": {layer: list(getattr(plain, layer).kernel.get_value().shape)
                    for layer in TENSOR_PARALLEL},
         "param_bytes": sum(v.get_value().nbytes for _, v in nnx.to_flat_state(
             nnx.state(plain, nnx.Param))),
         "directions": {}, "collectives": {}, "memory": {}}
  for mode, sharding in RUNS[part]:
    key = f"{mode}/{sharding}"
    out["directions"][key], compiled, shards = sharded(mode, sharding, jnp.float64, auto)
    out["collectives"][key] = [[c.op, c.shapes, c.group]
                               for c in pp_sharding.collectives(compiled)]
    memory = compiled.memory_analysis()
    out["memory"][key] = dict(argument=memory.argument_size_in_bytes,
                              output=memory.output_size_in_bytes, param_shards=shards,
                              outputs=len(jax.tree.leaves(nnx.state(plain, nnx.Param))))
  if part == "others":
    out["float32"] = dict(
        explicit=sharded("prox_exact", "tp_explicit", jnp.float32, explicit, against=jnp.float64,
                         explicit=True)[0],
        one_device=errors(reference("prox_exact", jnp.float32),
                          reference("prox_exact", jnp.float64), kinds(plain)))
    out["distributed"] = distributed(mesh(shape=(("data", DEVICES),)))
    out["errors"] = bad_settings(explicit)
  return out


def distributed(line):
  """``distribute_solves`` with replicated parameters on ``line``, a 1-D mesh: a two-layer
  MLP's direction errors, and XLA's cost-analysis FLOPs per device with and without it and
  in ``gradient`` mode (the same step without solves)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import proxprop_jax as pp

  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(64, 48)), rng.normal(size=(64, 40))

  def mlp(mode, distribute):
    prox = dict(mode=mode, tau_prox=0.5, distribute_solves=distribute, param_dtype=jnp.float64)
    rngs = nnx.Rngs(0)
    return nnx.Sequential(pp.Linear(48, 96, rngs=rngs, **prox), jax.nn.relu,
                          pp.Linear(96, 40, rngs=rngs, **prox))  # 97 parameters > 64 rows

  def mlp_loss(model, x, y):
    return 0.5 * jnp.mean(jnp.sum((model(x) - y) ** 2, -1))

  def flat_grads(model, on=None):
    from jax.sharding import NamedSharding, PartitionSpec as P

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = jax.jit(lambda params, rest, x, y: nnx.state(nnx.grad(mlp_loss)(
        nnx.merge(graphdef, params, rest), x, y), nnx.Param))
    args = (params, rest) + ((x, y) if on is None else tuple(
        jax.device_put(a, NamedSharding(on, P("data"))) for a in (x, y)))
    compiled = fn.lower(*args).compile()
    return jax.tree.leaves(compiled(*args)), compiled

  out, refs = {}, {}
  for mode, distribute in (("gradient", False), ("prox_cg3", False), ("prox_cg3", True)):
    want = refs.get(mode) or refs.setdefault(mode, flat_grads(mlp(mode, False))[0])
    with jax.set_mesh(line):
      got, compiled = flat_grads(mlp(mode, distribute), line)
    out[f"{mode}/{'distributed' if distribute else 'replicated'}"] = dict(
        error=max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
                  for a, b in zip(got, want)),
        flops=float(compiled.cost_analysis()["flops"]))
  return out


def bad_settings(explicit):
  """The messages of settings that cannot work."""
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  import proxprop_jax as pp
  from proxprop_jax import parallel

  def message(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {e}"
    return None

  linear = lambda **kw: pp.Linear(4, 4, rngs=nnx.Rngs(0), **kw)
  out = {"pmap_axis": message(lambda: linear(axis_name="data", distribute_solves=True)),
         "not_bool": message(lambda: linear(distribute_solves="yes")),
         "matrix_free": message(lambda: pp.prox_module(nnx.Linear)(
             4, 4, distribute_solves=True, rngs=nnx.Rngs(0))),
         "batch_axes": message(lambda: parallel.shard_batch(np.ones((8, 2)), explicit,
                                                            axes="batch"))}
  # A row-parallel layer on Explicit axes: without out_sharding JAX's own error, as for
  # nnx.Linear; with it the plain product.
  with jax.set_mesh(explicit):
    layer = pp.Linear(8, 4, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("model", None)), rngs=nnx.Rngs(0))
    x = jax.device_put(np.ones((8, 8)), NamedSharding(explicit, P("data", "model")))
    out["explicit_row_parallel"] = message(lambda: jax.jit(lambda x: layer(x))(x))
    z = jax.jit(lambda x: layer(x, out_sharding=P("data")))(x)
    want = np.ones((8, 8)) @ np.asarray(layer.kernel.get_value()) + np.asarray(
        layer.bias.get_value())
    out["explicit_row_parallel_fixed"] = float(np.abs(np.asarray(z) - want).max())
  return out


if __name__ == "__main__":
  main()
