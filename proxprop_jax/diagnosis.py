"""What the ProxProp solves do: `diagnostics` of every ProxProp layer of a model.

For each ProxProp layer (keyed by its path) and the batch given, with ``A`` the
layer's input matrix, ``g`` its output cotangent, ``λ = 1/τ`` and ``D`` the
direction the layer returns inside ``nnx.grad`` of the loss:

* ``relative_residual`` = ‖(AᵀA + λI)D − Aᵀg‖ / ‖Aᵀg‖: 0 up to rounding for
  ``prox_exact``, falling with N for ``prox_cgN``;
* ``cosine_to_gradient`` = ⟨D, ∇⟩/(‖D‖‖∇‖) with ``∇ = Aᵀg`` (> 0: a descent direction);
* ``direction_norm`` ‖D‖ and ``gradient_norm`` ‖∇‖;
* ``system``: ``"batch"``, ``"parameter"`` or ``"gradient"`` (`proxprop_jax.planner`);
* ``fallback``: whether Cholesky breaks down on the layer's system, so the exact
  solve takes the eigendecomposition fallback (False for CG plans; None where the
  layer's op does not report its system).

It computes its own references from the *plain* flax layer (the layer is linear in
its parameters, so ``A·D`` is the plain layer applied with parameters ``D`` and
``Aᵀu`` its transpose), at ``HIGHEST`` precision in at least float32. A layer called
several times in ``gradient`` mode gets the joint system of its calls.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp
from flax import nnx

from proxprop_jax import conversion, direction, ops, planner, solvers

_TAPE = threading.local()

#: ``system`` codes of `diagnostic_arrays`.
SYSTEMS = ("gradient", "batch", "parameter")


class _Tape:
  """The calls of the ProxProp layers during one evaluation of the loss."""

  def __init__(self, paths, probes=None):
    self.paths, self.probes = paths, probes
    self.calls = []  # (path, array args, static kwargs)
    self.outputs = []  # ShapeDtypeStructs

  def record(self, layer, args, kwargs, out):
    index = len(self.calls)
    if not isinstance(out, jax.Array):
      raise ValueError(f"pp.diagnostics expects ProxProp layers to return one array; "
                       f"{type(layer).__name__} returned {type(out).__name__}.")
    self.calls.append((self.paths[id(layer)], args, kwargs))
    self.outputs.append(jax.ShapeDtypeStruct(out.shape, out.dtype))
    return out if self.probes is None else out + self.probes[index]


@functools.cache
def _probe_class(cls):
  """``cls`` with a ``__call__`` that records its inputs and adds the probe whose
  gradient is the output cotangent ``g``."""

  def __call__(self, *args, **kwargs):
    return _TAPE.tape.record(self, args, kwargs, cls.__call__(self, *args, **kwargs))

  return type(f"Probed{cls.__name__}", (cls,), {"__call__": __call__})


@contextlib.contextmanager
def _probing(layers, tape):
  previous = getattr(_TAPE, "tape", None)
  _TAPE.tape = tape
  classes = {id(layer): type(layer) for layer in layers}
  try:
    for layer in layers:
      layer.__class__ = _probe_class(type(layer))
    yield
  finally:
    _TAPE.tape = previous
    for layer in layers:
      layer.__class__ = classes[id(layer)]


def _norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _dot(a, b):
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _cast(tree, dtype):
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def _fallback(layer_call, plan):
  """Whether Cholesky breaks down on the formed system of one observed op call."""
  kind, cfg = layer_call.kind, layer_call.cfg
  dtype = solvers.solve_dtype(layer_call.x.dtype, layer_call.kernel.dtype)
  x = layer_call.x.astype(dtype)
  if plan.system == "parameter":
    system = kind.gram(x, cfg.solve_precision)
  else:
    system = direction.row_gram_of(kind.matrix(x), kind.use_bias, cfg.solve_precision)
  return solvers.cholesky_failed(system, jnp.asarray(layer_call.lam, dtype))


def _layer_numbers(layer, d_layer, calls):
  """The diagnostics of one layer from its calls ``[(args, kwargs, g)]``."""
  if layer.axis_name is not None:
    raise ValueError(f"pp.diagnostics runs on the global batch (jit with sharding); a layer "
                     f"with axis_name={layer.axis_name!r} needs its pmap/shard_map axis.")
  graphdef, theta, rest = nnx.split(layer, nnx.Param, ...)
  dtype = solvers.solve_dtype(*(p.dtype for p in jax.tree.leaves(theta)))
  theta = _cast(theta, dtype)
  d = _cast(nnx.state(d_layer, nnx.Param), dtype)
  base = conversion.flax_base(type(layer))
  prox_call = type(layer).__call__

  def plain(params, args, kwargs):  # θ ↦ A θ: the flax layer, linear in its parameters
    return base.__call__(nnx.merge(graphdef, params, rest, copy=True), *args, **kwargs)

  def transpose(args, kwargs, u):  # u ↦ Aᵀ u
    return jax.vjp(lambda p: plain(p, args, kwargs), theta)[1](u.astype(dtype))[0]

  grad = ata_d = None
  systems, fallbacks = [], []
  add = lambda a, b: b if a is None else jax.tree.map(jnp.add, a, b)
  for args, kwargs, g in calls:
    args = _cast(args, dtype)
    with jax.default_matmul_precision("highest"):
      grad = add(grad, transpose(args, kwargs, g))
      ata_d = add(ata_d, transpose(args, kwargs, plain(d, args, kwargs)))
    with planner.recording() as records:
      jax.eval_shape(lambda t, a, g: jax.vjp(
          lambda t: prox_call(nnx.merge(graphdef, t, rest, copy=True), *a, **kwargs), t)[1](g),
                     theta, args, g)
    with ops.observing() as observed:
      prox_call(nnx.merge(graphdef, theta, rest, copy=True), *args, **kwargs)
    for i, (_, plan) in enumerate(reversed(records)):  # backward order: last call first
      systems.append(plan.system)
      if plan.solver not in ("cholesky", "inverse"):
        fallbacks.append(jnp.asarray(False))
      elif i < len(observed):
        fallbacks.append(_fallback(observed[i], plan))
  lam = 1.0 / layer.tau_prox.get_value().astype(dtype)
  residual = _norm(jax.tree.map(lambda a, d, g: a + lam * d - g, ata_d, d, grad))
  grad_norm, d_norm = _norm(grad), _norm(d)
  if not systems:  # no recorded plan: gradient mode on one device, or a matrix-free op
    systems = ["gradient" if layer.mode == "gradient" else "parameter"]
  known = len(fallbacks) == len(systems) or layer.mode != "prox_exact"
  return dict(
      relative_residual=residual / jnp.where(grad_norm > 0, grad_norm, 1),
      cosine_to_gradient=_dot(d, grad) / jnp.maximum(d_norm * grad_norm, jnp.finfo(dtype).tiny),
      direction_norm=d_norm, gradient_norm=grad_norm,
      system=jnp.asarray(max(SYSTEMS.index(s) for s in systems)),
      fallback=(jnp.any(jnp.stack(fallbacks)) if fallbacks else jnp.asarray(False)).astype(
          jnp.int32) if known else jnp.asarray(-1))


def diagnostic_arrays(model, loss_fn, *batch) -> dict[str, dict]:
  """`diagnostics` as arrays, traceable (e.g. inside your own ``nnx.jit``): ``system`` is an
  index into `SYSTEMS`, ``fallback`` 1/0 (−1: not reported)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def run(params, probes):
    copy = nnx.merge(graphdef, params, rest, copy=True)  # the model itself is left as it is
    layers = conversion.prox_layers(copy)
    tape = _Tape({id(layer): path for path, layer in layers.items()}, probes)
    with _probing(list(layers.values()), tape):
      loss = loss_fn(copy, *batch)
    static.append([(path, kwargs) for path, _, kwargs in tape.calls])
    shapes.append(tape.outputs)
    return loss, [args for _, args, _ in tape.calls]

  static, shapes = [], []
  jax.eval_shape(run, params, None)
  probes = [jnp.zeros(s.shape, s.dtype) for s in shapes[0]]
  (_, inputs), (directions, cotangents) = jax.value_and_grad(run, (0, 1), has_aux=True)(
      params, probes)
  model_copy = nnx.merge(graphdef, params, rest, copy=True)
  layers = conversion.prox_layers(model_copy)
  d_layers = conversion.prox_layers(nnx.merge(graphdef, directions, rest, copy=True))
  by_path: dict[str, list] = {}
  for (path, kwargs), args, g in zip(static[-1], inputs, cotangents):
    by_path.setdefault(path, []).append((args, kwargs, g))
  return {path: _layer_numbers(layers[path], d_layers[path], calls)
          for path, calls in by_path.items()}


@functools.partial(nnx.jit, static_argnums=(1,))
def _compiled(model, loss_fn, *batch):
  return diagnostic_arrays(model, loss_fn, *batch)


def diagnostics(model, loss_fn, *batch) -> dict[str, dict]:
  """The diagnostics of every ProxProp layer that ``loss_fn(model, *batch)`` calls.

  Compiled once per model structure, ``loss_fn`` (pass the same function object)
  and batch shape; meant to be called every K steps outside the training step. The
  model is not changed (batch statistics, RNG state stay as they are).

  Returns:
    ``{path: {"relative_residual", "cosine_to_gradient", "direction_norm",
    "gradient_norm": float, "system": str, "fallback": bool | None}}``; see the
    module docstring.
  """
  arrays = jax.device_get(_compiled(model, loss_fn, *batch))
  return {path: dict(
      relative_residual=float(v["relative_residual"]),
      cosine_to_gradient=float(v["cosine_to_gradient"]),
      direction_norm=float(v["direction_norm"]), gradient_norm=float(v["gradient_norm"]),
      system=SYSTEMS[int(v["system"])],
      fallback=None if int(v["fallback"]) < 0 else bool(v["fallback"]))
      for path, v in arrays.items()}


__all__ = ["SYSTEMS", "diagnostic_arrays", "diagnostics"]
