"""pp.linen.intercept: plain Linen models get the ProxProp directions of pp.linen layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import proxprop_jax as pp
from tests.helpers import rel_err


class _MLP(nn.Module):
  dense: type = nn.Dense

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.dense(16)(x))
    x = nn.relu(self.dense(16)(x))
    return nn.Dense(3, name="head")(x)


class _ResNetBlock(nn.Module):
  """Conv-BatchNorm-ReLU twice with a projected shortcut (the flax examples' block)."""

  conv: type = nn.Conv

  @nn.compact
  def __call__(self, x, train=True):
    y = nn.relu(nn.BatchNorm(use_running_average=not train)(self.conv(8, (3, 3))(x)))
    y = nn.BatchNorm(use_running_average=not train)(self.conv(8, (3, 3), strides=2)(y))
    shortcut = self.conv(8, (1, 1), strides=2, use_bias=False)(x)
    return nn.relu(y + shortcut).mean(axis=(1, 2)) @ jnp.ones((8, 2))


def _grads(model, variables, x, train_kwargs=None):
  target = jax.random.normal(jax.random.key(2), (x.shape[0], 3 if isinstance(model, _MLP) else 2))

  def loss(params):
    if train_kwargs is None:
      out = model.apply({**variables, "params": params}, x)
    else:
      out, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return 0.5 * jnp.sum((out - target) ** 2)

  return jax.grad(loss)(variables["params"])


def _assert_trees(got, want, equal=True):
  """Every leaf equal to ≤ 1e-5 of its largest entry (jit and eager round differently), or
  (``equal=False``) some leaf more than 1e-2 away."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  errors = [rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  assert max(errors) <= 1e-5 if equal else max(errors) > 1e-2


@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg3"])
def test_dense_directions_equal_pp_linen_dense(mode):
  x = jax.random.normal(jax.random.key(1), (8, 5))
  plain = _MLP()
  ours = _MLP(dense=lambda f: pp.linen.Dense(f, mode=mode, tau_prox=0.5))
  with pp.linen.intercept(mode=mode, tau_prox=0.5, exclude=("head",)):
    variables = plain.init(jax.random.key(0), x)  # init: the plain layers' parameters
    intercepted = _grads(plain, variables, x)
  assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.key(0), x))
  _assert_trees(intercepted, _grads(ours, variables, x))
  backprop = _grads(plain, variables, x)
  _assert_trees(intercepted["head"], backprop["head"])  # excluded: the plain gradient
  _assert_trees(intercepted["Dense_0"], backprop["Dense_0"], equal=False)


@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg2"])
def test_a_resnet_block_equals_the_block_built_from_pp_linen_conv(mode):
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  plain = _ResNetBlock()
  ours = _ResNetBlock(conv=lambda *a, **k: pp.linen.Conv(*a, **k, mode=mode, tau_prox=1.0))
  variables = plain.init(jax.random.key(0), x)
  with pp.linen.intercept(mode=mode, tau_prox=1.0):
    intercepted = jax.jit(lambda v: _grads(plain, v, x, {}))(variables)
  _assert_trees(intercepted, jax.jit(lambda v: _grads(ours, v, x, {}))(variables))
  backprop = jax.jit(lambda v: _grads(plain, v, x, {}))(variables)
  _assert_trees(intercepted["Conv_0"], backprop["Conv_0"], equal=False)


def test_bad_settings_and_unsupported_options_raise():
  with pytest.raises(ValueError, match="valid modes are"):
    with pp.linen.intercept(mode="cg3", tau_prox=1.0):
      pass
  with pytest.raises(ValueError, match="tau_prox must be"):
    with pp.linen.intercept(mode="prox_cg3", tau_prox=-1.0):
      pass
  layer = nn.Conv(4, (3, 3), input_dilation=2, padding=((1, 1), (1, 1)))
  x = jnp.ones((1, 5, 5, 2))
  variables = layer.init(jax.random.key(0), x)
  with pp.linen.intercept(mode="prox_cg3", tau_prox=1.0):
    with pytest.raises(ValueError, match="input_dilation=1"):
      layer.apply(variables, x)
