"""pp.diagnostics: residuals, cosines and norms against float64 NumPy, plans, Cholesky
breakdown, compilation and an unchanged model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import proxprop_jax as pp
from proxprop_jax import diagnosis
from tests import reference
from tests.helpers import product_eps

pytestmark = pytest.mark.gpu  # the GPU smoke set holds every diagnostics test


def _convnet(mode, tau=0.5):
  model = nnx.Sequential(
      nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), jax.nn.relu,
      lambda x: x.reshape(x.shape[0], -1),
      nnx.Linear(4 * 36, 32, rngs=nnx.Rngs(1)), jax.nn.relu, nnx.Linear(32, 10, rngs=nnx.Rngs(2)))
  pp.convert(model, mode=mode, tau_prox=tau, exclude=("layers/5",))
  return model


def _cross_entropy(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


X = jax.random.normal(jax.random.key(0), (16, 6, 6, 1))
Y = jnp.arange(16) % 10


def test_prox_exact_solves_its_system_in_float32():
  diag = pp.diagnostics(_convnet("prox_exact"), _cross_entropy, X, Y)
  assert set(diag) == {"layers/0", "layers/3"}  # the ProxProp layers, not the plain head
  for layer in diag.values():
    assert layer["relative_residual"] <= 1e-5
    assert 0 < layer["cosine_to_gradient"] <= 1 + 1e-6
    assert layer["direction_norm"] > 0 and layer["gradient_norm"] > 0
    assert layer["fallback"] is False
  # Conv: 16·36 rows > 10 parameters per column; Linear: 16 rows < 145.
  assert (diag["layers/0"]["system"], diag["layers/3"]["system"]) == ("parameter", "batch")


def test_cg_residual_falls_with_the_steps_and_gradient_mode_is_the_gradient():
  residuals = {mode: pp.diagnostics(_convnet(mode), _cross_entropy, X, Y)
               for mode in ("gradient", "prox_cg1", "prox_cg3", "prox_cg10")}
  # gradient mode is the plain layer: its direction is jax.grad's, with the products at the
  # layer's own precision (TF32 on a GPU), while the diagnostics' ∇ runs at HIGHEST.
  tol = 16 * product_eps(None)
  for path in ("layers/0", "layers/3"):
    r = [residuals[m][path]["relative_residual"] for m in ("prox_cg1", "prox_cg3", "prox_cg10")]
    assert r[0] > r[1] > r[2], r
    grad = residuals["gradient"][path]
    assert grad["system"] == "gradient"
    assert grad["cosine_to_gradient"] == pytest.approx(1.0, abs=tol)
    assert grad["direction_norm"] == pytest.approx(grad["gradient_norm"], rel=tol)
    for mode in ("prox_cg1", "prox_cg3", "prox_cg10"):  # the same ∇ = Aᵀg in every mode
      assert residuals[mode][path]["gradient_norm"] == pytest.approx(grad["gradient_norm"],
                                                                     rel=1e-5)


@pytest.mark.parametrize("mode", ["gradient", "prox_cg2"])
def test_numbers_match_float64_numpy(mode):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(9, 5)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(9, 3)), jnp.float32)
  # The layer's own products at HIGHEST: gradient mode's direction is jax.grad of the plain
  # layer, TF32 at the default precision on a GPU (the float64 reference is not).
  model = nnx.Sequential(nnx.Linear(5, 3, precision=jax.lax.Precision.HIGHEST,
                                    rngs=nnx.Rngs(0)))
  pp.convert(model, mode=mode, tau_prox=0.25)
  diag = pp.diagnostics(model, lambda m, x: jnp.sum(c * m(x)), x)["layers/0"]
  a = reference.with_ones(np.asarray(x, np.float64), True)
  g, lam = np.asarray(c, np.float64), 4.0
  grad, d = a.T @ g, reference.direction(a, np.asarray(c), mode, lam)
  residual = np.linalg.norm(a.T @ a @ d + lam * d - grad) / np.linalg.norm(grad)
  cosine = np.sum(d * grad) / np.linalg.norm(d) / np.linalg.norm(grad)
  assert diag["relative_residual"] == pytest.approx(residual, rel=1e-4)
  assert diag["cosine_to_gradient"] == pytest.approx(cosine, rel=1e-5)
  assert diag["direction_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-5)
  assert diag["gradient_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-5)


def test_fallback_reports_a_cholesky_breakdown():
  # Rank-one inputs and τ = 1e7: AAᵀ + λI is singular below float32 rounding (NumPy's
  # float32 Cholesky fails too), so the exact solve takes the eigendecomposition fallback.
  x = jnp.ones((6, 1)) * jnp.arange(1.0, 7.0)[:, None] * jnp.ones((1, 8))
  c = jax.random.normal(jax.random.key(0), (6, 3))
  a = np.asarray(x, np.float32)
  with pytest.raises(np.linalg.LinAlgError):
    np.linalg.cholesky(a @ a.T + 1 + np.float32(1e-7) * np.eye(6, dtype=np.float32))
  model = nnx.Sequential(nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
  loss_fn = lambda m, x: jnp.sum(c * m(x))
  pp.convert(model, mode="prox_exact", tau_prox=1e7)
  diag = pp.diagnostics(model, loss_fn, x)["layers/0"]
  assert (diag["system"], diag["fallback"]) == ("batch", True)
  pp.set_tau(model, 1.0)
  assert pp.diagnostics(model, loss_fn, x)["layers/0"]["fallback"] is False


def test_compiled_once_and_the_model_is_unchanged():
  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
                         nnx.Dropout(0.5, rngs=nnx.Rngs(1)), nnx.Linear(4, 2, rngs=nnx.Rngs(2)))
  pp.convert(model, mode="prox_cg3", tau_prox=1.0)
  traces = []

  def loss_fn(m, x):
    traces.append(1)
    return jnp.sum(m(x) ** 2)

  as_numpy = lambda a: np.asarray(
      jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
  state = jax.tree.map(as_numpy, nnx.state(model))
  x = jax.random.normal(jax.random.key(0), (8, 4))
  first, second = pp.diagnostics(model, loss_fn, x), pp.diagnostics(model, loss_fn, x)
  assert first == second  # same batch, same dropout mask: the RNG state did not advance
  count = len(traces)
  pp.diagnostics(model, loss_fn, x + 1)
  assert len(traces) == count  # a new batch of the same shape reuses the compiled function
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(a, as_numpy(b))


def test_diagnostic_arrays_run_inside_your_own_jit():
  model = _convnet("prox_exact")
  arrays = nnx.jit(diagnosis.diagnostic_arrays, static_argnums=1)(model, _cross_entropy, X, Y)
  plain = pp.diagnostics(model, _cross_entropy, X, Y)
  for path, numbers in arrays.items():
    assert diagnosis.SYSTEMS[int(numbers["system"])] == plain[path]["system"]
    assert float(numbers["relative_residual"]) == pytest.approx(
        plain[path]["relative_residual"], rel=1e-3, abs=1e-7)
