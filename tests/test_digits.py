"""The paper's step-size claim on real data (scikit-learn's 8×8 digits, shipped offline).

With the paper's MLP settings, ProxProp (Nesterov, lr 1, momentum 0.95, τ 0.05)
reaches a lower full-batch training loss than BackProp (lr 0.05) after the same
epochs, while plain gradient steps at lr 1 fail to train.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import proxprop_jax as pp

WIDTHS = (64, 400, 100, 400, 10)  # the paper's 4-layer MLP shape, scaled to 8×8 inputs
EPOCHS, BATCH = 10, 500


def _torch_init(fan_in):
  bound = 1 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class MLP(nnx.Module):

  def __init__(self, mode, rngs):
    self.layers = nnx.List()
    for i, (fan_in, fan_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
      init = dict(kernel_init=_torch_init(fan_in), bias_init=_torch_init(fan_in), rngs=rngs)
      hidden = i < len(WIDTHS) - 2
      self.layers.append(pp.Linear(fan_in, fan_out, mode=mode, tau_prox=0.05, **init)
                         if hidden and mode != "backprop" else nnx.Linear(fan_in, fan_out, **init))

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _train(mode, lr):
  images, labels = load_digits(return_X_y=True)
  images, labels = (images / 16.0).astype(np.float32), labels.astype(np.int32)
  model = MLP(mode, nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.sgd(lr, momentum=0.95, nesterov=True), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    grads = nnx.grad(_loss)(model, x, y)
    opt.update(model, grads)

  order = np.random.default_rng(0)
  for _ in range(EPOCHS):
    perm = order.permutation(len(images))
    for start in range(0, len(images) - BATCH + 1, BATCH):
      batch = perm[start:start + BATCH]
      step(model, opt, images[batch], labels[batch])
  return float(nnx.jit(_loss)(model, images, labels))


@pytest.fixture(scope="module")
def backprop_loss():
  return _train("backprop", 0.05)


@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg3"])
def test_proxprop_at_lr_1_beats_backprop(mode, backprop_loss):
  loss = _train(mode, 1.0)
  assert np.isfinite(backprop_loss) and backprop_loss < np.log(10)  # BackProp does learn
  assert loss < 0.75 * backprop_loss, (loss, backprop_loss)


def test_gradient_steps_at_lr_1_fail_to_train():
  loss = _train("gradient", 1.0)
  assert not loss < np.log(10), loss  # diverged: NaN or above the initial ~ln 10
