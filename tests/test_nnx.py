"""NNX modules: same parameters and forward pass as flax, ProxProp backward, training, transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import proxprop_jax as pp
from tests import reference


def _params(module):
  return nnx.state(module, nnx.Param)


def _assert_same_params_and_forward(ours, theirs, x):
  ours_params, theirs_params = _params(ours), _params(theirs)
  assert jax.tree.structure(ours_params) == jax.tree.structure(theirs_params)
  for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(theirs_params)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  y, want = ours(x), theirs(x)
  assert y.dtype == want.dtype and y.shape == want.shape
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"use_bias": False}, {"param_dtype": jnp.bfloat16},
                                    {"dtype": jnp.bfloat16},
                                    {"kernel_init": nnx.initializers.lecun_uniform(),
                                     "bias_init": nnx.initializers.ones}])
def test_linear_mirrors_nnx_linear(kwargs):
  x = jax.random.normal(jax.random.key(1), (2, 3, 6))
  _assert_same_params_and_forward(pp.Linear(6, 5, mode="prox_exact", rngs=nnx.Rngs(0), **kwargs),
                                  nnx.Linear(6, 5, rngs=nnx.Rngs(0), **kwargs), x)


@pytest.mark.parametrize("x_shape,kernel_size,kwargs", [
    ((2, 8, 8, 3), (3, 3), {}),
    ((2, 8, 8, 3), (5, 5), {"strides": 2, "padding": "VALID", "use_bias": False}),
    ((2, 8, 8, 3), (3, 3), {"padding": "CIRCULAR", "kernel_dilation": 2}),
    ((2, 8, 8, 3), (3, 2), {"padding": "REFLECT"}),
    ((2, 9, 3), (4,), {"padding": "CAUSAL"}),
    ((8, 8, 3), (3, 3), {}),                      # no batch dim
    ((2, 2, 5, 5, 3), (3, 3), {"padding": 1}),    # two batch dims
    ((1, 4, 5, 6, 3), (2, 2, 3), {"strides": (1, 2, 1)}),
    ((2, 6, 6, 6), (3, 3), {"feature_group_count": 3}),
])
def test_conv_mirrors_nnx_conv(x_shape, kernel_size, kwargs):
  x = jax.random.normal(jax.random.key(1), x_shape)
  cin = x_shape[-1]
  _assert_same_params_and_forward(
      pp.Conv(cin, 6 if "feature_group_count" in kwargs else 4, kernel_size, mode="prox_cg2", rngs=nnx.Rngs(0), **kwargs),
      nnx.Conv(cin, 6 if "feature_group_count" in kwargs else 4, kernel_size, rngs=nnx.Rngs(0),
               **kwargs), x)


@pytest.mark.gpu
@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg3"])
def test_conv_module_direction_matches_numpy(mode):
  # CIRCULAR padding: A = patches of the wrap-padded input, VALID.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 2)))
  layer = pp.Conv(2, 3, (3, 3), padding="CIRCULAR", mode=mode, tau_prox=0.5,
                  param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  target = jnp.asarray(rng.normal(size=(2, 5, 5, 3)))
  grads = nnx.grad(lambda m: 0.5 * jnp.sum((m(x) - target) ** 2))(layer)
  a, _ = reference.patches(np.pad(np.asarray(x), [(0, 0), (1, 1), (1, 1), (0, 0)], mode="wrap"),
                           (3, 3), (1, 1), [(0, 0), (0, 0)], (1, 1))
  a = reference.with_ones(a, True)
  g = (np.asarray(layer(x)) - np.asarray(target)).reshape(-1, 3)
  want = reference.direction(a, g, mode, 2.0)
  got = np.concatenate([np.asarray(grads["kernel"][...]).reshape(-1, 3),
                        np.asarray(grads["bias"][...])[None]])
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


class _Net(nnx.Module):
  """A small ConvNet + MLP head, every hidden layer ProxProp."""

  def __init__(self, mode, tau, rngs):
    self.conv = pp.Conv(1, 4, (3, 3), mode=mode, tau_prox=tau, rngs=rngs)
    self.hidden = pp.Linear(4 * 16, 32, mode=mode, tau_prox=tau, rngs=rngs)
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(jax.nn.relu(self.conv(x)), (2, 2), (2, 2))
    return self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer,mode,tau", [
    (optax.sgd(1.0, momentum=0.95, nesterov=True), "prox_cg3", 0.05),
    (optax.sgd(1.0, momentum=0.95, nesterov=True), "prox_exact", 0.05),
    (optax.adam(1e-3), "prox_cg3", 1.0),
])
def test_training_step_lowers_the_loss(optimizer, mode, tau):
  x = jax.random.uniform(jax.random.key(0), (32, 8, 8, 1))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
  model = _Net(mode, tau, nnx.Rngs(0))
  opt = nnx.Optimizer(model, optimizer, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, x, y)) for _ in range(5)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_jit_grad_vmap_and_remat_compose():
  model = _Net("prox_exact", 0.5, nnx.Rngs(0))
  xs = jax.random.uniform(jax.random.key(0), (3, 6, 8, 8, 1))
  ys = jax.random.randint(jax.random.key(1), (3, 6), 0, 10)
  grad = lambda m, x, y: nnx.grad(_loss)(m, x, y)
  eager = [grad(model, xs[i], ys[i]) for i in range(3)]
  # vmap over independent batches (in_axes None for the model), under jit.
  batched = nnx.jit(nnx.vmap(grad, in_axes=(None, 0, 0)))(model, xs, ys)
  # remat of the whole forward pass.
  remat_loss = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
      nnx.remat(lambda m, x: m(x))(m, x), y).mean()
  rematted = nnx.jit(nnx.grad(remat_loss))(model, xs[0], ys[0])
  for i in range(3):
    for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(eager[i])):
      np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=1e-6)
  for got, want in zip(jax.tree.leaves(rematted), jax.tree.leaves(eager[0])):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_bad_configuration_raises_at_construction():
  with pytest.raises(ValueError, match="valid modes are"):
    pp.Linear(3, 4, mode="exact", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tau_prox must be"):
    pp.Conv(3, 4, (3, 3), tau_prox=-1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="input_dilation=1.*pp.prox_module"):
    pp.Conv(4, 4, (3, 3), input_dilation=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="valid modes are"):
    pp.prox_module(nnx.Einsum)("ab,bc->ac", (3, 4), mode="prox_cg", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------ prox_module


def _jacobian_reference(module, x, target, mode, lam):
  """``D`` from the materialised Jacobian of the plain module (float64)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  apply = lambda theta: nnx.merge(graphdef, unravel(theta), rest)(x).ravel()
  jac = np.asarray(jax.jacfwd(apply)(flat))
  g = np.asarray(apply(flat)) - np.asarray(target).ravel()
  b = jac.T @ g
  m = jac.T @ jac + lam * np.eye(len(flat))
  d = np.linalg.solve(m, b) if mode == "prox_exact" else reference.cg(
      m, b, int(mode.removeprefix("prox_cg")))
  return unravel(jnp.asarray(d))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["gradient", "prox_exact", "prox_cg2"])
@pytest.mark.parametrize("cls,args,x_shape", [
    (nnx.ConvTranspose, (2, 3, (3, 3)), (2, 4, 4, 2)),
    (nnx.Einsum, ("bi,io->bo", (4, 3)), (5, 4)),
], ids=["ConvTranspose", "Einsum"])
def test_prox_module_matches_the_jacobian_reference(mode, cls, args, x_shape):
  plain = cls(*args, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  prox = pp.prox_module(cls)(*args, param_dtype=jnp.float64, mode=mode, tau_prox=0.5,
                             rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=x_shape))
  rng = np.random.default_rng(1)
  target = jnp.asarray(rng.normal(size=plain(x).shape))
  np.testing.assert_allclose(prox(x), plain(x), rtol=1e-12)
  assert pp.check_linear(prox, x) < 1e-10
  grads = nnx.grad(lambda m: 0.5 * jnp.sum((m(x) - target) ** 2))(prox)
  want = (nnx.grad(lambda m: 0.5 * jnp.sum((m(x) - target) ** 2))(plain) if mode == "gradient"
          else _jacobian_reference(plain, x, target, mode, 2.0))
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-12)


def test_check_linear_rejects_a_nonlinear_module():

  class Squashed(nnx.Module):
    def __init__(self, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (3, 2)))

    def __call__(self, x):
      return x @ jnp.tanh(self.kernel[...])

  with pytest.raises(ValueError, match="Squashed is not linear in its parameters"):
    pp.check_linear(Squashed(nnx.Rngs(0)), jnp.ones((4, 3)))
  layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  assert pp.check_linear(layer, jnp.ones((4, 3))) < 1e-5
