"""`pp.embed` and `pp.Embed`: flax's lookup and parameters, the direction against a
float64 NumPy one-hot reference, no one-hot in the program, several devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import proxprop_jax as pp
from tests import reference
from tests.helpers import gpu_marked

MODES = ["gradient", "prox_exact", "prox_cg1", "prox_cg3"]


def _ids(rng, shape, vocab):
  """Ids with repeats and with some tokens of the vocabulary absent."""
  return jnp.asarray(rng.integers(0, vocab - 2, size=shape), jnp.int32)


def _onehot(ids, vocab):
  return np.eye(vocab)[np.asarray(ids).reshape(-1)]


@pytest.mark.parametrize("kwargs", [{}, {"param_dtype": jnp.bfloat16}, {"dtype": jnp.bfloat16},
                                    {"embedding_init": nnx.initializers.normal(3.0)}])
def test_embed_mirrors_nnx_embed(kwargs):
  ids = _ids(np.random.default_rng(0), (3, 5), 11)
  ours = pp.Embed(11, 4, mode="prox_exact", rngs=nnx.Rngs(0), **kwargs)
  theirs = nnx.Embed(11, 4, rngs=nnx.Rngs(0), **kwargs)
  ours_params, theirs_params = nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)
  assert jax.tree.structure(ours_params) == jax.tree.structure(theirs_params)
  for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(theirs_params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  for got, want in [(ours(ids), theirs(ids)), (ours.attend(jnp.ones((2, 4))),
                                               theirs.attend(jnp.ones((2, 4))))]:
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_a_one_row_table_is_broadcast_as_in_flax():
  ids = jnp.zeros((2, 3), jnp.int32)
  ours = pp.Embed(1, 4, mode="prox_exact", tau_prox=0.5, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours(ids), nnx.Embed(1, 4, rngs=nnx.Rngs(0))(ids))
  c = jnp.arange(24.0).reshape(2, 3, 4)
  grads = nnx.grad(lambda m: jnp.sum(c * m(ids)))(ours)
  np.testing.assert_allclose(grads["embedding"][...], c.reshape(6, 4).sum(0, keepdims=True) / 8,
                             rtol=1e-6)  # one token seen 6 times: Aᵀg / (6 + 2)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", gpu_marked(MODES, "prox_exact", "prox_cg3"))
def test_direction_matches_numpy(mode):
  # The loss Σ C ⊙ Embed(ids) has g = C; A = onehot(ids) in float64 NumPy.
  rng = np.random.default_rng(1)
  vocab, features, tau = 13, 5, 0.3
  ids = _ids(rng, (4, 6), vocab)
  c = jnp.asarray(rng.normal(size=(4, 6, features)))
  layer = pp.Embed(vocab, features, mode=mode, tau_prox=tau, param_dtype=jnp.float64,
                   rngs=nnx.Rngs(0))
  grads = nnx.grad(lambda m: jnp.sum(c * m(ids)))(layer)
  want = reference.direction(_onehot(ids, vocab), np.asarray(c).reshape(-1, features), mode,
                             1 / tau)
  got = np.asarray(grads["embedding"][...])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.abs(want).max())
  assert not got[vocab - 2:].any()  # absent tokens do not move


def test_attend_takes_the_plain_gradient():
  query = jax.random.normal(jax.random.key(2), (3, 4))
  ours = pp.Embed(7, 4, mode="prox_exact", rngs=nnx.Rngs(0))
  theirs = nnx.Embed(7, 4, rngs=nnx.Rngs(0))
  loss = lambda m: jnp.sum(jnp.sin(m.attend(query)))
  np.testing.assert_array_equal(nnx.grad(loss)(ours)["embedding"][...],
                                nnx.grad(loss)(theirs)["embedding"][...])


def _shapes(jaxpr):
  """The shapes of every value a jaxpr (and its sub-jaxprs) computes."""
  for eqn in jaxpr.eqns:
    yield from (v.aval.shape for v in eqn.outvars)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _shapes(inner)


@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg4"])
def test_the_backward_pass_forms_no_one_hot_matrix(mode):
  vocab, rows = 5000, 64
  ids = jnp.arange(rows, dtype=jnp.int32) * 7
  table = jnp.zeros((vocab, 8))
  jaxpr = jax.make_jaxpr(jax.grad(lambda t: jnp.sum(pp.embed(ids, t, mode=mode) ** 2)))(table)
  biggest = max(np.prod(s) for s in _shapes(jaxpr.jaxpr))
  assert biggest == vocab * 8  # the table's size: nothing rows × vocab


def test_the_plan_is_recorded():
  ids, table = jnp.array([0, 2, 2]), jnp.ones((4, 3))
  with pp.planner.recording() as plans:
    jax.grad(lambda t: jnp.sum(pp.embed(ids, t, mode="prox_cg2")))(table)
  [(problem, plan)] = plans
  assert plan == pp.Plan("parameter", "diagonal")
  assert (problem.blocks, problem.rows, problem.params, problem.columns) == (1, 3, 4, 3)


@pytest.mark.parametrize("mode", ["gradient", "prox_exact", "prox_cg2"])
def test_vmap_over_an_axis_gives_the_global_direction(mode):
  # 4 shards of the batch; the counts are summed and Aᵀg averaged over the axis.
  rng = np.random.default_rng(3)
  ids = _ids(rng, (8, 3), 9)
  table = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32)

  def direction(ids, target, axis_name):
    loss = lambda t: 0.5 * jnp.mean(jnp.sum(
        (pp.embed(ids, t, mode=mode, tau_prox=0.7, axis_name=axis_name) - target) ** 2, -1))
    return jax.grad(loss)(table)

  want = direction(ids, target, None)
  shards = lambda a: a.reshape(4, 2, *a.shape[1:])
  got = jax.vmap(lambda i, t: direction(i, t, "data"), axis_name="data")(shards(ids),
                                                                        shards(target))
  for d in got:
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-7)


def test_bfloat16_table():
  ids = _ids(np.random.default_rng(4), (6, 2), 10)
  layer = pp.Embed(10, 3, mode="prox_cg2", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  reference_layer = pp.Embed(10, 3, mode="prox_cg2", rngs=nnx.Rngs(0))
  reference_layer.embedding[...] = layer.embedding[...].astype(jnp.float32)
  loss = lambda m: jnp.sum(m(ids).astype(jnp.float32) ** 2)
  got = nnx.grad(loss)(layer)["embedding"][...]
  assert got.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(got)))
  want = nnx.grad(loss)(reference_layer)["embedding"][...]
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=3e-2, atol=3e-2)


def test_bad_input_raises():
  table = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="integer ids"):
    pp.embed(jnp.ones(3), table)
  with pytest.raises(ValueError, match=r"shape \(num_embeddings, features\)"):
    pp.embed(jnp.zeros(3, jnp.int32), jnp.ones(4))
  with pytest.raises(ValueError, match="AᵀA is diagonal"):
    pp.embed(jnp.zeros(3, jnp.int32), table, mode="prox_exact",
             plan=pp.Plan("parameter", "cholesky"))
  with pytest.raises(ValueError, match="integer"):
    pp.Embed(4, 3, rngs=nnx.Rngs(0))(jnp.ones(3))
  # out_sharding as nnx.Embed takes it (outside a mesh it changes nothing, as in flax).
  embed, ids = pp.Embed(4, 3, rngs=nnx.Rngs(0)), jnp.array([0, 3, 3], jnp.int32)
  np.testing.assert_array_equal(embed(ids, out_sharding=("x",)), embed(ids))
