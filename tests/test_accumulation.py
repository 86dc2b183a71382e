"""Gradient accumulation over micro-batches (optax.MultiSteps) averages per-micro-batch
ProxProp directions, which differ from the whole batch's direction (BackProp's agree)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import proxprop_jax as pp
from tests import reference


def _train(mode, optimizer, batches):
  model = pp.Linear(5, 3, mode=mode, tau_prox=0.5, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optimizer, wrt=nnx.Param)
  for x, y in batches:
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
  return np.asarray(model.kernel[...])


@pytest.mark.parametrize("mode", ["gradient", "prox_exact", "prox_cg3"])
def test_multisteps_equals_the_whole_batch_only_for_gradients(mode):
  x = jax.random.normal(jax.random.key(0), (8, 5))
  y = jax.random.normal(jax.random.key(1), (8, 3))
  whole = _train(mode, optax.sgd(1.0), [(x, y)])
  halves = [(x[:4], y[:4]), (x[4:], y[4:])]
  accumulated = _train(mode, optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2), halves)
  start = _train(mode, optax.sgd(1.0), [])
  difference = np.abs(accumulated - whole).max() / np.abs(whole - start).max()
  if mode == "gradient":
    assert difference < 1e-5
  else:
    assert difference > 0.05


@pytest.mark.usefixtures("x64")
def test_the_mean_of_micro_batch_directions_is_not_the_batch_direction():
  rng = np.random.default_rng(0)
  a = reference.with_ones(rng.normal(size=(8, 5)), True)
  g = rng.normal(size=(8, 3)) / 8  # a mean loss: g carries 1/batch
  whole = reference.direction(a, g, "prox_exact", 2.0)
  # Each micro-batch's mean loss carries 1/4; MultiSteps averages the two directions.
  halves = [reference.direction(a[i:i + 4], 2 * g[i:i + 4], "prox_exact", 2.0) for i in (0, 4)]
  averaged = (halves[0] + halves[1]) / 2
  assert np.abs(averaged - whole).max() > 0.1 * np.abs(whole).max()
  dense = jax.vjp(lambda k, b: pp.dense(jnp.asarray(a[:, :-1]), k, b, mode="prox_exact",
                                        tau_prox=0.5), jnp.zeros((5, 3)), jnp.zeros(3))[1](g)
  np.testing.assert_allclose(np.concatenate([dense[0], dense[1][None]]), whole, rtol=1e-10)
