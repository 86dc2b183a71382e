"""Argument normalisation and output shapes of dense and convolution layers.

One place for what `ops`, the flax layers and the conv Gram all need: strides,
dilations and paddings as tuples, explicit ``(low, high)`` pads, output shapes,
and flax's extra paddings (``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``) applied
to the input beforehand.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

PADDINGS = "'SAME', 'VALID', an integer or one (low, high) pair per spatial dim"


def int_tuple(value, n: int, name: str) -> tuple[int, ...]:
  """``value`` as ``n`` positive ints (an int is repeated; None means 1)."""
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    value = (value,) * n
  value = tuple(value)
  if len(value) != n or not all(isinstance(v, int) and v >= 1 for v in value):
    raise ValueError(f"{name} must be an integer >= 1 or {n} of them; got {value!r}.")
  return value


def explicit_pads(padding, in_spatial, window, strides, dilation) -> tuple[tuple[int, int], ...]:
  """``"SAME"``/``"VALID"``/int/pairs as one explicit ``(low, high)`` pair per spatial dim."""
  n = len(window)
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be {PADDINGS}; got {padding!r}.")
    dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    pads = lax.padtype_to_pads(in_spatial, dilated, strides, padding.upper())
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  if isinstance(padding, int):
    return ((padding, padding),) * n
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != n or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding must be {PADDINGS} ({n} spatial dims); got {padding!r}.")
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def conv_output_shape(in_spatial, window, strides, pads, dilation) -> tuple[int, ...]:
  """Spatial output shape of a convolution with explicit padding."""
  return tuple(
      (n + lo + hi - ((k - 1) * d + 1)) // s + 1
      for n, k, s, (lo, hi), d in zip(in_spatial, window, strides, pads, dilation))


def flax_padding(inputs, padding, kernel_size, dilation):
  """Applies flax's input-side paddings; returns ``(inputs, padding for the conv)``.

  ``"CIRCULAR"`` and ``"REFLECT"`` pad the input like flax's ``Conv`` does and leave
  a ``"VALID"`` convolution; ``"CAUSAL"`` (1-d only) pads on the left. Everything
  else is returned unchanged, for `explicit_pads`.
  """
  from flax.linen.linear import canonicalize_padding  # flax's own normalisation

  n = len(kernel_size)
  padding = canonicalize_padding(padding, n)
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pads = [(0, 0), *(((k - 1) // 2, k // 2) for k in dilated), (0, 0)]
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    return jnp.pad(inputs, pads, mode=mode), "VALID"
  if padding == "CAUSAL":
    if n != 1:
      raise ValueError("Causal padding is only implemented for 1D convolutions.")
    return jnp.pad(inputs, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0), (0, 0)]), "VALID"
  return inputs, padding
