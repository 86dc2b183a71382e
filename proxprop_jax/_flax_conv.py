"""The input handling that flax's ``Conv`` layers do around the convolution, shared
by `proxprop_jax.nnx.Conv` and `proxprop_jax.linen.Conv`."""

from __future__ import annotations

import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from proxprop_jax import ops


def check_supported(cls_name: str, input_dilation, feature_group_count, mask) -> None:
  """Rejects the flax ``Conv`` options that ``pp.conv`` does not implement."""
  dilations = (input_dilation,) if isinstance(input_dilation, int) else tuple(input_dilation or (1,))
  if any(d != 1 for d in dilations) or feature_group_count != 1 or mask is not None:
    raise ValueError(
        f"{cls_name} supports input_dilation=1, feature_group_count=1 and mask=None; got "
        f"input_dilation={input_dilation!r}, feature_group_count={feature_group_count!r}, "
        f"mask={'set' if mask is not None else None}. For those, wrap the flax layer with "
        f"pp.prox_module(nnx.Conv) (matrix-free ProxProp).")


def conv(inputs, kernel, bias, kernel_size, strides, padding, kernel_dilation, **prox):
  """``pp.conv`` with flax's conventions: any number of batch dims (even none) and
  ``"CIRCULAR"``/``"REFLECT"``/``"CAUSAL"`` padding, applied to the input first."""
  n = len(kernel_size)
  broadcast = lambda v: (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))
  strides, kernel_dilation = broadcast(strides), broadcast(kernel_dilation)
  batch_shape = inputs.shape[: inputs.ndim - n - 1]
  inputs = inputs.reshape(-1, *inputs.shape[len(batch_shape):])
  padding = canonicalize_padding(padding, n)
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0), *(((k - 1) // 2, k // 2) for k in dilated), (0, 0)]
    inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    if n != 1:
      raise ValueError("Causal padding is only implemented for 1D convolutions.")
    inputs = jnp.pad(inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding = "VALID"
  y = ops.conv(inputs, kernel, bias, strides=strides, padding=padding,
               rhs_dilation=kernel_dilation, **prox)
  return y.reshape(*batch_shape, *y.shape[1:])
