"""Linen layers: same parameters and forward pass as flax.linen, the ops' ProxProp backward."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import proxprop_jax as pp
from tests.helpers import gpu_marked


def _check(ours, theirs, x, direction):
  variables = ours.init(jax.random.key(0), x)
  want_variables = theirs.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(want_variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(want_variables)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(want_variables, x), rtol=1e-6)
  target = jax.random.normal(jax.random.key(2), ours.apply(variables, x).shape)
  loss = lambda v: 0.5 * jnp.sum((ours.apply(v, x) - target) ** 2)
  got = jax.grad(loss)(variables)["params"]
  p = variables["params"]
  want = jax.vjp(lambda k, b: direction(x, k, b), p["kernel"], p.get("bias"))[1](
      ours.apply(variables, x) - target)
  np.testing.assert_allclose(got["kernel"], want[0], rtol=1e-5, atol=1e-7)
  if "bias" in got:
    np.testing.assert_allclose(got["bias"], want[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg3"])
@pytest.mark.parametrize("use_bias", gpu_marked([True, False], True))
def test_dense(mode, use_bias):
  x = jax.random.normal(jax.random.key(1), (6, 9))
  _check(pp.linen.Dense(4, use_bias=use_bias, mode=mode, tau_prox=0.5),
         nn.Dense(4, use_bias=use_bias), x,
         functools.partial(pp.dense, mode=mode, tau_prox=0.5))


@pytest.mark.parametrize("x_shape, conv, mode", [
    ((2, 7, 7, 3), dict(strides=2), "prox_exact"),
    pytest.param((2, 7, 7, 3), dict(strides=2), "prox_cg3", marks=pytest.mark.gpu),
    pytest.param((2, 6, 6, 4), dict(feature_group_count=2), "prox_exact",  # grouped
                 marks=pytest.mark.gpu),
    ((2, 6, 6, 4), dict(feature_group_count=2), "prox_cg2"),
])
def test_conv(x_shape, conv, mode):
  x = jax.random.normal(jax.random.key(1), x_shape)
  features = 6 if "feature_group_count" in conv else 4
  _check(pp.linen.Conv(features, (3, 3), mode=mode, tau_prox=0.5, **conv),
         nn.Conv(features, (3, 3), **conv), x,
         functools.partial(pp.conv, mode=mode, tau_prox=0.5, **conv))


def test_bad_configuration_raises_at_construction():
  with pytest.raises(ValueError, match="valid modes are"):
    pp.linen.Dense(3, mode="prox_cgx")
  with pytest.raises(ValueError, match="tau_prox must be"):
    pp.linen.Conv(3, (3, 3), tau_prox=float("inf"))
  with pytest.raises(ValueError, match="input_dilation=1"):
    pp.linen.Conv(4, (3, 3), input_dilation=2)
