"""`direction`: every plan (system × solver × multiplication order), forced through
``plan=``, against float64 NumPy and (CG) against matrix-free CG; grouped convolutions
against one NumPy solve per group."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import proxprop_jax as pp
from tests import reference
from tests.helpers import flat, matrix_free_direction, rel_err

pytestmark = pytest.mark.usefixtures("x64")

LAM = 2.0  # tau_prox = 0.5
MODES = ("prox_exact", "prox_cg1", "prox_cg3")
EXACT_PLANS = [pp.Plan(s, v, m) for s in ("batch", "parameter") for v in ("cholesky", "inverse")
               for m in (False, True) if not (m and (s == "parameter" or v == "cholesky"))]
CG_PLANS = [pp.Plan(s, v, m) for s in ("batch", "parameter") for v in ("cg", "eig_cg")
            for m in (False, True) if not (m and (s == "parameter" or v == "cg"))]

# (op, kwargs, x shape, kernel shape): rows < p with p < out and p > out, rows > p (dense
# and conv), and a grouped conv (block-diagonal: one system per group).
PROBLEMS = [
    (pp.dense, {}, (5, 8), (8, 12)),
    (pp.dense, {}, (9, 14), (14, 3)),
    (pp.dense, {}, (40, 6), (6, 3)),
    (pp.conv, {"padding": "SAME"}, (2, 6, 6, 2), (3, 3, 2, 4)),
    (pp.conv, {"padding": "SAME", "feature_group_count": 2}, (2, 5, 5, 4), (3, 3, 2, 6)),
]
IDS = ["dense-p<out", "dense-p>out", "dense-rows>p", "conv", "grouped-conv"]


def _reference_matrices(op, kw, x, k_shape):
  """``A = [patches, 1]`` per group (one group for dense and plain convs)."""
  x = np.asarray(x)
  if op is pp.dense:
    return [reference.with_ones(x, True)]
  groups = kw.get("feature_group_count", 1)
  cin = x.shape[-1] // groups
  pads = reference.same_pads(x.shape[1:-1], k_shape[:-2], (1, 1), (1, 1))
  return [reference.with_ones(reference.patches(x[..., b * cin:(b + 1) * cin], k_shape[:-2],
                                                (1, 1), pads, (1, 1))[0], True)
          for b in range(groups)]


def _reference_direction(matrices, g, mode):
  """One NumPy solve per group: group ``b`` owns output columns ``b·k … (b+1)·k``."""
  g = np.asarray(g).reshape(-1, g.shape[-1])
  k = g.shape[-1] // len(matrices)
  return np.concatenate([reference.direction(a, g[:, b * k:(b + 1) * k], mode, LAM)
                         for b, a in enumerate(matrices)], axis=1)


@pytest.mark.gpu
@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_every_plan_matches_numpy(problem):
  op, kw, x_shape, k_shape = problem
  rng = np.random.default_rng(3)
  x, k = jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.normal(size=k_shape))
  b = jnp.asarray(rng.normal(size=k_shape[-1]))
  plain = functools.partial(op, mode="gradient", **kw)
  g = jnp.asarray(rng.normal(size=plain(x, k, b).shape))
  g = g.at[..., 0].set(0.0)  # a dead unit: its column must stay exactly zero
  cases = [(m, p) for m in MODES for p in (EXACT_PLANS if m == "prox_exact" else CG_PLANS)]

  @jax.jit
  def directions(x, k, b, g):
    return [jax.vjp(lambda k, b: op(x, k, b, mode=m, tau_prox=1 / LAM, plan=p, **kw), k, b)[1](g)
            for m, p in cases]

  matrices = _reference_matrices(op, kw, x, k_shape)
  want = {m: _reference_direction(matrices, g, m) for m in MODES}
  matrix_free = matrix_free_direction(plain, x, k, b, g, LAM, 3)
  for (mode, plan), (dk, db) in zip(cases, directions(x, k, b, g)):
    got = flat(dk, db)
    assert rel_err(got, want[mode]) <= 1e-8, (mode, plan)
    assert np.all(got[:, 0] == 0), (mode, plan)
    if mode == "prox_cg3":
      assert rel_err(got, flat(*matrix_free)) <= 1e-8, plan


def test_the_planned_path_is_one_of_the_forced_ones():
  # Without plan= the layer takes the cheapest plan; its direction is the same.
  rng = np.random.default_rng(4)
  x, k = jnp.asarray(rng.normal(size=(9, 14))), jnp.asarray(rng.normal(size=(14, 3)))
  g = jnp.asarray(rng.normal(size=(9, 3)))
  planned = jax.vjp(lambda k: pp.dense(x, k, mode="prox_cg2"), k)[1](g)[0]
  for plan in CG_PLANS:
    forced = jax.vjp(lambda k: pp.dense(x, k, mode="prox_cg2", plan=plan), k)[1](g)[0]
    assert rel_err(forced, planned) <= 1e-10, plan


def test_a_plan_for_another_mode_is_refused():
  x, k = jnp.ones((4, 3)), jnp.ones((3, 2))
  with pytest.raises(ValueError, match="cannot compute mode 'prox_cg2'"):
    pp.dense(x, k, mode="prox_cg2", plan=pp.Plan("batch", "cholesky"))
  with pytest.raises(ValueError, match="plan must be a proxprop_jax.Plan"):
    pp.dense(x, k, mode="prox_exact", plan="cholesky")
