"""``pp.pooling.max_pool`` gives exactly flax's values and gradients (it only runs faster).

The reference is flax's own ``max_pool`` (``lax.reduce_window``) and ``jax.grad`` / ``jax.jvp``
of it. Inputs are rounded to halves so that windows hold ties (flax sends the whole gradient
to the first maximum; an equal split among ties would fail here), and ReLU outputs give
all-zero windows, as in a ConvNet.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from proxprop_jax.pooling import max_pool


# (input shape, window, strides, padding)
TILED = [
    ((4, 8, 8, 3), (2, 2), (2, 2), "VALID"),      # the ConvNet's pool
    ((3, 9, 7, 5), (2, 2), (2, 2), "VALID"),      # odd sizes: the last row/column is dropped
    ((2, 8, 12, 2), (2, 3), (2, 3), ((0, 0), (0, 0))),
    ((9, 6, 2), (3, 2), (3, 2), "VALID"),         # no batch dimension
    ((2, 3, 6, 4, 2), (2, 2), (2, 2), "valid"),   # two batch dimensions
    ((3, 10, 4), (2,), (2,), "VALID"),            # 1-D windows
    ((2, 4, 6, 4, 3), (2, 3, 2), (2, 3, 2), "VALID"),  # 3-D windows
]
FALLBACK = [
    ((2, 8, 8, 3), (3, 3), (2, 2), "VALID"),      # overlapping windows
    ((2, 8, 8, 3), (2, 2), (2, 2), "SAME"),
    ((2, 7, 7, 3), (2, 2), None, "VALID"),        # default strides 1
    ((2, 7, 7, 3), (2, 2), (2, 2), ((1, 0), (0, 1))),
]


RNG = np.random.default_rng(0)


def _inputs(shape):
  x = np.round(2 * RNG.standard_normal(shape)) / 2
  return jnp.asarray(np.where(RNG.random(shape) < 0.3, 0.0, x), jnp.float32)


def _normal(shape):
  return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _value_gradient_tangent(pool, x, cotangent, tangent):
  """``pool(x)``, its gradient against ``cotangent``, its forward derivative along ``tangent``."""
  y, vjp = jax.vjp(pool, x)
  return y, vjp(cotangent)[0], jax.jvp(pool, (x,), (tangent,))[1]


def test_nnx_and_linen_share_the_reference():
  assert nnx.max_pool is linen.max_pool  # so checking against one checks against both


@pytest.mark.parametrize("case", TILED + FALLBACK, ids=str)
def test_matches_flax_values_gradients_and_tangents(case):
  shape, window, strides, padding = case
  x = _inputs(shape)
  pools = [lambda v, f=f: f(v, window, strides=strides, padding=padding)
           for f in (max_pool, nnx.max_pool)]
  y_shape = jax.eval_shape(pools[1], x).shape
  cotangent, tangent = _normal(y_shape), _normal(x.shape)
  ours, ref = (jax.jit(_value_gradient_tangent, static_argnums=0)(p, x, cotangent, tangent)
               for p in pools)
  for a, b in zip(ours, ref):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_ties_get_the_whole_gradient_at_the_first_maximum():
  x = jnp.array([[[[1.0], [3.0]], [[3.0], [0.0]]]])  # one 2x2 window, max 3 twice
  grad = jax.grad(lambda v: max_pool(v, (2, 2), strides=(2, 2)).sum())(x)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_matches_flax_under_jit_and_vmap():
  x = _inputs((3, 2, 8, 8, 4))
  ours = jax.jit(jax.vmap(jax.grad(lambda v: max_pool(v, (2, 2), strides=(2, 2)).sum())))
  ref = jax.vmap(jax.grad(lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2)).sum()))
  np.testing.assert_array_equal(ours(x), ref(x))


def test_too_few_dimensions_is_a_clear_error():
  with pytest.raises(ValueError, match="window dimensions"):
    max_pool(jnp.zeros((4, 4)), (2, 2), strides=(2, 2))
