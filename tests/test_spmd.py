"""`spmd`: axis-name handling, and the reductions against one device on the global batch
(on fake CPU devices; the full training-step comparison is tests/test_parallel.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import proxprop_jax as pp
from proxprop_jax import spmd


def test_axis_names():
  assert spmd.axis_names(None) == frozenset()
  assert spmd.axis_names("data") == {"data"}
  assert spmd.axis_names(("a", "b")) == {"a", "b"}
  assert spmd.check_axis_name(["a", "b"]) == ("a", "b")
  with pytest.raises(ValueError, match="axis_name must be None, a hashable axis name"):
    spmd.check_axis_name({"a": 1})


def test_reductions_are_the_identity_without_an_axis():
  v = jnp.arange(3.0)
  assert spmd.reduce(jax.lax.psum, v, None, v) is v
  x, g = spmd.gather_rows(v, 2 * v, v, None)
  assert x is v and np.array_equal(g, 2 * v)


@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg2"])
@pytest.mark.parametrize("rows", [4, 40], ids=["batch-space", "parameter-space"])
def test_vmap_over_an_axis_gives_the_global_direction(mode, rows):
  # vmap with axis_name runs the collectives like devices would: 4 shards of a batch.
  rng = np.random.default_rng(0)
  x, kernel = jnp.asarray(rng.normal(size=(rows, 6))), jnp.asarray(rng.normal(size=(6, 3)))
  target = jnp.asarray(rng.normal(size=(rows, 3)))

  def direction(x, target, axis_name):
    loss = lambda k: 0.5 * jnp.mean(jnp.sum(
        (pp.dense(x, k, mode=mode, axis_name=axis_name) - target) ** 2, -1))
    return jax.grad(loss)(kernel)

  want = direction(x, target, None)
  shards = lambda a: a.reshape(4, rows // 4, *a.shape[1:])
  got = jax.vmap(lambda x, t: direction(x, t, "data"), axis_name="data")(shards(x),
                                                                        shards(target))
  for d in got:  # every shard gets the direction of the global batch
    np.testing.assert_allclose(d, want, rtol=2e-5, atol=1e-6)
