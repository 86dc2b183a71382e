"""`pp.LinearGeneral`/`pp.Einsum` (`contraction`, `layers.BlockDense`, `pp.dense_general`,
`pp.einsum`): flax's parameters and forward pass; directions against float64 NumPy.

The reference knows nothing of blocks or reshapes: ``J`` is the Jacobian of the plain
flax layer's output with respect to all its parameters (the layer is linear, so
``z = J θ``); the independent systems are the connected components of ``JᵀJ``'s
pattern, and each is solved (or CG'd) with its own ``A = J[:, component]``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import proxprop_jax as pp
from proxprop_jax import layers
from tests import reference
from tests.helpers import product_precisions, rel_err

LAM = 2.0  # tau_prox = 0.5
MODES = ("gradient", "prox_exact", "prox_cg1", "prox_cg3")

# (flax class, constructor args, kwargs, input shape). The first two of each class are
# the query/key/value and output projections of nnx.MultiHeadAttention
# (test_multi_head_attention_uses_these_projections).
LINEAR_GENERAL = {
    "mha-qkv": ((6, (2, 4)), {}, (3, 5, 6)),
    "mha-out": (((2, 4), 5), {"axis": (-2, -1)}, (3, 5, 2, 4)),
    "batch-axis": ((4, 3), {"batch_axis": {0: 2, 1: 2}}, (2, 2, 6, 4)),
    "batch-axis-split-contraction": (((3, 4), (2,)), {"axis": (1, 3), "batch_axis": {0: 2},
                                                       "use_bias": False}, (2, 3, 5, 4)),
}
EINSUM = {
    "mha-qkv": (("btd,dnh->btnh", (6, 2, 4), (2, 4)), {}, (3, 5, 6)),
    "mha-out": (("btnh,nhd->btd", (2, 4, 5), (5,)), {}, (3, 5, 2, 4)),
    "per-head": (("btnh,nhk->btnk", (2, 4, 3), (2, 3)), {}, (3, 5, 2, 4)),
    "per-head-permuted-flat-bias": (("btnh,nhk->kbtn", (2, 4, 3), (6,)), {}, (3, 5, 2, 4)),
    "flax-docstring": (("nta,hab->nthb", (3, 2, 4), (3, 4)), {}, (4, 5, 2)),
    "ellipsis-no-bias": (("...d,df->...f", (6, 3), None), {}, (3, 5, 6)),
}
CASES = {**{f"LinearGeneral-{k}": (nnx.LinearGeneral, pp.LinearGeneral, *v)
            for k, v in LINEAR_GENERAL.items()},
         **{f"Einsum-{k}": (nnx.Einsum, pp.Einsum, *v) for k, v in EINSUM.items()}}


def _layers(name, mode="prox_exact", **extra):
  flax_cls, pp_cls, args, kwargs, x_shape = CASES[name]
  ours = pp_cls(*args, mode=mode, tau_prox=1 / LAM, rngs=nnx.Rngs(0), **kwargs, **extra)
  theirs = flax_cls(*args, rngs=nnx.Rngs(0), **kwargs, **extra)
  return ours, theirs, x_shape


def _params(module):
  return nnx.state(module, nnx.Param)


def _components(pattern):
  """The connected components of a symmetric boolean matrix (union-find)."""
  parent = list(range(len(pattern)))

  def root(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for i, j in zip(*np.nonzero(pattern)):
    parent[root(i)] = root(j)
  groups = {}
  for i in range(len(pattern)):
    groups.setdefault(root(i), []).append(i)
  return list(groups.values())


def _reference_direction(flax_layer, x, c, mode):
  """``D`` per independent system of the plain flax layer, flattened like its params."""
  graphdef, params = nnx.split(flax_layer, nnx.Param)
  theta, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jacfwd(lambda t: nnx.merge(graphdef, unravel(t))(x).ravel())(theta))
  systems = _components(jac.T @ jac != 0)
  d = np.zeros(theta.shape)
  for s in systems:
    d[s] = reference.direction(jac[:, s], np.asarray(c).reshape(-1, 1), mode, LAM)[:, 0]
  return d, len(systems)


@nnx.jit
def _directions(modules, x, c):
  """Each module's direction for the loss ``Σ c ⊙ module(x)`` (so ``g = c``), flattened."""
  return [ravel_pytree(nnx.grad(lambda m: jnp.sum(c * m(x)))(m))[0] for m in modules]


# --------------------------------------------------------------- flax's layer, exactly


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_same_parameters_and_forward_as_flax(name, dtype):
  ours, theirs, x_shape = _layers(name, param_dtype=dtype or jnp.float32)
  assert isinstance(ours, pp.ProxLayer) and isinstance(ours, type(theirs))
  ours_params, theirs_params = _params(ours), _params(theirs)
  assert jax.tree.structure(ours_params) == jax.tree.structure(theirs_params)
  for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(theirs_params)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  # A bias that is not zero, so its broadcast is checked too.
  for module in (ours, theirs):
    if module.bias is not None:
      module.bias[...] = jnp.arange(module.bias.size, dtype=module.bias.dtype).reshape(
          module.bias.shape)
  x = jax.random.normal(jax.random.key(1), x_shape)
  y, want = ours(x), theirs(x)
  assert y.dtype == want.dtype and y.shape == want.shape
  tol = 1e-6 if dtype is None else 1e-2
  np.testing.assert_allclose(y.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)


def test_multi_head_attention_uses_these_projections():
  mha = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8, out_features=5,
                               decode=False, rngs=nnx.Rngs(0))
  (qkv_args, qkv_kwargs, _), (out_args, out_kwargs, _) = (LINEAR_GENERAL["mha-qkv"],
                                                           LINEAR_GENERAL["mha-out"])
  for projection, args, kwargs in ((mha.query, qkv_args, qkv_kwargs),
                                   (mha.key, qkv_args, qkv_kwargs),
                                   (mha.value, qkv_args, qkv_kwargs),
                                   (mha.out, out_args, out_kwargs)):
    assert type(projection) is nnx.LinearGeneral
    ours = pp.LinearGeneral(*args, rngs=nnx.Rngs(0), **kwargs)
    for attribute in ("in_features", "out_features", "axis", "batch_axis", "use_bias"):
      assert getattr(projection, attribute) == getattr(ours, attribute), attribute


# ------------------------------------------------------------------------ directions


def _systems(name) -> int:
  """The expected number of independent systems: output features × shared-axis indices."""
  flax_cls, _, args, kwargs, _ = CASES[name]
  if flax_cls is nnx.Einsum:
    equation, kernel_shape, _ = args
    lhs, out = equation.split("->")
    return int(np.prod([n for i, n in zip(lhs.split(",")[1], kernel_shape) if i in out]))
  features = args[1] if isinstance(args[1], tuple) else (args[1],)
  return int(np.prod(features)) * int(np.prod(list(kwargs.get("batch_axis", {}).values())))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", CASES)
def test_direction_matches_numpy_per_system(name):
  rng = np.random.default_rng(0)
  ours = [_layers(name, mode, param_dtype=jnp.float64)[0] for mode in MODES]
  _, theirs, x_shape = _layers(name, param_dtype=jnp.float64)
  x = jnp.asarray(rng.normal(size=x_shape))
  c = jnp.asarray(rng.normal(size=theirs(x).shape))
  for mode, got in zip(MODES, _directions(ours, x, c)):
    want, systems = _reference_direction(theirs, x, c, mode)
    assert systems == _systems(name)
    assert rel_err(got, want) <= 1e-8, (name, mode, rel_err(got, want))
