"""Solvers for the damped normal equations ``(M + λI) X = B`` of ProxProp.

``M`` is a small symmetric positive semi-definite matrix: either the Gram matrix
``AᵀA`` (parameter space) or the kernel matrix ``AAᵀ`` (batch space). Three
solvers:

* `spd_solve`: Cholesky, with an eigendecomposition fallback when Cholesky breaks
  down (``λ`` tiny against a nearly singular ``M``, e.g. ``τ = 1e6``);
* `spd_inverse`: the same factorisation, as an explicit inverse (for many right-hand
  sides, where triangular solves are slow);
* `gram_cg`: textbook CG with the formed ``M`` (one small product per step);
* `kernel_cg`: textbook CG on ``(AᵀA + λI) D = Aᵀg`` in batch space, given ``AAᵀ``;
* `eig_cg`: textbook CG iterates computed in the eigenbasis of ``M``, where every
  iterate is a diagonal recurrence (exact CG at the cost of one ``eigh``);
* `cg`: a matrix-free textbook CG over pytrees (``lax.fori_loop``, so it also runs
  under ``shard_map``), the generic path.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def solve_dtype(*dtypes) -> jnp.dtype:
  """The dtype ProxProp solves in: the widest input float dtype, but at least float32."""
  widest = max((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)
  return widest if widest.itemsize >= 4 else jnp.dtype(jnp.float32)


def _safe_divide(num, den):
  """``num / den`` where ``den != 0``, else 0: a converged CG column stays put."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def eigh_psd(matrix):
  """Eigendecomposition of a PSD matrix with a numerical-null-space mask.

  Returns:
    ``(evals, evecs, keep)``: eigenvalues clipped at 0, eigenvectors as columns,
    and a 0/1 mask that drops eigenvalues below ``n · eps · max(evals)``. Those
    directions are (numerically) in the null space of ``A`` (for ``AᵀA``) or of
    ``Aᵀ`` (for ``AAᵀ``), where the right-hand side ``Aᵀg`` resp. the map ``Aᵀ``
    vanishes in exact arithmetic; dropping them is exact and keeps rounding noise
    from being amplified by ``1/λ`` when ``τ`` is large.
  """
  evals, evecs = jnp.linalg.eigh(matrix)
  evals = jnp.maximum(evals, 0)
  tol = matrix.shape[0] * jnp.finfo(matrix.dtype).eps * jnp.max(evals)
  keep = (evals > tol).astype(matrix.dtype)
  return evals, evecs, keep


def _cholesky_or_eig(matrix, lam, with_factor, with_eigh):
  """Applies ``(M + λI)⁻¹`` through its Cholesky factor, or its eigendecomposition.

  Runs ``with_factor(L)`` for the Cholesky factor ``L`` of ``M + λI``; where the
  factorisation breaks down in finite precision (it returns NaN when ``λ`` is below
  the rounding error of a singular ``M``), runs ``with_eigh(scale, evecs)`` instead,
  with ``scale = keep / (evals + λ)`` from `eigh_psd`, which drops the numerical
  null space.
  """
  chol = jnp.linalg.cholesky(matrix + lam * jnp.eye(matrix.shape[0], dtype=matrix.dtype))

  def eig_branch():
    evals, evecs, keep = eigh_psd(matrix)
    return with_eigh(keep / (evals + lam), evecs)

  return lax.cond(jnp.all(jnp.isfinite(chol)), lambda: with_factor(chol), eig_branch)


def spd_solve(matrix, rhs, lam):
  """``(M + λI)⁻¹ B`` for PSD ``M`` (n, n) and ``B`` (n, k): a Cholesky solve, with
  the eigendecomposition fallback of `_cholesky_or_eig`."""
  return _cholesky_or_eig(
      matrix, lam, lambda chol: jax.scipy.linalg.cho_solve((chol, True), rhs),
      lambda scale, evecs: evecs @ ((evecs.T @ rhs) * scale[:, None]))


def spd_inverse(matrix, lam):
  """``(M + λI)⁻¹`` for PSD ``M`` (n, n), with `spd_solve`'s eigendecomposition fallback.

  ``L⁻ᵀ L⁻¹`` from the Cholesky factor ``L``: one triangular solve with ``n``
  right-hand sides and one matrix product. Applying it to ``k ≳ 1.5 n`` columns is
  faster than `spd_solve`'s two triangular solves with ``k`` right-hand sides
  (triangular solves run well below matrix-product speed on CPUs and GPUs).
  """
  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)

  def with_factor(chol):
    inv_l = lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)
    return inv_l.T @ inv_l

  return _cholesky_or_eig(matrix, lam, with_factor,
                          lambda scale, evecs: (evecs * scale) @ evecs.T)


def gram_cg(matrix, rhs, lam, steps: int):
  """``steps`` textbook CG iterations per column on ``(M + λI) X = B`` from ``X = 0``.

  ``M`` (n, n) is formed (e.g. the Gram ``AᵀA`` of a convolution), so each iteration
  is one ``(n, n) @ (n, k)`` product: for ``N`` steps ``2·N·n²·k`` FLOPs, much less
  than an eigendecomposition when ``N·k ≪ n``. One independent CG per column of
  ``B``; a column whose residual is exactly zero stays put (no 0/0).
  """

  def matvec(p):
    return matrix @ p + lam * p

  def step(_, carry):
    x, r, p, rr = carry
    ap = matvec(p)
    alpha = _safe_divide(rr, jnp.sum(p * ap, axis=0))
    x, r = x + alpha * p, r - alpha * ap
    rr_new = jnp.sum(r * r, axis=0)
    p = r + _safe_divide(rr_new, rr) * p
    return x, r, p, rr_new

  rr = jnp.sum(rhs * rhs, axis=0)
  x, _, p, rr = lax.fori_loop(0, steps - 1, step, (jnp.zeros_like(rhs), rhs, rhs, rr))
  return x + _safe_divide(rr, jnp.sum(p * matvec(p), axis=0)) * p  # the last step: no new residual


def kernel_cg(kernel, g, lam, steps: int):
  """Batch-space textbook CG: ``Y`` with ``D = Aᵀ Y`` the ``N``-step CG iterate.

  Runs CG on ``(AᵀA + λI) D = Aᵀ g`` (one CG per column, from ``D = 0``) given only
  the kernel matrix ``K = A Aᵀ`` (rows, rows): every iterate, residual and search
  direction lies in the range of ``Aᵀ`` (``D = AᵀY``, ``r = Aᵀρ``, ``p = Aᵀπ``), with

  * ``⟨r, r⟩ = ρᵀKρ`` and ``⟨p, (AᵀA + λI) p⟩ = ‖Kπ‖² + λ πᵀKπ``;
  * ``(AᵀA + λI) Aᵀπ = Aᵀ (K + λI) π``, so ``ρ ← ρ − α (Kπ + λπ)``;
  * ``Kπ ← Kρ + β Kπ``, so each iteration needs one product ``Kρ``.

  ``N`` steps cost ``N`` products ``(rows, rows) @ (rows, k)`` and no
  factorisation; exact textbook CG in exact arithmetic. A column whose residual is
  exactly zero stays put.
  """
  k_g = kernel @ g

  def step(_, carry):
    y, rho, pi, k_pi, rr = carry
    alpha = _safe_divide(rr, jnp.sum(k_pi * k_pi, axis=0) + lam * jnp.sum(pi * k_pi, axis=0))
    y = y + alpha * pi
    rho = rho - alpha * (k_pi + lam * pi)
    k_rho = kernel @ rho
    rr_new = jnp.sum(rho * k_rho, axis=0)
    beta = _safe_divide(rr_new, rr)
    return y, rho, rho + beta * pi, k_rho + beta * k_pi, rr_new

  rr = jnp.sum(g * k_g, axis=0)
  init = (jnp.zeros_like(g), g, g, k_g, rr)
  y, _, pi, k_pi, rr = lax.fori_loop(0, steps - 1, step, init)
  alpha = _safe_divide(rr, jnp.sum(k_pi * k_pi, axis=0) + lam * jnp.sum(pi * k_pi, axis=0))
  return y + alpha * pi


#: `eig_cg` runs its recurrence on blocks of this many columns on CPUs.
EIG_CG_CHUNK = 64


def eig_cg(evals, coeffs, lam, steps: int, weights=None):
  """``steps`` textbook CG iterations per column, in an eigenbasis.

  Solves ``diag(s + λ) w = c`` column by column from ``w = 0`` with inner products
  ``⟨u, v⟩ = Σᵢ mᵢ uᵢ vᵢ`` (``m = weights``, default 1). This reproduces CG on
  ``(AᵀA + λI) D = Aᵀ g`` exactly:

  * parameter space, ``AᵀA = V diag(s) Vᵀ``: ``c = Vᵀ Aᵀ g``, ``m = 1``, ``D = V w``;
  * batch space, ``AAᵀ = U diag(s) Uᵀ``: ``c = Uᵀ g``, ``m = s``, ``D = Aᵀ U w``,
    because ``⟨AᵀU u, AᵀU v⟩ = uᵀ diag(s) v`` and ``(AᵀA + λI) AᵀU = AᵀU diag(s + λ)``.

  A column whose residual is exactly zero stays put (no 0/0).

  Args:
    evals: ``s``, shape (n,).
    coeffs: ``c``, shape (n, k): one right-hand side per column.
    lam: ``λ > 0``.
    steps: the number of CG iterations ``N ≥ 1``.
    weights: ``m``, shape (n,), or None for 1.

  Returns:
    ``w``, shape (n, k).
  """
  diag = (evals + lam)[:, None]
  m = jnp.ones_like(evals)[:, None] if weights is None else weights[:, None]

  def step(_, carry):
    r, p, rr = carry
    ap = diag * p
    alpha = _safe_divide(rr, jnp.sum(m * p * ap, axis=0))
    r = r - alpha * ap
    rr_new = jnp.sum(m * r * r, axis=0)
    p = r + _safe_divide(rr_new, rr) * p
    return r, p, rr_new

  def run(c):
    # The iterate is not carried: the system is diagonal, so w = (c − r) / (s + λ)
    # (the residual's definition), which saves two of the five array passes per step.
    r = lax.fori_loop(0, steps, step, (c, c, jnp.sum(m * c * c, axis=0)))[0]
    return (c - r) / diag

  n, k = coeffs.shape
  if jax.default_backend() != "cpu" or k < 2 * EIG_CG_CHUNK:
    return run(coeffs)
  # On CPUs the recurrence is memory bound: run it on cache-sized blocks of columns
  # (the columns are independent CGs). In the paper's MLP step this is ~5 % faster for
  # prox_cg10 than whole-array passes (benchmarks/RESULTS.md).
  blocks = -(-k // EIG_CG_CHUNK)
  c = jnp.pad(coeffs, ((0, 0), (0, blocks * EIG_CG_CHUNK - k)))  # zero columns stay zero
  c = c.reshape(n, blocks, EIG_CG_CHUNK).transpose(1, 0, 2)
  w = lax.map(run, c).transpose(1, 0, 2).reshape(n, blocks * EIG_CG_CHUNK)
  return w[:, :k]


def tree_vdot(a, b):
  """``Σ`` over leaves of ``⟨a, b⟩``."""
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def cg(matvec: Callable, rhs, steps: int):
  """``steps`` textbook CG iterations on ``matvec(x) = rhs`` from ``x = 0`` (pytrees).

  Uses ``lax.fori_loop`` (not ``jax.scipy.sparse.linalg.cg``'s while loop) so that it
  traces under ``shard_map`` with ``check_vma=True``. Stops moving once the
  residual is exactly zero.
  """
  tmap = jax.tree.map

  def step(_, carry):
    x, r, p, rr = carry
    ap = matvec(p)
    alpha = _safe_divide(rr, tree_vdot(p, ap))
    x = tmap(lambda x, p: x + alpha * p, x, p)
    r = tmap(lambda r, ap: r - alpha * ap, r, ap)
    rr_new = tree_vdot(r, r)
    beta = _safe_divide(rr_new, rr)
    p = tmap(lambda r, p: r + beta * p, r, p)
    return x, r, p, rr_new

  init = (tmap(jnp.zeros_like, rhs), rhs, rhs, tree_vdot(rhs, rhs))
  return lax.fori_loop(0, steps, step, init)[0]
