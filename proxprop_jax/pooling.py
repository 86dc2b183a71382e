"""Max pooling with a backward pass that is fast on XLA's CPU backend.

``flax.linen.max_pool`` / ``flax.nnx.max_pool`` is ``lax.reduce_window``; its gradient is
XLA's ``select_and_scatter``, which the CPU backend runs as a slow scalar loop: on the paper's
ConvNet it takes about a third of a plain BackProp step. For the common non-overlapping case
(``strides == window``, no padding) :func:`max_pool` instead stacks the windows' elements
(strided slices of the input) along a trailing axis and takes its maximum; the gradient goes,
as flax's does, entirely to the first maximum of each window (row-major order) and is written
as a ``where`` with the one-hot of that position, which XLA fuses into plain elementwise
loops. Values and gradients are identical to flax's; every other configuration simply calls
flax's ``max_pool``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import linen


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
  """Drop-in for ``flax.nnx.max_pool`` / ``flax.linen.max_pool`` (same arguments and result).

  Args:
    inputs: ``(batch dims..., window dims..., features)``.
    window_shape: the window size per spatial dimension.
    strides: the stride per spatial dimension (default ``(1, ..., 1)``).
    padding: ``"VALID"``, ``"SAME"`` or one ``(low, high)`` pair per spatial dimension.
  """
  window_shape = tuple(window_shape)
  strides_ = tuple(strides) if strides is not None else (1,) * len(window_shape)
  if _is_unpadded(padding, len(window_shape)) and strides_ == window_shape:
    return _tiled_max(inputs, window_shape)
  return linen.max_pool(inputs, window_shape, strides=strides, padding=padding)


def _is_unpadded(padding, n: int) -> bool:
  if isinstance(padding, str):
    return padding.upper() == "VALID"
  pads = tuple(tuple(p) for p in padding)
  return len(pads) == n and all(p == (0, 0) for p in pads)


def _windows(inputs, window_shape):
  """``(..., out dims..., features, window elements)``: every window along the last axis.

  Element ``(i, j, ...)`` of every window is one strided slice of the input; stacking the
  slices in row-major order of the offsets keeps flax's "first maximum" order. Slices and a
  stack (no reshape) keep the batch and feature shardings of an input on an Explicit mesh.
  """
  n = len(window_shape)
  lead = inputs.ndim - n - 1
  spatial = inputs.shape[lead:lead + n]
  out = tuple(s // k for s, k in zip(spatial, window_shape))
  # VALID drops the trailing rows/columns that do not fill a window
  elements = [inputs[(slice(None),) * lead
                     + tuple(slice(i, o * k, k) for i, o, k in zip(offset, out, window_shape))]
              for offset in itertools.product(*(range(k) for k in window_shape))]
  return jnp.stack(elements, axis=-1)


@jax.custom_jvp
def _window_max(windows):
  return jnp.max(windows, axis=-1)


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
  (windows,), (tangent,) = primals, tangents
  # all of the derivative goes to the first maximum of each window, as with reduce_window
  first = jnp.argmax(windows, axis=-1)
  mask = first[..., None] == jnp.arange(windows.shape[-1])
  return jnp.max(windows, axis=-1), jnp.sum(jnp.where(mask, tangent, 0), axis=-1)


def _tiled_max(inputs, window_shape):
  n = len(window_shape)
  lead = inputs.ndim - n - 1
  if lead < 0:
    raise ValueError(f"max_pool: inputs of shape {inputs.shape} have fewer than the "
                     f"{n} window dimensions + 1 feature dimension the window {window_shape} "
                     "needs")
  return _window_max(_windows(inputs, window_shape))  # (..., out dims..., features)
