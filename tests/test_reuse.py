"""A ProxProp layer's parameters used twice in one differentiated function raise; the joint
system is one call on the concatenated inputs; forward passes and gradient mode are fine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import proxprop_jax as pp
from tests import reference

X1 = jax.random.normal(jax.random.key(0), (5, 4))
X2 = jax.random.normal(jax.random.key(1), (3, 4))


def _twice(model):
  return jnp.sum(model(X1) ** 2) + jnp.sum(model(X2) ** 2)


@pytest.mark.parametrize("jit", [False, True])
def test_a_layer_called_twice_in_one_step_raises_with_what_to_do(jit):
  layer = pp.Linear(4, 3, mode="prox_cg2", tau_prox=1.0, rngs=nnx.Rngs(0))
  grad = nnx.jit(nnx.grad(_twice)) if jit else nnx.grad(_twice)
  with pytest.raises(pp.reuse.ReusedParameterError,
                     match=r"pp.Linear: .*used twice.*concatenated inputs.*mode='gradient'"):
    grad(layer)


def test_forward_passes_input_gradients_and_separate_steps_are_fine():
  layer = pp.Linear(4, 4, mode="prox_exact", tau_prox=1.0, rngs=nnx.Rngs(0))
  plain = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer(layer(X1)), plain(plain(X1)))
  np.testing.assert_array_equal(nnx.jit(lambda m: m(m(X1)))(layer), plain(plain(X1)))
  dx = jax.grad(lambda x: jnp.sum(layer(layer(x))))(X1)  # parameters not differentiated
  np.testing.assert_allclose(dx, jax.grad(lambda x: jnp.sum(plain(plain(x))))(X1), rtol=1e-6)
  once = lambda m: jnp.sum(m(X1) ** 2)
  for _ in range(2):  # one call per differentiated function
    nnx.grad(once)(layer)


def test_gradient_mode_sums_gradients_as_backprop_does():
  layer = pp.Linear(4, 3, mode="gradient", tau_prox=1.0, rngs=nnx.Rngs(0))
  got = nnx.grad(_twice)(layer)
  want = nnx.grad(_twice)(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_tied_parameters_across_layers_raise():
  model = nnx.Module()
  model.encode = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  model.decode = nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(1))
  model.decode.kernel = model.encode.kernel
  pp.convert(model, mode="prox_exact", tau_prox=1.0)
  with pytest.raises(pp.reuse.ReusedParameterError, match="shares an nnx.Param"):
    nnx.grad(lambda m: jnp.sum(m.decode(m.encode(X1))))(model)
  model.decode.mode = "gradient"  # a gradient-mode layer tied to a proximal one: still refused
  with pytest.raises(pp.reuse.ReusedParameterError):
    nnx.grad(lambda m: jnp.sum(m.decode(m.encode(X1))))(model)


@pytest.mark.usefixtures("x64")
def test_one_call_on_the_concatenated_inputs_solves_the_joint_system():
  rng = np.random.default_rng(0)
  x1, x2 = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
  c1, c2 = rng.normal(size=(5, 3)), rng.normal(size=(3, 3))
  layer = pp.Linear(4, 3, mode="prox_exact", tau_prox=0.5, param_dtype=jnp.float64,
                    rngs=nnx.Rngs(0))
  loss = lambda m: jnp.sum(jnp.concatenate([c1, c2]) * m(jnp.concatenate([x1, x2])))
  got = nnx.grad(loss)(layer)
  got = np.concatenate([got["kernel"][...], got["bias"][...][None]])
  a1, a2 = reference.with_ones(x1, True), reference.with_ones(x2, True)
  joint = np.linalg.solve(a1.T @ a1 + a2.T @ a2 + 2.0 * np.eye(5), a1.T @ c1 + a2.T @ c2)
  np.testing.assert_allclose(got, joint, rtol=1e-10)
  summed = (reference.direction(a1, c1, "prox_exact", 2.0)
            + reference.direction(a2, c2, "prox_exact", 2.0))
  assert np.abs(summed - joint).max() > 0.1 * np.abs(joint).max()  # what per-call solves give
