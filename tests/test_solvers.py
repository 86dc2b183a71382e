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


def test_only_a_block_that_breaks_down_is_factored_with_the_shift():
  rng = np.random.default_rng(3)
  low = (rng.normal(size=(40, 2)) * 100).astype(np.float32)
  good = _psd(rng, 40, 40).astype(np.float32)
  m, lam = jnp.asarray(np.stack([low @ low.T, good])), 1e-6
  chol = solvers.shifted_cholesky(m, lam)
  plain = jnp.linalg.cholesky(m + lam * jnp.eye(40, dtype=m.dtype))
  assert not np.all(np.isfinite(plain[0])) and np.all(np.isfinite(chol[0]))
  np.testing.assert_array_equal(chol[1], plain[1])  # no breakdown: the very same factor
  # The broken block is M + (λ + δ)I with δ = n·eps·trace(M).
  delta = 40 * np.finfo(np.float32).eps * np.trace(low @ low.T, dtype=np.float64)
  want = np.linalg.cholesky(np.float64(low) @ np.float64(low).T + (lam + delta) * np.eye(40))
  np.testing.assert_allclose(chol[0], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
  assert bool(solvers.cholesky_failed(m, lam)) and not bool(solvers.cholesky_failed(m[1:], lam))


@pytest.mark.parametrize("n", [1, 2])
def test_small_systems_are_solved_in_closed_form(n):
  rng = np.random.default_rng(4)
  # Blocks of 1x1 / 2x2 Grams: random, rank one, and zero (a constant or absent input).
  m = np.stack([_psd(rng, n, n), _psd(rng, n, 1), np.zeros((n, n))])
  rhs, lam = rng.normal(size=(3, n, 4)), 0.3
  got = jax.jit(solvers.small_spd_solve)(m, rhs, lam)
  want = np.linalg.solve(m + lam * np.eye(n), rhs)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError, match="1x1 and 2x2"):
    solvers.small_spd_solve(jnp.eye(3), jnp.ones((3, 1)), lam)


def test_closed_form_is_finite_near_breakdown_and_shifts_where_it_breaks_down():
  rng = np.random.default_rng(5)
  # Rank-one float32 2x2 Grams and tiny λ: finite, and a descent direction (rᵀ D r > 0).
  v = rng.normal(size=(50, 2, 1)).astype(np.float32)
  m, r = jnp.asarray(v @ v.transpose(0, 2, 1)), jnp.asarray(v)
  for lam in (1e-7, 1e-3):
    got = np.asarray(solvers.small_spd_solve(m, r, jnp.float32(lam)))
    assert np.all(np.isfinite(got)) and np.all(np.sum(got * np.asarray(r), axis=(1, 2)) > 0)
  # A Gram indefinite by rounding breaks down: factored as M + (λ + δ)I, δ = 2·eps·trace.
  low = 1.0 - 2.0**-23
  bad = jnp.asarray([[[1.0, 1.0], [1.0, low]]], jnp.float32)
  rhs, lam = jnp.asarray([[[1.0], [2.0]]], jnp.float32), 1e-8
  delta = 2 * np.finfo(np.float32).eps * (1 + low)
  want = np.linalg.solve(np.float64(bad[0]) + (lam + delta) * np.eye(2), np.float64(rhs[0]))
  # The shifted system's condition number is ~1/(2·eps): float32 resolves it to a few %
  # (without the shift the matrix is indefinite and the answer has no meaning at all).
  np.testing.assert_allclose(solvers.small_spd_solve(bad, rhs, jnp.float32(lam))[0], want,
                             rtol=5e-2)


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


def test_row_gram_cg_is_textbook_cg_in_parameter_space():
  rng = np.random.default_rng(5)
  a, g = rng.normal(size=(7, 12)), rng.normal(size=(7, 4))
  m = a.T @ a + 0.3 * np.eye(12)
  for steps in (1, 2, 5, 9):
    y = solvers.row_gram_cg(jnp.asarray(a @ a.T), jnp.asarray(g), 0.3, steps)
    want = np.stack([reference.cg(m, (a.T @ g)[:, c], steps) for c in range(4)], axis=1)
    np.testing.assert_allclose(a.T @ np.asarray(y), want, rtol=1e-9, atol=1e-12)


def test_gram_cg_is_textbook_cg():
  rng = np.random.default_rng(6)
  a, rhs = rng.normal(size=(20, 8)), rng.normal(size=(8, 3))
  rhs[:, 1] = 0
  m = a.T @ a
  for steps in (1, 4, 8):
    got = solvers.gram_cg(jnp.asarray(m), jnp.asarray(rhs), 0.7, steps)
    want = np.stack([reference.cg(m + 0.7 * np.eye(8), rhs[:, c], steps) for c in range(3)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(np.asarray(got)[:, 1] == 0)


def test_spd_inverse_matches_numpy_and_falls_back():
  rng = np.random.default_rng(7)
  m = _psd(rng, 10, 10)
  np.testing.assert_allclose(jax.jit(solvers.spd_inverse)(m, 0.2),
                             np.linalg.inv(m + 0.2 * np.eye(10)), rtol=1e-9)
  # float32, rank 2, λ far below rounding: Cholesky breaks down, the fallback is finite.
  low = rng.normal(size=(30, 2)).astype(np.float32) * 100
  inv = jax.jit(solvers.spd_inverse)(jnp.asarray(low @ low.T), 1e-6)
  assert np.all(np.isfinite(inv))


def test_solvers_treat_leading_dims_as_independent_blocks():
  rng = np.random.default_rng(8)
  m = np.stack([_psd(rng, 6, 6), _psd(rng, 6, 3)])
  rhs = rng.normal(size=(2, 6, 3))
  for solve in (lambda m, b: solvers.spd_solve(m, b, 0.4),
                lambda m, b: solvers.spd_inverse(m, 0.4) @ b,
                lambda m, b: solvers.gram_cg(m, b, 0.4, 3),
                lambda m, b: solvers.row_gram_cg(m, b, 0.4, 3)):
    got = solve(jnp.asarray(m), jnp.asarray(rhs))
    for b in range(2):
      np.testing.assert_allclose(got[b], solve(jnp.asarray(m[b]), jnp.asarray(rhs[b])),
                                 rtol=1e-12)


def test_eig_cg_from_the_residual_is_textbook_cg():
  # eig_cg does not carry the iterate: w = (c − r) / (s + λ). Batch-space weights.
  rng = np.random.default_rng(9)
  evals = np.abs(rng.normal(size=9)) * 3
  coeffs = rng.normal(size=(9, 11))
  coeffs[:, 3] = 0
  got = solvers.eig_cg(jnp.asarray(evals), jnp.asarray(coeffs), 0.4, 5, weights=evals)
  # Weights ⟨u, v⟩ = uᵀ diag(s) v: plain CG for u = √s ⊙ w (the matrices are diagonal).
  root = np.sqrt(evals)
  want = np.stack([reference.cg(np.diag(evals + 0.4), root * coeffs[:, c], 5) / root
                   for c in range(11)], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  assert np.all(np.asarray(got)[:, 3] == 0)


@pytest.mark.parametrize("lead", [(), (1,), (3,)])
def test_column_dot_sums_each_column_and_one_block_as_a_2d_array(lead):
  rng = np.random.default_rng(10)
  u, v = rng.normal(size=lead + (9, 11)), rng.normal(size=lead + (9, 11))
  got = solvers._column_dot(jnp.asarray(u), jnp.asarray(v))
  np.testing.assert_allclose(got, (u * v).sum(-2, keepdims=True), rtol=1e-13)
  # One block (a dense layer's system) is summed as an (n, k) array: XLA CPU runs the sum
  # of a (1, n, k) array inside the CG loops ~25x slower.
  jaxpr = jax.make_jaxpr(solvers._column_dot)(jnp.asarray(u), jnp.asarray(v))
  summed = [eqn.invars[0].aval.ndim for eqn in jaxpr.eqns if eqn.primitive.name == "reduce_sum"]
  assert summed == [3 if lead == (3,) else 2]
