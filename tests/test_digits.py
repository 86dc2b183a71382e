"""The paper's step-size claim on real data (scikit-learn's 8×8 digits, shipped offline).

With the paper's MLP settings, ProxProp (Nesterov, lr 1, momentum 0.95, τ 0.05)
reaches a lower full-batch training loss than BackProp (lr 0.05) after the same
epochs, while plain gradient steps at lr 1 fail to train.
"""

import numpy as np
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from experiments import models
from experiments import optimizers

HIDDEN = (400, 100, 400)  # the paper's 4-layer MLP shape, scaled to 8×8 inputs
EPOCHS, BATCH = 10, 500


def _loss(model, x, y):
  return models.cross_entropy(model(x), y)


def _train(mode, lr):
  images, labels = load_digits(return_X_y=True)
  images, labels = (images / 16.0).astype(np.float32), labels.astype(np.int32)
  model = models.build("mlp", mode=mode, input_shape=(64,), tau_prox=0.05, seed=0,
                       hidden_sizes=HIDDEN)
  opt = nnx.Optimizer(model, optimizers.make("nesterov", lr, momentum=0.95),
                      wrt=nnx.Param)

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
