"""The small-system solvers against NumPy float64 and ``jax.scipy``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxprop_jax import solvers
from tests import reference

pytestmark = pytest.mark.usefixtures("x64")


def _psd(rng, n, rank):
  a = rng.normal(size=(n, rank))
  return a @ a.T


def test_spd_solve_matches_numpy():
  rng = np.random.default_rng(0)
  m, b = _psd(rng, 12, 12), rng.normal(size=(12, 3))
  got = jax.jit(solvers.spd_solve)(m, b, 0.3)
  np.testing.assert_allclose(got, np.linalg.solve(m + 0.3 * np.eye(12), b), rtol=1e-10)


def test_spd_solve_falls_back_when_cholesky_breaks_down():
  # A rank-2 float32 matrix with λ far below its rounding error: Cholesky fails.
  rng = np.random.default_rng(1)
  a = rng.normal(size=(40, 2)).astype(np.float32) * 100
  m = jnp.asarray(a @ a.T)
  rhs = jnp.asarray(a @ rng.normal(size=(2, 3)).astype(np.float32))  # in range(m)
  assert not np.all(np.isfinite(jnp.linalg.cholesky(m + 1e-6 * jnp.eye(40, dtype=m.dtype))))
  got = jax.jit(solvers.spd_solve)(m, rhs, 1e-6)
  assert np.all(np.isfinite(got))
  # In range(m), (m + λI)⁻¹ rhs → m⁺ rhs as λ → 0.
  a64 = np.float64(a)
  want = np.linalg.pinv(a64 @ a64.T) @ np.float64(rhs)
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_eig_cg_is_textbook_cg_in_parameter_space(steps):
  # A rank-deficient Gram AᵀA (rows < p) and b = Aᵀg, as in a layer.
  rng = np.random.default_rng(2)
  a, g, lam = rng.normal(size=(6, 9)), rng.normal(size=(6, 4)), 0.7
  g[:, 2] = 0  # a dead column stays put
  m, b = a.T @ a, a.T @ g
  evals, evecs, keep = solvers.eigh_psd(jnp.asarray(m))
  w = solvers.eig_cg(evals, (evecs.T @ b) * keep[:, None], lam, steps)
  got = evecs @ w
  want = np.stack([reference.cg(m + lam * np.eye(9), b[:, c], steps) for c in range(4)], 1)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  assert np.all(np.asarray(got)[:, 2] == 0)


@pytest.mark.parametrize("steps", [1, 3])
def test_eig_cg_is_textbook_cg_in_batch_space(steps):
  # rows < p: CG on (AᵀA + λI) D = Aᵀg through the eigenbasis of AAᵀ.
  rng = np.random.default_rng(3)
  a, g, lam = rng.normal(size=(5, 11)), rng.normal(size=(5, 2)), 0.4
  evals, evecs, keep = solvers.eigh_psd(jnp.asarray(a @ a.T))
  w = solvers.eig_cg(evals, (evecs.T @ g) * keep[:, None], lam, steps, weights=evals)
  got = a.T @ (evecs @ w)
  want = reference.direction(a, g, f"prox_cg{steps}", lam)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_matrix_free_cg_matches_jax_scipy_cg_on_pytrees():
  rng = np.random.default_rng(4)
  m1, m2 = _psd(rng, 6, 6) + np.eye(6), _psd(rng, 4, 4) + np.eye(4)
  matvec = lambda v: {"a": m1 @ v["a"], "b": m2 @ v["b"]}
  rhs = {"a": jnp.asarray(rng.normal(size=6)), "b": jnp.asarray(rng.normal(size=4))}
  for steps in (1, 3, 7):
    got = jax.jit(solvers.cg, static_argnums=(0, 2))(matvec, rhs, steps)
    want, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, tol=0.0, atol=0.0, maxiter=steps)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-9), got, want)


def test_matrix_free_cg_stays_put_at_zero_residual():
  got = solvers.cg(lambda v: 2.0 * v, jnp.zeros(3), 4)
  assert np.all(np.asarray(got) == 0)
