"""experiments/optimizers.py: each optimizer's first two updates against its textbook formula."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import optimizers

PARAMS = np.array([1.0, -2.0, 0.5])
GRADS = [np.array([0.3, -0.1, 2.0]), np.array([-0.2, 0.4, 1.0])]


def two_steps(tx):
  params, state, out = jnp.asarray(PARAMS), None, []
  state = tx.init(params)
  for g in GRADS:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = params + updates
    out.append(np.asarray(params, np.float64))
  return out


def adam_reference(lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
  p, m, v, out = PARAMS.copy(), 0.0, 0.0, []
  for t, g in enumerate(GRADS, start=1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    p = p - lr * (step + weight_decay * p)  # AdamW: decay decoupled from the moments
    out.append(p.copy())
  return out


def nesterov_reference(lr, momentum):
  # PyTorch's SGD(nesterov=True): buf = mu buf + g; p -= lr (g + mu buf).
  p, buf, out = PARAMS.copy(), 0.0, []
  for g in GRADS:
    buf = momentum * buf + g
    p = p - lr * (g + momentum * buf)
    out.append(p.copy())
  return out


@pytest.mark.parametrize("name, kwargs, reference", [
    ("adam", {}, adam_reference(0.1)),
    ("adamw", {"weight_decay": 0.5}, adam_reference(0.1, weight_decay=0.5)),
    ("nesterov", {"momentum": 0.9}, nesterov_reference(0.1, 0.9)),
])
def test_updates_match_the_textbook_formulas(name, kwargs, reference):
  for got, want in zip(two_steps(optimizers.make(name, 0.1, **kwargs)), reference, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_defaults_momentum_095_and_weight_decay_1e_4():
  for got, want in zip(two_steps(optimizers.make("nesterov", 0.1)), nesterov_reference(0.1, 0.95)):
    np.testing.assert_allclose(got, want, rtol=1e-5)
  for got, want in zip(two_steps(optimizers.make("adamw", 0.1)),
                       adam_reference(0.1, weight_decay=1e-4)):
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_same_settings_give_the_same_object_and_bad_names_list_the_valid_ones():
  # Equal optimizers keep an nnx.Optimizer's graph equal, so compiled steps are shared.
  assert optimizers.make("adam", 1e-3) is optimizers.make("adam", 1e-3)
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'; valid: adam, adamw, nesterov"):
    optimizers.make("sgd", 0.1)
