"""Flax Linen layers with a ProxProp backward pass.

`Dense` and `Conv` subclass ``flax.linen.Dense`` and ``flax.linen.Conv`` (same
fields, parameter names, shapes and initialisers) and add the fields ``mode``,
``tau_prox``, ``axis_name`` and ``solve_precision``. `intercept` gives the plain
Linen layers of any model a ProxProp backward pass without changing its code.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from proxprop_jax import conversion, flax_common, ops
from proxprop_jax.flax_common import ProxLayer
from proxprop_jax.modes import check_tau


class _ProxFields(ProxLayer, nn.Module):
  """The ProxProp fields of a Linen layer, validated at construction."""

  mode: str = "prox_cg1"
  tau_prox: float = 1.0
  axis_name: Any = None
  solve_precision: Any = ops.SOLVE_PRECISION

  def _prox_kwargs(self) -> dict:
    s = flax_common.prox_settings(self.mode, self.tau_prox, self.axis_name, self.solve_precision)
    return dict(mode=s.mode, tau_prox=s.tau_prox, axis_name=s.axis_name,
                solve_precision=s.solve_precision)


class Dense(_ProxFields, nn.Dense):
  """``nn.Dense`` whose parameter cotangent is the ProxProp direction."""

  def __post_init__(self):
    self._prox_kwargs()
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return ops.dense(inputs, kernel, bias, precision=self.precision, **self._prox_kwargs())


class Conv(_ProxFields, nn.Conv):
  """``nn.Conv`` whose parameter cotangent is the ProxProp direction.

  ``input_dilation`` and ``mask`` are not supported; ``feature_group_count`` is.
  """

  def __post_init__(self):
    self._prox_kwargs()
    flax_common.check_conv_options("pp.linen.Conv", self.input_dilation, self.mask)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs):
    kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    in_features = jnp.shape(inputs)[-1] // self.feature_group_count
    kernel = self.param("kernel", self.kernel_init, kernel_size + (in_features, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return flax_common.conv(inputs, kernel, bias, kernel_size, self.strides, self.padding,
                            self.kernel_dilation, self.feature_group_count,
                            precision=self.precision, **self._prox_kwargs())


# ------------------------------------------------------------- any Linen model


def _params(module, *names):
  return [module.get_variable("params", name) for name in names]


def _check_default(module, **custom) -> None:
  given = [name for name, is_custom in custom.items() if is_custom]
  if given:
    raise ValueError(f"pp.linen.intercept: {type(module).__name__} at "
                     f"'{'/'.join(module.scope.path)}' has a custom {', '.join(given)}, which the "
                     f"ProxProp op does not implement; exclude it (exclude=(PATH,)).")


def _dense(module, prox, inputs):
  _check_default(module, dot_general=module.dot_general not in (None, lax.dot_general),
                 dot_general_cls=module.dot_general_cls is not None)
  kernel, bias = _params(module, "kernel", "bias")
  inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  return ops.dense(inputs, kernel, bias, precision=module.precision, **prox)


def _conv(module, prox, inputs):
  _check_default(module, conv_general_dilated=module.conv_general_dilated not in (
      None, lax.conv_general_dilated), conv_general_dilated_cls=(
          module.conv_general_dilated_cls is not None), shared_weights=not module.shared_weights)
  flax_common.check_conv_options("pp.linen.intercept", module.input_dilation, module.mask)
  kernel, bias = _params(module, "kernel", "bias")
  size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
  inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
  return flax_common.conv(inputs, kernel, bias, size, module.strides or 1, module.padding,
                          module.kernel_dilation or 1, module.feature_group_count,
                          precision=module.precision, **prox)


#: The Linen layers `intercept` routes through ProxProp ops, ``{class: route}`` with
#: ``route(module, prox_kwargs, *call_args) -> output`` (the module's params read by name).
ROUTES = {
    nn.Dense: _dense,
    nn.Conv: _conv,
}


@contextlib.contextmanager
def intercept(*, mode, tau_prox, axis_name=None, include=None, exclude=None,
              solve_precision=ops.SOLVE_PRECISION):
  """Routes the `ROUTES` layers of any Linen model through the ProxProp ops, inside the block.

  ``nn.Dense`` and ``nn.Conv`` (exactly these classes; subclasses keep their own code)
  get ProxProp backward passes with the same parameters and forward pass; the model
  code does not change. ``init`` runs the plain layers (the same parameters).

  Args:
    mode, tau_prox, axis_name, solve_precision: as ``pp.dense``'s (``tau_prox`` may be a
      traced scalar: a scheduled value inside a jitted step).
    include, exclude: as in `proxprop_jax.convert`, on the module's scope path
      (e.g. ``'ResNetBlock_0/Conv_1'``).

  Example::

    with pp.linen.intercept(mode="prox_cg3", tau_prox=1.0, exclude=("head",)):
      grads = jax.grad(loss_fn)(variables, x, y)
  """
  ops.config(mode, axis_name, solve_precision=solve_precision)  # bad values raise here
  if not isinstance(tau_prox, jax.core.Tracer):
    check_tau(tau_prox)
  conversion.check_selector("include", include)
  conversion.check_selector("exclude", exclude)
  prox = dict(mode=mode, tau_prox=tau_prox, axis_name=axis_name, solve_precision=solve_precision)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    route = ROUTES.get(type(module))
    if (route is None or context.method_name != "__call__" or module.is_initializing()
        or not conversion.selected(include, exclude, ["/".join(module.scope.path)], module)):
      return next_fun(*args, **kwargs)
    return route(module, prox, *args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
