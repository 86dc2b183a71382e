"""What the NNX and the Linen ProxProp layers share.

* `ProxLayer`: the marker every ProxProp layer carries (``isinstance`` checks in
  `proxprop_jax.parallel`, `proxprop_jax.conversion`);
* `prox_settings`: the validated ``mode``/``τ``/``axis_name``/``solve_precision``;
* `conv`: ``pp.conv`` with flax's ``Conv`` conventions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from proxprop_jax import geometry, ops, reuse
from proxprop_jax.modes import check_tau, parse_mode


class ProxLayer:
  """Marker base class of every ProxProp layer (NNX and Linen).

  A ProxProp layer has the attributes ``mode`` (a mode string), ``tau_prox``,
  ``axis_name`` and ``solve_precision`` (NNX layers also ``distribute_solves``). The ``__call__`` of every NNX subclass
  refuses parameters used twice in one differentiated function (`reuse`).
  """

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if issubclass(cls, nnx.Module) and "__call__" in cls.__dict__:
      cls.__call__ = reuse.checked_call(cls.__dict__["__call__"])


@dataclasses.dataclass(frozen=True)
class ProxSettings:
  """Validated ProxProp settings of a layer."""

  mode: str
  tau_prox: float
  axis_name: Any
  solve_precision: Any
  distribute_solves: bool = False


def prox_settings(mode, tau_prox, axis_name=None, solve_precision=ops.SOLVE_PRECISION,
                  distribute_solves=False) -> ProxSettings:
  """Validates a layer's ProxProp settings (a bad value raises at construction)."""
  cfg = ops.config(mode, axis_name, solve_precision=solve_precision,
                   distribute_solves=distribute_solves)
  return ProxSettings(parse_mode(mode).name, check_tau(tau_prox), cfg.axis_name,
                      cfg.solve_precision, cfg.distribute_solves)


def check_conv_options(cls_name: str, input_dilation, mask) -> None:
  """Rejects the flax ``Conv`` options that ``pp.conv`` does not implement."""
  dilations = (input_dilation,) if isinstance(input_dilation, int) else tuple(input_dilation or (1,))
  if any(d != 1 for d in dilations) or mask is not None:
    raise ValueError(
        f"{cls_name} supports input_dilation=1 and mask=None; got "
        f"input_dilation={input_dilation!r}, mask={'set' if mask is not None else None}. For "
        f"those, wrap the flax layer with pp.prox_module(nnx.Conv) (matrix-free ProxProp).")


def conv(inputs, kernel, bias, kernel_size, strides, padding, kernel_dilation,
         feature_group_count=1, **prox):
  """``pp.conv`` with flax's conventions: any number of batch dims (even none) and
  ``"CIRCULAR"``/``"REFLECT"``/``"CAUSAL"`` padding, applied to the input first."""
  n = len(kernel_size)
  strides = geometry.int_tuple(strides, n, "strides")
  kernel_dilation = geometry.int_tuple(kernel_dilation, n, "kernel_dilation")
  batch_shape = inputs.shape[: inputs.ndim - n - 1]
  inputs = inputs.reshape(-1, *inputs.shape[len(batch_shape):])
  inputs, padding = geometry.flax_padding(inputs, padding, kernel_size, kernel_dilation)
  y = ops.conv(inputs, kernel, bias, strides=strides, padding=padding,
               rhs_dilation=kernel_dilation, feature_group_count=feature_group_count, **prox)
  return y.reshape(*batch_shape, *y.shape[1:])
