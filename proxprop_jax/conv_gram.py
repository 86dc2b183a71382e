"""The input matrix ``A(x)`` of a convolution and its Gram matrix ``AᵀA``.

A convolution is linear in its kernel: ``z = A(x) θ`` with ``A(x)`` the im2col
patches of ``x`` (one row per batch element and output position, one column per
kernel tap and input channel, in the kernel's own row-major ``(*window, Cin)``
order) and, for the bias, one more column of ones.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import lax


def output_shape(in_spatial, window, strides, pads, dilation):
  """Spatial output shape of a convolution with explicit padding."""
  return tuple(
      (n + lo + hi - ((k - 1) * d + 1)) // s + 1
      for n, k, s, (lo, hi), d in zip(in_spatial, window, strides, pads, dilation))


def patches(x, window, strides, pads, dilation):
  """im2col: ``A(x)`` without the bias column, shape ``(rows, prod(window)·Cin)``.

  Args:
    x: (N, *spatial, Cin).
    window, strides, dilation: one int per spatial dim.
    pads: one ``(low, high)`` pair per spatial dim (may be negative).

  Returns:
    The patch matrix; column ``t·Cin + c`` holds tap ``t`` (row-major over the
    window) of channel ``c``, matching ``kernel.reshape(-1, Cout)``.
  """
  x = lax.pad(x, jnp.array(0, x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
  out = output_shape(x.shape[1:-1], window, strides, [(0, 0)] * len(window), dilation)
  taps = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = (0, *(o * d for o, d in zip(offset, dilation)), 0)
    limit = (x.shape[0], *(b + (n - 1) * s + 1 for b, n, s in zip(start[1:-1], out, strides)),
             x.shape[-1])
    taps.append(lax.slice(x, start, limit, (1, *strides, 1)))
  stacked = jnp.stack(taps, axis=-2)  # (N, *out, taps, Cin)
  return stacked.reshape(-1, len(taps) * x.shape[-1])


def input_matrix(x, window, strides, pads, dilation, use_bias: bool):
  """``A(x) = [patches, 1]`` (the ones column only with a bias)."""
  a = patches(x, window, strides, pads, dilation)
  if use_bias:
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
  return a


def gram(x, window, strides, pads, dilation, use_bias: bool):
  """``AᵀA`` of shape ``(p, p)``, ``p = prod(window)·Cin (+1 with a bias)``."""
  a = input_matrix(x, window, strides, pads, dilation, use_bias)
  return a.T @ a


def gram_flops(x_shape, window, strides, pads, dilation, use_bias: bool) -> float:
  """Estimated FLOPs of `gram` (rows · p²)."""
  out = output_shape(x_shape[1:-1], window, strides, pads, dilation)
  rows = x_shape[0] * math.prod(out)
  p = math.prod(window) * x_shape[-1] + use_bias
  return 2.0 * rows * p * p
