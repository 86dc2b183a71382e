"""Solvers for the damped normal equations ``(M + λI) X = B`` of ProxProp.

``M`` is a small symmetric positive semi-definite matrix: the Gram matrix ``AᵀA``
(parameter space) or the row Gram ``AAᵀ`` (batch space). Every solver takes
leading block dimensions: ``M`` of shape ``(..., n, n)`` and ``B`` of shape
``(..., n, k)`` hold independent systems (one per group of a grouped convolution,
per feature of a norm layer's affine parameters, …). ``precision`` is the
``lax.Precision`` or ``lax.DotAlgorithmPreset`` of every matrix product.

* `spd_solve`: Cholesky and two triangular solves; where Cholesky breaks down (``λ``
  tiny against a nearly singular ``M``, e.g. ``τ = 1e6``) the block is factored again
  with a shift at ``M``'s rounding level (`shifted_cholesky`);
* `spd_inverse`: the same factorisation, as an explicit inverse (for many
  right-hand sides, where triangular solves are slow);
* `small_spd_solve`: 1×1 and 2×2 systems (a norm layer's scale and bias per
  feature) in closed form, elementwise;
* `gram_cg`: textbook CG with the formed ``M`` (one small product per step);
* `row_gram_cg`: textbook CG on ``(AᵀA + λI) D = Aᵀg`` in batch space, given ``AAᵀ``;
* `eig_cg`: textbook CG iterates computed in the eigenbasis of ``M``, where every
  iterate is a diagonal recurrence (exact CG at the cost of one ``eigh``);
* `cg`: a matrix-free textbook CG over pytrees (``lax.fori_loop``, so it also runs
  under ``shard_map``), the generic path.

Every CG is one independent CG per column of ``B`` from ``X = 0``; a column whose
residual is exactly zero stays put (no 0/0: a dead unit's zero column).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def solve_dtype(*dtypes) -> jnp.dtype:
  """The dtype ProxProp solves in: the widest input float dtype, but at least float32."""
  widest = max((jnp.dtype(d) for d in dtypes), key=lambda d: d.itemsize)
  return widest if widest.itemsize >= 4 else jnp.dtype(jnp.float32)


def matmul(a, b, precision=None):
  """``a @ b`` (with leading block dims) at the given precision."""
  return jnp.matmul(a, b, precision=precision)


def t_matmul(a, b, precision=None):
  """``aᵀ b`` (with the same leading block dims), contracting axis -2 of both.

  Never forms ``aᵀ``: XLA CPU copies a batched ``swapaxes`` before the product (measured
  87 vs 80 ms for the paper MLP's 3072 × 500 × 4000 ``Aᵀ(…)``).
  """
  return _contract(a, b, a.ndim - 2, b.ndim - 2, precision)


def matmul_t(a, b, precision=None):
  """``a bᵀ`` (with the same leading block dims), contracting the last axis of both."""
  return _contract(a, b, a.ndim - 1, b.ndim - 1, precision)


def _contract(a, b, a_axis: int, b_axis: int, precision):
  dtype = jnp.result_type(a, b)
  batch = tuple(range(a.ndim - 2))
  dims = (((a_axis,), (b_axis,)), (batch, batch))
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision)


def _column_dot(u, v):
  """``⟨u[..., :, j], v[..., :, j]⟩`` for every column ``j``: shape ``(..., 1, k)``."""
  product = u * v
  *lead, n, k = product.shape
  if math.prod(lead) == 1:
    # A layer with one block: inside a loop XLA CPU sums a (1, n, k) array over n ~25×
    # slower than the same (n, k) array (27 vs 0.9 ms per CG step at n, k = 500, 4000).
    return jnp.sum(product.reshape(n, k), axis=0).reshape(*lead, 1, k)
  return jnp.sum(product, axis=-2, keepdims=True)


def _safe_divide(num, den):
  """``num / den`` where ``den != 0``, else 0: a converged CG column stays put."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def _eye_like(matrix):
  return jnp.eye(matrix.shape[-1], dtype=matrix.dtype)


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
  tol = matrix.shape[-1] * jnp.finfo(matrix.dtype).eps * jnp.max(evals, -1, keepdims=True)
  keep = (evals > tol).astype(matrix.dtype)
  return evals, evecs, keep


def cholesky_failed(matrix, lam):
  """Whether the Cholesky factorisation of ``M + λI`` breaks down in any block (then
  `shifted_cholesky` factors that block with the larger shift)."""
  return ~jnp.all(jnp.isfinite(jnp.linalg.cholesky(matrix + lam * _eye_like(matrix))))


def shifted_cholesky(matrix, lam):
  """The Cholesky factor ``L`` of ``M + λI`` for PSD ``M`` (..., n, n), robust to breakdown.

  In finite precision the factorisation breaks down (returns NaN) when ``λ`` is below
  the rounding error of a singular ``M``. Such a block is factored again as
  ``M + (λ + δ)I`` with ``δ = n · eps · trace(M)`` (≥ ``n · eps · ‖M‖``, the shift that
  makes a PSD matrix's factorisation succeed): the proximal step for the largest
  ``τ`` this precision resolves. It damps only the directions at ``M``'s rounding
  level, where the exact solve would amplify rounding noise by ``1/λ``.

  Both factorisations always run and a ``where`` picks the shift: no conditional, which
  on a GPU would make the host wait for the first factorisation (and an
  eigendecomposition fallback would be compiled into every step).
  """
  eye = _eye_like(matrix)
  chol = jnp.linalg.cholesky(matrix + lam * eye)
  failed = ~jnp.all(jnp.isfinite(chol), axis=(-2, -1))
  n, eps = matrix.shape[-1], jnp.finfo(matrix.dtype).eps
  shift = jnp.where(failed, n * eps * jnp.trace(matrix, axis1=-2, axis2=-1), 0)
  return jnp.linalg.cholesky(matrix + (lam + shift)[..., None, None] * eye)


def spd_solve(matrix, rhs, lam):
  """``(M + λI)⁻¹ B`` for PSD ``M`` (..., n, n) and ``B`` (..., n, k): two triangular
  solves with `shifted_cholesky`'s factor."""
  chol = shifted_cholesky(matrix, lam)
  y = lax.linalg.triangular_solve(chol, rhs, left_side=True, lower=True)
  return lax.linalg.triangular_solve(chol, y, left_side=True, lower=True, transpose_a=True)


def spd_inverse(matrix, lam, precision=None):
  """``(M + λI)⁻¹`` for PSD ``M`` (..., n, n), from `shifted_cholesky`'s factor.

  ``L⁻ᵀ L⁻¹`` from the Cholesky factor ``L``: one triangular solve with ``n``
  right-hand sides and one matrix product. Applying it to ``k ≳ 1.5 n`` columns is
  faster than `spd_solve`'s two triangular solves with ``k`` right-hand sides
  (triangular solves run well below matrix-product speed on CPUs and GPUs).
  """
  chol = shifted_cholesky(matrix, lam)
  eye = jnp.broadcast_to(_eye_like(matrix), matrix.shape)
  inv_l = lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)
  return t_matmul(inv_l, inv_l, precision)


def small_spd_solve(matrix, rhs, lam):
  """``(M + λI)⁻¹ B`` for PSD ``M`` (..., n, n) with ``n ≤ 2``, in closed form.

  ``n = 1``: ``B / (m + λ)``. ``n = 2``: the Cholesky factor ``[[l₁₁, 0], [l₂₁, l₂₂]]``
  written out, then the two triangular solves: only elementwise operations (one fused
  kernel on a GPU). A block whose last pivot ``l₂₂²`` is not positive (breakdown) is
  factored with `shifted_cholesky`'s shift ``δ = n · eps · trace(M)``.
  """
  if matrix.shape[-1] == 1:
    return rhs / (matrix + lam)
  if matrix.shape[-1] != 2:
    raise ValueError(f"small_spd_solve solves 1x1 and 2x2 systems; got {matrix.shape}.")
  a, b, c = (matrix[..., i, j][..., None] for i, j in ((0, 0), (0, 1), (1, 1)))

  def factor(shift):
    l11 = jnp.sqrt(a + lam + shift)
    l21 = b / l11
    return l11, l21, c + lam + shift - l21 * l21

  pivot = factor(0)[2]
  shift = jnp.where(pivot > 0, 0, 2 * jnp.finfo(matrix.dtype).eps * (a + c))
  l11, l21, pivot = factor(shift)
  l22 = jnp.sqrt(jnp.maximum(pivot, jnp.finfo(matrix.dtype).tiny))  # a last guard: never NaN
  y0 = rhs[..., 0, :] / l11
  x1 = (rhs[..., 1, :] - l21 * y0) / l22 / l22
  return jnp.stack([(y0 - l21 * x1) / l11, x1], axis=-2)


def gram_cg(matrix, rhs, lam, steps: int, precision=None, unroll: bool = False):
  """``steps`` textbook CG iterations per column on ``(M + λI) X = B`` from ``X = 0``.

  ``M`` (..., n, n) is formed (e.g. the Gram ``AᵀA`` of a convolution), so each
  iteration is one ``(n, n) @ (n, k)`` product: for ``N`` steps ``2·N·n²·k`` FLOPs,
  much less than an eigendecomposition when ``N·k ≪ n``. ``unroll``: the iterations
  as straight-line code, no ``while`` loop (every CG here has a static step count).
  """

  def matvec(p):
    return matmul(matrix, p, precision) + lam * p

  def step(_, carry):
    x, r, p, rr = carry
    ap = matvec(p)
    alpha = _safe_divide(rr, _column_dot(p, ap))
    x, r = x + alpha * p, r - alpha * ap
    rr_new = _column_dot(r, r)
    p = r + _safe_divide(rr_new, rr) * p
    return x, r, p, rr_new

  init = (jnp.zeros_like(rhs), rhs, rhs, _column_dot(rhs, rhs))
  x, _, p, rr = lax.fori_loop(0, steps - 1, step, init, unroll=unroll)
  return x + _safe_divide(rr, _column_dot(p, matvec(p))) * p  # the last step: no new residual


def row_gram_cg(row_gram, g, lam, steps: int, precision=None, unroll: bool = False):
  """Batch-space textbook CG: ``Y`` with ``D = Aᵀ Y`` the ``N``-step CG iterate.

  Runs CG on ``(AᵀA + λI) D = Aᵀ g`` (one CG per column, from ``D = 0``) given only
  the row Gram ``K = A Aᵀ`` (..., rows, rows): every iterate, residual and search
  direction lies in the range of ``Aᵀ`` (``D = AᵀY``, ``r = Aᵀρ``, ``p = Aᵀπ``), with

  * ``⟨r, r⟩ = ρᵀKρ`` and ``⟨p, (AᵀA + λI) p⟩ = ‖Kπ‖² + λ πᵀKπ``;
  * ``(AᵀA + λI) Aᵀπ = Aᵀ (K + λI) π``, so ``ρ ← ρ − α (Kπ + λπ)``;
  * ``Kπ ← Kρ + β Kπ``, so each iteration needs one product ``Kρ``.

  ``N`` steps cost ``N`` products ``(rows, rows) @ (rows, k)`` and no
  factorisation; exact textbook CG in exact arithmetic. ``unroll`` as in `gram_cg`.
  """

  def alpha(rr, pi, k_pi):
    return _safe_divide(rr, _column_dot(k_pi, k_pi) + lam * _column_dot(pi, k_pi))

  def step(_, carry):
    y, rho, pi, k_pi, rr = carry
    a = alpha(rr, pi, k_pi)
    y, rho = y + a * pi, rho - a * (k_pi + lam * pi)
    k_rho = matmul(row_gram, rho, precision)
    rr_new = _column_dot(rho, k_rho)
    beta = _safe_divide(rr_new, rr)
    return y, rho, rho + beta * pi, k_rho + beta * k_pi, rr_new

  k_g = matmul(row_gram, g, precision)
  init = (jnp.zeros_like(g), g, g, k_g, _column_dot(g, k_g))
  y, _, pi, k_pi, rr = lax.fori_loop(0, steps - 1, step, init, unroll=unroll)
  return y + alpha(rr, pi, k_pi) * pi


def eig_cg(evals, coeffs, lam, steps: int, weights=None, unroll: bool = False):
  """``steps`` textbook CG iterations per column, in an eigenbasis.

  Solves ``diag(s + λ) w = c`` column by column from ``w = 0`` with inner products
  ``⟨u, v⟩ = Σᵢ mᵢ uᵢ vᵢ`` (``m = weights``, default 1). This reproduces CG on
  ``(AᵀA + λI) D = Aᵀ g`` exactly:

  * parameter space, ``AᵀA = V diag(s) Vᵀ``: ``c = Vᵀ Aᵀ g``, ``m = 1``, ``D = V w``;
  * batch space, ``AAᵀ = U diag(s) Uᵀ``: ``c = Uᵀ g``, ``m = s``, ``D = Aᵀ U w``,
    because ``⟨AᵀU u, AᵀU v⟩ = uᵀ diag(s) v`` and ``(AᵀA + λI) AᵀU = AᵀU diag(s + λ)``;
  * a diagonal ``AᵀA = diag(s)`` (an embedding's token counts): ``V = I``.

  Args:
    evals: ``s``, shape (..., n).
    coeffs: ``c``, shape (..., n, k): one right-hand side per column.
    lam: ``λ > 0``.
    steps: the number of CG iterations ``N ≥ 1``.
    weights: ``m``, shape (..., n), or None for 1.
    unroll: the iterations as straight-line code (as in `gram_cg`).

  Returns:
    ``w``, shape (..., n, k).
  """
  diag = (evals + lam)[..., None]
  m = jnp.ones_like(diag) if weights is None else weights[..., None]

  def step(_, carry):
    r, p, rr = carry
    ap = diag * p
    alpha = _safe_divide(rr, _column_dot(m * p, ap))
    r = r - alpha * ap
    rr_new = _column_dot(m * r, r)
    p = r + _safe_divide(rr_new, rr) * p
    return r, p, rr_new

  # The iterate is not carried: the system is diagonal, so w = (c − r) / (s + λ)
  # (the residual's definition), which saves two of the five array passes per step.
  init = (coeffs, coeffs, _column_dot(m * coeffs, coeffs))
  r = lax.fori_loop(0, steps, step, init, unroll=unroll)[0]
  return (coeffs - r) / diag


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
