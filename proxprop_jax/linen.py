"""Flax Linen layers with a ProxProp backward pass.

`Dense` and `Conv` subclass ``flax.linen.Dense`` and ``flax.linen.Conv`` (same
fields, parameter names, shapes and initialisers) and add the fields ``mode``,
``tau_prox``, ``axis_name`` and ``solve_precision``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from proxprop_jax import flax_common, ops
from proxprop_jax.flax_common import ProxLayer


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
