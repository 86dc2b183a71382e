"""Test helpers shared by several test files (test files never import each other)."""

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(got, want) -> float:
  """``max|got − want| / max|want|`` in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


def flat(dk, db):
  """Kernel and bias directions as the ``(p, out)`` columns of ``θ = [W; b]``."""
  dk = np.asarray(dk).reshape(-1, np.shape(dk)[-1])
  return dk if db is None else np.concatenate([dk, np.asarray(db)[None]], axis=0)


def matrix_free_direction(layer_fn, x, kernel, bias, g, lam, steps):
  """Per-output-column ``jax.scipy.sparse.linalg.cg`` with ``v ↦ vjp(jvp(v)) + λv``.

  A second implementation of ``prox_cgN`` that forms no matrix: it only calls the
  plain layer ``layer_fn(x, kernel, bias)``.
  """
  params = (kernel, bias)

  def column(c):
    def embed(v):
      return jax.tree.map(lambda p, vi: jnp.zeros_like(p).at[..., c].set(vi), params, v)

    apply = lambda v: layer_fn(x, *embed(v))
    zero = jax.tree.map(lambda p: p[..., 0] * 0, params)
    _, apply_t = jax.vjp(apply, zero)
    operator = lambda v: jax.tree.map(lambda a, v: a + lam * v, apply_t(apply(v))[0], v)
    rhs = apply_t(g)[0]
    return jax.scipy.sparse.linalg.cg(operator, rhs, tol=0.0, atol=0.0, maxiter=steps)[0]

  dk, db = jax.vmap(column, out_axes=-1)(jnp.arange(kernel.shape[-1]))
  return dk, db


def product_precisions(closed_jaxpr) -> list:
  """The ``precision`` of every matrix product and convolution in a jaxpr, sub-jaxprs
  (loops, custom rules, jit) included; one entry per product (the lhs/rhs pair collapsed,
  unset as ``DEFAULT``)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        p = eqn.params["precision"]
        p = p[0] if isinstance(p, tuple) else p
        found.append(jax.lax.Precision.DEFAULT if p is None else p)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return found
