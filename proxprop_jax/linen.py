"""Flax Linen layers with a ProxProp backward pass.

`Dense` and `Conv` subclass ``flax.linen.Dense`` and ``flax.linen.Conv`` (same
fields, parameter names, shapes and initialisers) and add the fields ``mode``,
``tau_prox`` and ``axis_name``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from proxprop_jax import _flax_conv, ops
from proxprop_jax.modes import check_tau, parse_mode


class Dense(nn.Dense):
  """``nn.Dense`` whose parameter cotangent is the ProxProp direction."""

  mode: str = "prox_cg1"
  tau_prox: float = 1.0
  axis_name: Any = None

  def __post_init__(self):
    parse_mode(self.mode)
    check_tau(self.tau_prox)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return ops.dense(inputs, kernel, bias, mode=self.mode, tau_prox=self.tau_prox,
                     axis_name=self.axis_name, precision=self.precision)


class Conv(nn.Conv):
  """``nn.Conv`` whose parameter cotangent is the ProxProp direction.

  ``input_dilation``, ``feature_group_count`` and ``mask`` are not supported.
  """

  mode: str = "prox_cg1"
  tau_prox: float = 1.0
  axis_name: Any = None

  def __post_init__(self):
    parse_mode(self.mode)
    check_tau(self.tau_prox)
    _flax_conv.check_supported("pp.linen.Conv", self.input_dilation, self.feature_group_count,
                               self.mask)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs):
    kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (jnp.shape(inputs)[-1], self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return _flax_conv.conv(inputs, kernel, bias, kernel_size, self.strides, self.padding,
                           self.kernel_dilation, mode=self.mode, tau_prox=self.tau_prox,
                           axis_name=self.axis_name, precision=self.precision)
