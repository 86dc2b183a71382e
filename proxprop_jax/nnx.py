"""Flax NNX modules with a ProxProp backward pass.

`Linear` and `Conv` subclass ``nnx.Linear`` and ``nnx.Conv``: same arguments,
parameters (``kernel``, ``bias``), shapes and initialisers, plus ``mode``,
``tau_prox``, ``axis_name``, ``solve_precision`` and ``distribute_solves``. A model
swaps the flax layer for these and nothing else changes. `prox_module` does the same
for any NNX module that is linear in its parameters, through the matrix-free
`proxprop_jax.proximal`.

``tau_prox`` is stored as a `TauProx` variable: state of the model (checkpointed
with it, not trained by ``nnx.Optimizer(..., wrt=nnx.Param)``), so changing it
between steps does not retrace a jitted step.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes

from proxprop_jax import flax_common, ops, sharding, solvers
from proxprop_jax.flax_common import ProxLayer
from proxprop_jax.modes import check_tau


class TauProx(nnx.Variable):
  """The proximal step size ``τ`` of a ProxProp layer: a non-trainable scalar."""


def init_prox(module, mode, tau_prox, axis_name, solve_precision,
              distribute_solves=False) -> None:
  """Sets a ProxProp NNX layer's ``mode``, ``tau_prox``, ``axis_name``, ``solve_precision``,
  ``distribute_solves``."""
  settings = flax_common.prox_settings(mode, tau_prox, axis_name, solve_precision,
                                       distribute_solves)
  module.mode = settings.mode
  # Strongly typed (the default float dtype): a checkpoint restores it so, and a weakly typed
  # value would make the restored model's step another program (a recompile on resume).
  module.tau_prox = TauProx(jnp.asarray(settings.tau_prox,
                                        jax.dtypes.canonicalize_dtype(jnp.float64)))
  module.axis_name = settings.axis_name
  module.solve_precision = settings.solve_precision
  module.distribute_solves = settings.distribute_solves


def prox_kwargs(module) -> dict:
  """The keyword arguments of `ops.proximal` for a ProxProp NNX layer."""
  return dict(mode=module.mode, tau_prox=module.tau_prox[...], axis_name=module.axis_name,
              solve_precision=module.solve_precision)


def solve_kwargs(module, *params) -> dict:
  """`prox_kwargs` without ``tau_prox`` (`_with_out_sharding` passes it), and how the solve
  is split over a mesh: the sharding metadata of the layer's ``params`` (flax variables,
  None where absent) and ``distribute_solves``."""
  kwargs = dict(prox_kwargs(module), param_specs=sharding.specs_of(*params),
                distribute_solves=module.distribute_solves)
  del kwargs["tau_prox"]
  return kwargs


def set_tau_value(module, tau_prox) -> None:
  """Sets one layer's ``τ`` (validated unless traced), keeping its variable's dtype, shape
  and weak type: no retrace under ``nnx.jit``."""
  if not isinstance(tau_prox, jax.core.Tracer):
    tau_prox = check_tau(tau_prox)
  module.tau_prox.set_value(jnp.full_like(module.tau_prox.get_value(), tau_prox))


def _with_out_sharding(layer, out_sharding, module, *arrays):
  """``layer(*arrays, tau)`` with ``module``'s ``τ``; with an ``out_sharding`` (a mesh with
  Explicit axes, as flax's layers take it) it runs with the mesh's axes Auto and its output
  sharded so, as ``nnx.Embed`` does (every array it reads is an argument)."""
  arrays = (*arrays, module.tau_prox[...])
  if out_sharding is None:
    return layer(*arrays)
  return jax.sharding.auto_axes(layer, out_sharding=out_sharding)(*arrays)


def _check_default_products(cls_name: str, **custom) -> None:
  given = [name for name, is_custom in custom.items() if is_custom]
  if given:
    raise ValueError(f"{cls_name} computes its products itself; it does not take a custom "
                     f"{', '.join(given)}. Wrap the flax layer with pp.prox_module "
                     f"(matrix-free ProxProp) instead.")


class Linear(ProxLayer, nnx.Linear):
  """``nnx.Linear`` whose parameter cotangent is the ProxProp direction.

  Args:
    in_features, out_features, **kwargs: as ``nnx.Linear``.
    mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cgN"``.
    tau_prox: the proximal step size ``τ > 0``.
    axis_name: the ``pmap``/``shard_map`` batch axis, or None.
    solve_precision: the precision of the products that compute the direction.
    distribute_solves: under ``jit`` on a mesh, share the solve among the devices the
      kernel is not split over (`proxprop_jax.sharding`).

  The kernel's and bias's sharding metadata (``nnx.with_partitioning``) say how the solve
  is split over a mesh.
  """

  def __init__(self, in_features: int, out_features: int, *, mode="prox_cg1", tau_prox=1.0,
               axis_name=None, solve_precision=ops.SOLVE_PRECISION, distribute_solves=False,
               **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision, distribute_solves)
    super().__init__(in_features, out_features, **kwargs)

  def __call__(self, inputs, out_sharding=None):
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kwargs = solve_kwargs(self, self.kernel, self.bias)
    return _with_out_sharding(
        lambda x, k, b, tau: ops.dense(x, k, b, tau_prox=tau, precision=self.precision,
                                       **kwargs), out_sharding, self, inputs, kernel, bias)

  def check_convertible(self) -> None:
    """Raises for ``nnx.Linear`` options this layer does not implement (`pp.convert`)."""
    _check_default_products("pp.Linear", dot_general=self.dot_general is not jax.lax.dot_general,
                            preferred_element_type=self.preferred_element_type is not None)


class Conv(ProxLayer, nnx.Conv):
  """``nnx.Conv`` whose parameter cotangent is the ProxProp direction.

  Supports 1-3 spatial dims, strides, all of flax's paddings, kernel dilation and
  ``feature_group_count`` (one block-diagonal system per group);
  ``input_dilation`` and ``mask`` raise (use `prox_module`). Extra arguments as
  `Linear`.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
               mode="prox_cg1", tau_prox=1.0, axis_name=None,
               solve_precision=ops.SOLVE_PRECISION, distribute_solves=False, **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision, distribute_solves)
    super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
    flax_common.check_conv_options("pp.Conv", self.input_dilation, self.mask)

  def check_convertible(self) -> None:
    """Raises for ``nnx.Conv`` options this layer does not implement (`pp.convert`)."""
    flax_common.check_conv_options("pp.Conv", self.input_dilation, self.mask)
    _check_default_products(
        "pp.Conv", conv_general_dilated=self.conv_general_dilated is not jax.lax.conv_general_dilated,
        preferred_element_type=self.preferred_element_type is not None)

  def __call__(self, inputs, out_sharding=None):
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kwargs = solve_kwargs(self, self.kernel, self.bias)
    return _with_out_sharding(
        lambda x, k, b, tau: flax_common.conv(
            x, k, b, self.kernel_size, self.strides, self.padding, self.kernel_dilation,
            self.feature_group_count, tau_prox=tau, precision=self.precision, **kwargs),
        out_sharding, self, inputs, kernel, bias)


def prox_module(cls: type[nnx.Module]) -> type[nnx.Module]:
  """Turns an NNX module class that is linear in its ``nnx.Param``s into a ProxProp one.

  The new class takes the same arguments plus keyword-only ``mode``, ``tau_prox``
  and ``axis_name``. Its call runs ``cls.__call__`` through `proxprop_jax.proximal`
  (one matrix-free CG over all parameters, or the materialised Gram for
  ``prox_exact`` up to `ops.MAX_EXACT_PARAMS` parameters). Positional call
  arguments must be arrays; keyword arguments are static. Check linearity once
  with `check_linear`.

  Example::

    ProxConvTranspose = pp.prox_module(nnx.ConvTranspose)
    layer = ProxConvTranspose(8, 4, (3, 3), mode="prox_cg3", rngs=nnx.Rngs(0))
  """

  class ProxModule(ProxLayer, cls):

    def __init__(self, *args, mode="prox_cg1", tau_prox=1.0, axis_name=None,
                 solve_precision=ops.SOLVE_PRECISION, distribute_solves=False, **kwargs):
      if distribute_solves:
        raise ValueError(f"pp.prox_module({cls.__name__}) solves one matrix-free CG over all "
                         f"its parameters: it has no columns to share among devices. "
                         f"distribute_solves=True is for pp.Linear, pp.Conv, pp.LinearGeneral, "
                         f"pp.Einsum, pp.Embed and the norm layers.")
      init_prox(self, mode, tau_prox, axis_name, solve_precision)
      super().__init__(*args, **kwargs)

    def __call__(self, *args, **kwargs):
      graphdef, params, rest = nnx.split(self, nnx.Param, ...)

      def apply(params, inputs):
        args, rest = inputs
        return cls.__call__(nnx.merge(graphdef, params, rest), *args, **kwargs)

      return ops.proximal(apply, **prox_kwargs(self))(params, (args, rest))

  ProxModule.__name__ = ProxModule.__qualname__ = f"Prox{cls.__name__}"
  ProxModule.__doc__ = f"{cls.__name__} with a ProxProp backward pass (see `prox_module`)."
  return ProxModule


def check_linear(module: nnx.Module, *args, seed: int = 0, rtol: float = 1e-4) -> float:
  """Checks numerically that ``module(*args)`` is linear in the module's ``nnx.Param``s.

  Evaluates the module at random parameters ``a``, ``b`` and checks
  ``f(a + 2b) = f(a) + 2 f(b)`` (which also rules out an affine offset, since it
  implies ``f(0) = 0``).

  Returns:
    The relative deviation found (≤ ``rtol``).

  Raises:
    ValueError: if the module is not linear in its parameters, saying by how much.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), 2 * len(leaves))
  draw = lambda ks: treedef.unflatten(
      [jax.random.normal(k, jnp.shape(l), jnp.float32).astype(jnp.result_type(l))
       for k, l in zip(ks, leaves)])
  a, b = draw(keys[::2]), draw(keys[1::2])
  f = lambda p: jax.tree.leaves(nnx.merge(graphdef, p, rest)(*args))
  # In true float32: the default precision (TF32 on a GPU) would add its own rounding, ~1e-4.
  with jax.default_matmul_precision("highest"):
    combined = f(jax.tree.map(lambda a, b: a + 2 * b, a, b))
    expected = [fa + 2 * fb for fa, fb in zip(f(a), f(b))]
  num = sum(float(np.sum(np.square(np.asarray(c - e, np.float64))))
            for c, e in zip(combined, expected))
  den = sum(float(np.sum(np.square(np.asarray(e, np.float64)))) for e in expected)
  error = (num / max(den, np.finfo(np.float64).tiny)) ** 0.5
  if not error <= rtol:
    raise ValueError(
        f"{type(module).__name__} is not linear in its parameters: f(a + 2b) differs from "
        f"f(a) + 2 f(b) by {error:.3g} (relative; tolerance {rtol:g}). ProxProp's proximal "
        f"step needs a layer z = A(x) θ that is linear in θ (no activation, no constant "
        f"offset inside the layer).")
  return error


# ------------------------------------------------------------- embeddings and norm layers


class Embed(ProxLayer, nnx.Embed):
  """``nnx.Embed`` whose table's cotangent is the ProxProp direction of its lookups.

  ``AᵀA`` is the diagonal of token counts (see `proxprop_jax.embed`). ``attend``
  (the product with the table, e.g. tied output logits) is ``nnx.Embed``'s own:
  its share of the table's cotangent is the plain gradient, added to the lookups'
  direction. Extra arguments as `Linear`.
  """

  def __init__(self, num_embeddings: int, features: int, *, mode="prox_cg1", tau_prox=1.0,
               axis_name=None, solve_precision=ops.SOLVE_PRECISION, distribute_solves=False,
               **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision, distribute_solves)
    super().__init__(num_embeddings, features, **kwargs)

  def __call__(self, inputs, out_sharding=None):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    (embedding,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    kwargs = solve_kwargs(self, self.embedding)
    return _with_out_sharding(lambda i, e, tau: ops.embed(i, e, tau_prox=tau, **kwargs),
                              out_sharding, self, inputs, embedding)


def _init_norm(module, flax_cls, args, kwargs, prox_settings, stats_axis_name) -> None:
  """Builds the flax norm layer, then stores flax's ``axis_name`` (the statistics'
  axis) as ``stats_axis_name``: ``axis_name`` is ProxProp's batch axis, as in every
  ProxProp layer."""
  init_prox(module, *prox_settings)
  prox_axis = module.axis_name
  flax_cls.__init__(module, *args, axis_name=stats_axis_name, **kwargs)
  module.stats_axis_name, module.axis_name = module.axis_name, prox_axis


def _normalized(flax_cls, module, promoted, *args, **kwargs):
  """``x̂``: ``flax_cls.__call__`` itself, run on a view of ``module`` without scale and bias.

  Args:
    promoted: the call's inputs as the layer's ``promote_dtype`` made them (with the
      real scale and bias), scale and bias replaced by None: the view hands them back
      from its ``promote_dtype``, so ``x`` (and BatchNorm's running statistics) have
      flax's dtypes.
    *args, **kwargs: the rest of the flax call (``use_running_average``, ``mask``).

  The view computes statistics over ``stats_axis_name`` and returns ``x̂`` in the
  dtype flax computes it in (at least float32), not rounded to the output dtype.
  BatchNorm's running statistics are the module's own variables: flax's code
  updates them.
  """
  x = promoted[0]
  view = types.SimpleNamespace(**vars(module))
  view.scale = view.bias = None
  view.axis_name = module.stats_axis_name
  view.promote_dtype = lambda inputs, dtype=None, **_: promoted
  view.dtype = solvers.solve_dtype(x.dtype if module.dtype is None else module.dtype)
  return flax_cls.__call__(view, x, *args, **kwargs)


def _scale_and_bias(module):
  return tuple(None if v is None else v[...] for v in (module.scale, module.bias))


def _affine(module, x, xhat, scale, bias, feature_axes):
  """``x̂ ⊙ scale + bias`` through `ops.norm_affine`, in the flax layer's output dtype."""
  dtype = flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=module.dtype)
  z = ops.norm_affine(xhat, scale, bias, feature_axes=feature_axes,
                      tau_prox=module.tau_prox[...],
                      **solve_kwargs(module, module.scale, getattr(module, "bias", None)))
  return z.astype(dtype)


_NORM_DOC = """
  ``x̂`` is computed by flax's own code; the affine part ``x̂ ⊙ scale + bias`` is
  `proxprop_jax.norm_affine`: one 2×2 system per feature (1×1 with only scale or
  only bias) over every position that shares the feature. Same arguments,
  parameters and initialisers as the flax layer, plus ``mode``, ``tau_prox``,
  ``axis_name`` (ProxProp's batch axis, as in `Linear`), ``solve_precision`` and
  ``distribute_solves``.
  The flax layer's own ``axis_name`` (the axis its statistics are averaged over)
  is ``stats_axis_name``, default {stats}.
"""


def _per_example_norm_init(flax_class):
  """The ``__init__`` of a ProxProp ``flax_class`` whose statistics are per example."""

  def __init__(self, num_features: int, *, mode="prox_cg1", tau_prox=1.0, axis_name=None,
               stats_axis_name=None, solve_precision=ops.SOLVE_PRECISION,
               distribute_solves=False, **kwargs):
    _init_norm(self, flax_class, (num_features,), kwargs,
               (mode, tau_prox, axis_name, solve_precision, distribute_solves), stats_axis_name)

  return __init__


class LayerNorm(ProxLayer, nnx.LayerNorm):
  __doc__ = "``nnx.LayerNorm`` with a ProxProp direction for its scale and bias.\n" + (
      _NORM_DOC.format(stats="None (the statistics are per example)"))

  __init__ = _per_example_norm_init(nnx.LayerNorm)

  def __call__(self, x, *, mask=None):
    x, scale, bias = self.promote_dtype((x, *_scale_and_bias(self)), dtype=self.dtype)
    xhat = _normalized(nnx.LayerNorm, self, (x, None, None), mask=mask)
    return _affine(self, x, xhat, scale, bias, self.feature_axes)


class RMSNorm(ProxLayer, nnx.RMSNorm):
  __doc__ = "``nnx.RMSNorm`` with a ProxProp direction for its scale (no bias).\n" + (
      _NORM_DOC.format(stats="None (the statistics are per example)"))

  __init__ = _per_example_norm_init(nnx.RMSNorm)

  def __call__(self, x, mask=None):
    scale = None if self.scale is None else self.scale[...]
    x, scale = self.promote_dtype((x, scale), dtype=self.dtype)
    xhat = _normalized(nnx.RMSNorm, self, (x, None), mask=mask)
    return _affine(self, x, xhat, scale, None, self.feature_axes)


class GroupNorm(ProxLayer, nnx.GroupNorm):
  __doc__ = "``nnx.GroupNorm`` with a ProxProp direction for its scale and bias.\n" + (
      _NORM_DOC.format(stats="None (the statistics are per example)"))

  def __init__(self, num_features: int, num_groups=32, group_size=None, *, mode="prox_cg1",
               tau_prox=1.0, axis_name=None, stats_axis_name=None,
               solve_precision=ops.SOLVE_PRECISION, distribute_solves=False, **kwargs):
    _init_norm(self, nnx.GroupNorm, (num_features, num_groups, group_size), kwargs,
               (mode, tau_prox, axis_name, solve_precision, distribute_solves), stats_axis_name)

  def __call__(self, x, *, mask=None):
    x, scale, bias = self.promote_dtype((x, *_scale_and_bias(self)), dtype=self.dtype)
    xhat = _normalized(nnx.GroupNorm, self, (x, None, None), mask=mask)
    return _affine(self, x, xhat, scale, bias, self.feature_axis)


#: `BatchNorm`'s default ``stats_axis_name``: its ``axis_name``.
_LIKE_AXIS_NAME = "same as axis_name"


class BatchNorm(ProxLayer, nnx.BatchNorm):
  __doc__ = "``nnx.BatchNorm`` with a ProxProp direction for its scale and bias.\n" + (
      _NORM_DOC.format(stats="``axis_name`` (statistics of the batch that ProxProp's "
                       "systems span: ``pp.BatchNorm(axis_name=...)`` normalises like "
                       "``nnx.BatchNorm(axis_name=...)``)")) + """
  Running statistics, ``use_running_average`` (constructor, call, ``train()``/
  ``eval()``) and ``momentum`` behave exactly as in ``nnx.BatchNorm``.
"""

  def __init__(self, num_features: int, *, mode="prox_cg1", tau_prox=1.0, axis_name=None,
               stats_axis_name=_LIKE_AXIS_NAME, solve_precision=ops.SOLVE_PRECISION,
               distribute_solves=False, **kwargs):
    if stats_axis_name is _LIKE_AXIS_NAME:
      stats_axis_name = axis_name
    _init_norm(self, nnx.BatchNorm, (num_features,), kwargs,
               (mode, tau_prox, axis_name, solve_precision, distribute_solves), stats_axis_name)

  def __call__(self, x, use_running_average=None, *, mask=None):
    scale, bias = _scale_and_bias(self)
    x, mean, var, scale, bias = self.promote_dtype((x, self.mean[...], self.var[...], scale, bias),
                                                   dtype=self.dtype)
    xhat = _normalized(nnx.BatchNorm, self, (x, mean, var, None, None), use_running_average,
                       mask=mask)
    return _affine(self, x, xhat, scale, bias, self.axis)


def _check_products(cls_name: str, flax_name: str, **custom) -> None:
  """Rejects custom product functions: the ProxProp layer computes its own."""
  given = [name for name, value in custom.items() if value is not None]
  if given:
    raise ValueError(f"{cls_name} computes its products itself and does not take "
                     f"{', '.join(given)}; for a custom product wrap the flax layer with "
                     f"pp.prox_module(nnx.{flax_name}) (matrix-free ProxProp).")


class LinearGeneral(ProxLayer, nnx.LinearGeneral):
  """``nnx.LinearGeneral`` whose parameter cotangent is the ProxProp direction.

  A dense layer over the flattened contracted ``axis`` (rows: the input's other
  axes); each index of ``batch_axis`` has its own weights and so its own system
  (a block-diagonal ``AᵀA``; see `proxprop_jax.dense_general`). ``dot_general``,
  ``dot_general_cls`` and ``preferred_element_type`` are not supported. Extra
  arguments as `Linear`.
  """

  def __init__(self, in_features, out_features, *, mode="prox_cg1", tau_prox=1.0,
               axis_name=None, solve_precision=ops.SOLVE_PRECISION, distribute_solves=False,
               **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision, distribute_solves)
    super().__init__(in_features, out_features, **kwargs)
    self._check_options()

  def _check_options(self):
    _check_products("pp.LinearGeneral", "LinearGeneral", dot_general=self.dot_general,
                    dot_general_cls=self.dot_general_cls,
                    preferred_element_type=self.preferred_element_type)

  def __call__(self, inputs, out_sharding=None):
    self._check_options()
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kwargs = solve_kwargs(self, self.kernel, self.bias)
    return _with_out_sharding(
        lambda x, k, b, tau: ops.dense_general(x, k, b, axis=self.axis,
                                               batch_dims=tuple(self.batch_axis.keys()),
                                               tau_prox=tau, precision=self.precision, **kwargs),
        out_sharding, self, inputs, kernel, bias)


class Einsum(ProxLayer, nnx.Einsum):
  """``nnx.Einsum`` whose parameter cotangent is the ProxProp direction.

  Supports the equations of `proxprop_jax.einsum` (contracted, feature, row and
  per-block indices, e.g. per-head weights ``'btnh,nhk->btnk'``); any other raises
  a ValueError pointing at ``pp.prox_module(nnx.Einsum)``. A custom ``einsum_op``
  and ``preferred_element_type`` are not supported. Extra arguments as `Linear`.
  """

  def __init__(self, einsum_str, kernel_shape, bias_shape=None, *, mode="prox_cg1",
               tau_prox=1.0, axis_name=None, solve_precision=ops.SOLVE_PRECISION,
               distribute_solves=False, **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision, distribute_solves)
    super().__init__(einsum_str, kernel_shape, bias_shape, **kwargs)
    self._check_options()

  def _check_options(self):
    _check_products("pp.Einsum", "Einsum",
                    einsum_op=None if self.einsum_op is jnp.einsum else self.einsum_op,
                    preferred_element_type=self.preferred_element_type)

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    self._check_options()
    einsum_str = self.einsum_str if einsum_str is None else einsum_str
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kwargs = solve_kwargs(self, self.kernel, self.bias)
    return _with_out_sharding(
        lambda x, k, b, tau: ops.einsum(einsum_str, x, k, b, tau_prox=tau,
                                        precision=self.precision, **kwargs),
        out_sharding, self, inputs, kernel, bias)
