"""The ProxProp direction ``D = (AᵀA + λI)⁻¹Aᵀg`` in each of its two systems.

Both functions execute a `planner.Plan` on block-diagonal systems (a leading block
axis ``B``; see `layers`), with ``steps`` CG iterations for ``prox_cgN`` (ignored by
the exact solvers) and every matrix product at ``precision``.
"""

from __future__ import annotations

import jax.numpy as jnp

from proxprop_jax import solvers
from proxprop_jax.planner import Plan
from proxprop_jax.solvers import matmul, matmul_t, t_matmul


def parameter_space(plan: Plan, gram, grad, lam, steps: int | None, precision=None):
  """``D`` from the Gram ``AᵀA`` (B, p, p) and the gradient ``Aᵀg`` (B, p, k)."""
  if plan.solver == "cholesky":
    return solvers.spd_solve(gram, grad, lam)
  if plan.solver == "closed_form":
    return solvers.small_spd_solve(gram, grad, lam)
  if plan.solver == "inverse":
    return matmul(solvers.spd_inverse(gram, lam, precision), grad, precision)
  if plan.solver == "cg":
    return solvers.gram_cg(gram, grad, lam, steps, precision, plan.unroll)
  evals, evecs, keep = solvers.eigh_psd(gram)
  coeffs = t_matmul(evecs, grad, precision) * keep[..., None]
  return matmul(evecs, solvers.eig_cg(evals, coeffs, lam, steps, unroll=plan.unroll), precision)


def batch_space(plan: Plan, a, g, use_bias: bool, lam, steps: int | None, precision=None):
  """``D = Aᵀ (AAᵀ + λI)⁻¹ g`` (resp. its CG iterate) from the rows of the system.

  Args:
    a: ``A`` without its ones column, (B, rows, p0): ``A = [a, 1]`` is never formed,
      since ``AAᵀ = aaᵀ + 1`` and ``Aᵀm = [aᵀm; 1ᵀm]``.
    g: the output cotangent, (B, rows, k).

  Returns:
    ``D``, (B, p0 + use_bias, k).
  """

  def a_transpose(m, rhs=None):
    """``Aᵀ m`` (times ``rhs``), in the order the plan says."""
    if rhs is not None and plan.multiply_a_first:
      return matmul(a_transpose(m), rhs, precision)
    if rhs is not None:
      m = matmul(m, rhs, precision)
    parts = [t_matmul(a, m, precision)]
    if use_bias:
      parts.append(jnp.sum(m, axis=-2, keepdims=True))
    return jnp.concatenate(parts, axis=-2)

  row_gram = row_gram_of(a, use_bias, precision)
  if plan.solver == "cholesky":
    return a_transpose(solvers.spd_solve(row_gram, g, lam))
  if plan.solver == "closed_form":
    return a_transpose(solvers.small_spd_solve(row_gram, g, lam))
  if plan.solver == "inverse":
    return a_transpose(solvers.spd_inverse(row_gram, lam, precision), g)
  if plan.solver == "cg":
    return a_transpose(solvers.row_gram_cg(row_gram, g, lam, steps, precision, plan.unroll))
  evals, evecs, keep = solvers.eigh_psd(row_gram)
  coeffs = t_matmul(evecs, g, precision) * keep[..., None]
  return a_transpose(evecs, solvers.eig_cg(evals, coeffs, lam, steps, weights=evals,
                                           unroll=plan.unroll))


def diagonal(evals, grad, lam, steps: int | None):
  """``D`` for a diagonal ``AᵀA = diag(s)`` (an embedding's token counts), ``s`` (n,) and
  ``Aᵀg`` (n, k): ``Aᵀg / (s + λ)`` row-wise for ``steps=None`` (exact), else ``steps``
  textbook CG iterations per column (`solvers.eig_cg` with the identity basis)."""
  if steps is None:
    return grad / (evals + lam)[:, None]
  return solvers.eig_cg(evals, grad, lam, steps)


def row_gram_of(a, use_bias: bool, precision=None):
  """The row Gram ``AAᵀ = aaᵀ + 1`` (B, rows, rows) of ``A = [a, 1]`` (the batch system)."""
  return matmul_t(a, a, precision) + (1 if use_bias else 0)
