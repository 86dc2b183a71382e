"""ProxProp layers whose parameters are used twice in one differentiated function.

Each call of a ProxProp layer is one ``jax.custom_vjp``: its backward pass solves
the proximal system of *that call's* rows. A layer called twice in one step (a
recurrent cell, a block applied twice) or two ProxProp layers sharing an
``nnx.Param`` (tied weights) would therefore get the *sum* of per-call
directions ``Σᵢ (AᵢᵀAᵢ + λI)⁻¹ Aᵢᵀgᵢ``, which is not the proximal step of the
shared parameters, ``(Σᵢ AᵢᵀAᵢ + λI)⁻¹ Σᵢ Aᵢᵀgᵢ``. ProxProp refuses: the second
use of a parameter value inside one trace gets a zero-valued `sentinel` added
to its output, whose backward pass raises `ReusedParameterError`. A forward pass
alone (evaluation, generation) never raises; neither do layers in ``"gradient"``
mode, whose summed gradients are the gradient.

What to do instead is in the error message: call the layer once on the
concatenated inputs (that *is* the joint system), or give it ``mode="gradient"``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

_STATE = threading.local()


class ReusedParameterError(ValueError):
  """A ProxProp layer's parameters were differentiated through two uses in one step."""


def _message(layer: str) -> str:
  return (
      f"{layer}: the parameters of a ProxProp layer were used twice in one differentiated "
      f"function (the layer was called twice, or it shares an nnx.Param with another ProxProp "
      f"layer). Each call would solve its own proximal system and the directions would be "
      f"summed, which is not the proximal step of the shared parameters, so ProxProp raises "
      f"instead. Call the layer once on the concatenated inputs (jnp.concatenate along the "
      f"batch axis: one joint system), or give it mode='gradient' (e.g. "
      f"pp.convert(model, ..., exclude=(PATH,)) keeps the plain layer).")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sentinel(value, layer: str):
  """``0`` (a scalar of ``value``'s dtype) whose backward pass raises `ReusedParameterError`."""
  del layer
  return jnp.zeros((), jnp.result_type(value))


def _sentinel_fwd(value, layer):
  return sentinel(value, layer), None


def _sentinel_bwd(layer, residuals, g):
  raise ReusedParameterError(_message(layer))


sentinel.defvjp(_sentinel_fwd, _sentinel_bwd)


def _seen() -> dict:
  """``id(value) -> (weakref(value), prox)`` of parameter values used by ProxProp layers."""
  if not hasattr(_STATE, "seen"):
    _STATE.seen, _STATE.active = {}, set()
  return _STATE.seen


def _param_values(module) -> list:
  return [v.get_value() for v in vars(module).values() if isinstance(v, nnx.Param)]


def _reused(values, prox: bool) -> list:
  """Registers traced parameter values and returns those already used by a ProxProp
  layer call, where either use solves a proximal system."""
  seen, reused = _seen(), []
  for value in values:
    if not isinstance(value, jax.core.Tracer):  # concrete: nothing is differentiated
      continue
    key, entry = id(value), seen.get(id(value))
    if entry is not None and entry[0]() is value:
      if prox or entry[1]:
        reused.append(value)
      continue
    # The callback runs before the value's memory (and so its id) can be reused.
    seen[key] = (weakref.ref(value, lambda _, key=key: seen.pop(key, None)), prox)
  return reused


@contextlib.contextmanager
def _active(module):
  """Marks ``module`` as inside its call (a subclass calling ``super().__call__`` is one use)."""
  _seen()
  _STATE.active.add(id(module))
  try:
    yield
  finally:
    _STATE.active.discard(id(module))


def checked_call(call):
  """Wraps a ProxProp NNX layer's ``__call__`` with the reuse check of this module."""

  @functools.wraps(call)
  def wrapper(self, *args, **kwargs):
    if id(self) in getattr(_STATE, "active", ()):
      return call(self, *args, **kwargs)
    reused = _reused(_param_values(self), getattr(self, "mode", "gradient") != "gradient")
    with _active(self):
      out = call(self, *args, **kwargs)
    if not reused:
      return out
    cls = type(self)
    name = f"pp.{cls.__name__}" if cls.__module__.startswith("proxprop_jax") else cls.__name__
    guard = sentinel(reused[0], name)
    return jax.tree.map(lambda y: y + guard.astype(y.dtype), out)

  return wrapper
