"""Flax NNX modules with a ProxProp backward pass.

`Linear` and `Conv` subclass ``nnx.Linear`` and ``nnx.Conv``: same arguments,
parameters (``kernel``, ``bias``), shapes and initialisers, plus ``mode``,
``tau_prox``, ``axis_name`` and ``solve_precision``. A model swaps the flax layer
for these and nothing else changes. `prox_module` does the same for any NNX
module that is linear in its parameters, through the matrix-free
`proxprop_jax.proximal`.

``tau_prox`` is stored as a `TauProx` variable: state of the model (checkpointed
with it, not trained by ``nnx.Optimizer(..., wrt=nnx.Param)``), so changing it
between steps does not retrace a jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from proxprop_jax import flax_common, ops
from proxprop_jax.flax_common import ProxLayer
from proxprop_jax.modes import check_tau


class TauProx(nnx.Variable):
  """The proximal step size ``τ`` of a ProxProp layer: a non-trainable scalar."""


def init_prox(module, mode, tau_prox, axis_name, solve_precision) -> None:
  """Sets a ProxProp NNX layer's ``mode``, ``tau_prox``, ``axis_name``, ``solve_precision``."""
  settings = flax_common.prox_settings(mode, tau_prox, axis_name, solve_precision)
  module.mode = settings.mode
  module.tau_prox = TauProx(jnp.asarray(settings.tau_prox))
  module.axis_name = settings.axis_name
  module.solve_precision = settings.solve_precision


def prox_kwargs(module) -> dict:
  """The keyword arguments of `ops.dense`/`ops.conv` for a ProxProp NNX layer."""
  return dict(mode=module.mode, tau_prox=module.tau_prox[...], axis_name=module.axis_name,
              solve_precision=module.solve_precision)


def set_tau_value(module, tau_prox) -> None:
  """Sets one layer's ``τ`` (validated), keeping its variable: no retrace under ``nnx.jit``."""
  module.tau_prox[...] = jnp.asarray(check_tau(tau_prox), module.tau_prox[...].dtype)


def _check_out_sharding(cls_name: str, out_sharding) -> None:
  if out_sharding is not None:
    raise ValueError(f"{cls_name} does not take out_sharding; shard the batch and let jit "
                     f"propagate it (see the README's 'Several devices').")


class Linear(ProxLayer, nnx.Linear):
  """``nnx.Linear`` whose parameter cotangent is the ProxProp direction.

  Args:
    in_features, out_features, **kwargs: as ``nnx.Linear``.
    mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cgN"``.
    tau_prox: the proximal step size ``τ > 0``.
    axis_name: the ``pmap``/``shard_map`` batch axis, or None.
    solve_precision: the precision of the products that compute the direction.
  """

  def __init__(self, in_features: int, out_features: int, *, mode="prox_cg1", tau_prox=1.0,
               axis_name=None, solve_precision=ops.SOLVE_PRECISION, **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision)
    super().__init__(in_features, out_features, **kwargs)

  def __call__(self, inputs, out_sharding=None):
    _check_out_sharding("pp.Linear", out_sharding)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    return ops.dense(inputs, kernel, bias, precision=self.precision, **prox_kwargs(self))


class Conv(ProxLayer, nnx.Conv):
  """``nnx.Conv`` whose parameter cotangent is the ProxProp direction.

  Supports 1-3 spatial dims, strides, all of flax's paddings, kernel dilation and
  ``feature_group_count`` (one block-diagonal system per group);
  ``input_dilation`` and ``mask`` raise (use `prox_module`). Extra arguments as
  `Linear`.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
               mode="prox_cg1", tau_prox=1.0, axis_name=None,
               solve_precision=ops.SOLVE_PRECISION, **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision)
    super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
    flax_common.check_conv_options("pp.Conv", self.input_dilation, self.mask)

  def __call__(self, inputs, out_sharding=None):
    _check_out_sharding("pp.Conv", out_sharding)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    return flax_common.conv(inputs, kernel, bias, self.kernel_size, self.strides,
                            self.padding, self.kernel_dilation, self.feature_group_count,
                            precision=self.precision, **prox_kwargs(self))


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
                 solve_precision=ops.SOLVE_PRECISION, **kwargs):
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
               axis_name=None, solve_precision=ops.SOLVE_PRECISION, **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision)
    super().__init__(in_features, out_features, **kwargs)
    self._check_options()

  def _check_options(self):
    _check_products("pp.LinearGeneral", "LinearGeneral", dot_general=self.dot_general,
                    dot_general_cls=self.dot_general_cls,
                    preferred_element_type=self.preferred_element_type)

  def __call__(self, inputs, out_sharding=None):
    _check_out_sharding("pp.LinearGeneral", out_sharding)
    self._check_options()
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    return ops.dense_general(inputs, kernel, bias, axis=self.axis,
                             batch_dims=tuple(self.batch_axis.keys()), precision=self.precision,
                             **prox_kwargs(self))


class Einsum(ProxLayer, nnx.Einsum):
  """``nnx.Einsum`` whose parameter cotangent is the ProxProp direction.

  Supports the equations of `proxprop_jax.einsum` (contracted, feature, row and
  per-block indices, e.g. per-head weights ``'btnh,nhk->btnk'``); any other raises
  a ValueError pointing at ``pp.prox_module(nnx.Einsum)``. A custom ``einsum_op``
  and ``preferred_element_type`` are not supported. Extra arguments as `Linear`.
  """

  def __init__(self, einsum_str, kernel_shape, bias_shape=None, *, mode="prox_cg1",
               tau_prox=1.0, axis_name=None, solve_precision=ops.SOLVE_PRECISION, **kwargs):
    init_prox(self, mode, tau_prox, axis_name, solve_precision)
    super().__init__(einsum_str, kernel_shape, bias_shape, **kwargs)
    self._check_options()

  def _check_options(self):
    _check_products("pp.Einsum", "Einsum",
                    einsum_op=None if self.einsum_op is jnp.einsum else self.einsum_op,
                    preferred_element_type=self.preferred_element_type)

  def __call__(self, inputs, einsum_str=None, out_sharding=None):
    _check_out_sharding("pp.Einsum", out_sharding)
    self._check_options()
    einsum_str = self.einsum_str if einsum_str is None else einsum_str
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    return ops.einsum(einsum_str, inputs, kernel, bias, precision=self.precision,
                      **prox_kwargs(self))
