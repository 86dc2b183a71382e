"""`pp.LinearGeneral`/`pp.Einsum` (`contraction`, `layers.DenseGeneral`, `pp.dense_general`,
`pp.einsum`): flax's parameters and forward pass; directions against float64 NumPy.

The reference knows nothing of blocks or reshapes: ``J`` is the Jacobian of the plain
flax layer's output with respect to all its parameters (the layer is linear, so
``z = J θ``); the independent systems are the connected components of ``JᵀJ``'s
pattern, and each is solved (or CG'd) with its own ``A = J[:, component]``.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import proxprop_jax as pp
from proxprop_jax import layers
from tests import reference
from tests.helpers import gpu_marked, product_precisions, rel_err, xla_flags

ROOT = pathlib.Path(__file__).parents[1]
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


def _reference_directions(flax_layer, x, c, modes):
  """``{mode: D}`` per independent system of the plain flax layer, flattened like its
  params, and the number of systems."""
  graphdef, params = nnx.split(flax_layer, nnx.Param)
  theta, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jacfwd(lambda t: nnx.merge(graphdef, unravel(t))(x).ravel())(theta))
  systems = _components(jac.T @ jac != 0)
  directions = {}
  for mode in modes:
    d = directions[mode] = np.zeros(theta.shape)
    for s in systems:
      d[s] = reference.direction(jac[:, s], np.asarray(c).reshape(-1, 1), mode, LAM)[:, 0]
  return directions, len(systems)


def _assert_same_params(ours, theirs):
  ours_params, theirs_params = _params(ours), _params(theirs)
  assert jax.tree.structure(ours_params) == jax.tree.structure(theirs_params)
  for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(theirs_params)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def _set_bias(modules, bias):
  """The same bias (not zero: its broadcast is checked too) in each module that has one."""
  for module in modules:
    if module.bias is not None:
      module.bias[...] = jnp.asarray(bias(module.bias.shape), module.bias.dtype)


@nnx.jit
def _directions(modules, x, c):
  """Each module's direction for the loss ``Σ c ⊙ module(x)`` (so ``g = c``), flattened."""
  return [ravel_pytree(nnx.grad(lambda m: jnp.sum(c * m(x)))(m))[0] for m in modules]


# --------------------------------------------------------------- flax's layer, exactly


# Every case in float64 in test_direction_matches_numpy_per_system; here the dtypes.
@pytest.mark.parametrize("name,dtype", [("LinearGeneral-mha-qkv", None), ("Einsum-per-head", None),
                                        ("LinearGeneral-batch-axis", jnp.bfloat16),
                                        ("Einsum-per-head", jnp.bfloat16)])
def test_same_parameters_and_forward_as_flax(name, dtype):
  ours, theirs, x_shape = _layers(name, param_dtype=dtype or jnp.float32)
  assert isinstance(ours, pp.ProxLayer) and isinstance(ours, type(theirs))
  _assert_same_params(ours, theirs)
  _set_bias((ours, theirs), lambda shape: np.arange(np.prod(shape)).reshape(shape))
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


KINDS = {  # (use_bias, blocks, contracted, features, x shape, kernel shape)
    "rows2-blocks1-contracted2": (True, 1, 2, 1, (7, 2, 3, 2, 2), (3, 2, 2, 5)),
    "no-blocks-features2-no-bias": (False, 0, 1, 2, (7, 4), (4, 2, 3)),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", KINDS)
def test_dense_general_kind_is_one_dense_layer_per_block(name):
  use_bias, nb, nc, nf, x_shape, k_shape = KINDS[name]
  rng = np.random.default_rng(0)
  b_shape = k_shape[:nb] + k_shape[nb + nc:]
  x, kernel = rng.normal(size=x_shape), rng.normal(size=k_shape)
  bias = rng.normal(size=b_shape) if use_bias else None
  kind = layers.DenseGeneral(use_bias, nb, nc, nf)
  to_jax = lambda a: None if a is None else jnp.asarray(a)
  z = np.asarray(kind.apply(to_jax(x), to_jax(kernel), to_jax(bias)))
  # Reference: rows, blocks, contracted and features flattened, one matrix per block.
  rows = x.ndim - nb - nc
  blocks = int(np.prod(x_shape[rows:rows + nb]))
  x3 = x.reshape(int(np.prod(x_shape[:rows])), blocks, -1)
  z3 = z.reshape(x3.shape[0], blocks, -1)
  theta = np.asarray(kind.to_columns(to_jax(kernel), to_jax(bias)))
  gram, matrix = np.asarray(kind.gram(to_jax(x))), np.asarray(kind.matrix(to_jax(x)))
  g_rows = np.asarray(kind.cotangent_rows(to_jax(z)))
  for b in range(blocks):
    a = reference.with_ones(x3[:, b], use_bias)
    np.testing.assert_allclose(a @ theta[b], z3[:, b], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gram[b], a.T @ a, rtol=1e-12)
    np.testing.assert_array_equal(matrix[b], x3[:, b])
    np.testing.assert_array_equal(g_rows[b], z3[:, b])
  back_kernel, back_bias = kind.from_columns(jnp.asarray(theta), kernel.shape)
  np.testing.assert_array_equal(back_kernel, kernel)
  assert back_bias is None if bias is None else np.array_equal(back_bias, bias)
  problem = kind.problem(x.shape, kernel.shape, devices=4)
  assert (problem.blocks, problem.rows, problem.params, problem.columns) == (
      blocks, 4 * x3.shape[0], x3.shape[2] + use_bias, z3.shape[2])


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
@pytest.mark.parametrize("name", gpu_marked(CASES, "LinearGeneral-batch-axis", "Einsum-per-head"))
def test_direction_matches_numpy_per_system(name):
  rng = np.random.default_rng(0)
  ours = [_layers(name, mode, param_dtype=jnp.float64)[0] for mode in MODES]
  _, theirs, x_shape = _layers(name, param_dtype=jnp.float64)
  _set_bias([*ours, theirs], lambda shape: np.random.default_rng(1).normal(size=shape))
  x = jnp.asarray(rng.normal(size=x_shape))
  # flax's parameters and forward pass (the plain layer, and the custom_vjp of a solve).
  for layer in ours[:2]:
    _assert_same_params(layer, theirs)
    np.testing.assert_allclose(layer(x), theirs(x), rtol=1e-12, atol=1e-12)
  c = jnp.asarray(rng.normal(size=theirs(x).shape))
  want, systems = _reference_directions(theirs, x, c, MODES)
  assert systems == _systems(name)
  for mode, got in zip(MODES, _directions(ours, x, c)):
    assert rel_err(got, want[mode]) <= 1e-8, (name, mode, rel_err(got, want[mode]))


# Each system with each kind of solver; test_direction covers every plan on dense layers.
PLANS = {"prox_exact": [pp.Plan("batch", "inverse", True), pp.Plan("parameter", "cholesky")],
         "prox_cg3": [pp.Plan("batch", "eig_cg"), pp.Plan("parameter", "cg")]}


@pytest.mark.gpu
@pytest.mark.usefixtures("x64")
def test_both_systems_of_the_block_layer_match_numpy():
  # Per-head weights: one system per head and output feature, from the batch-space rows
  # (`matrix`, `cotangent_rows`) and from the parameter-space Gram (`gram`).
  equation, x_shape, kernel_shape = "btnh,nhk->btnk", (1, 3, 2, 8), (2, 8, 12)
  theirs = nnx.Einsum(equation, kernel_shape, kernel_shape[::2], param_dtype=jnp.float64,
                      rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=x_shape))
  kernel, bias = theirs.kernel[...], jnp.asarray(rng.normal(size=theirs.bias.shape))
  theirs.bias[...] = bias
  c = jnp.asarray(rng.normal(size=theirs(x).shape))
  cases = [(m, p) for m, plans in PLANS.items() for p in plans]

  @jax.jit
  def directions(x, kernel, bias, c):
    return [ravel_pytree(jax.grad(lambda k, b: jnp.sum(c * pp.einsum(
        equation, x, k, b, mode=m, tau_prox=1 / LAM, plan=p)), argnums=(0, 1))(kernel, bias)
                         [::-1])[0] for m, p in cases]  # bias first, like the flax state

  want = _reference_directions(theirs, x, c, PLANS)[0]
  for (mode, plan), got in zip(cases, directions(x, kernel, bias, c)):
    assert rel_err(got, want[mode]) <= 1e-8, (mode, plan, rel_err(got, want[mode]))


# ------------------------------------------------------------------- several devices


def test_vmap_over_an_axis_gives_the_global_direction():
  # vmap with axis_name runs the collectives like devices would: 4 shards of the rows,
  # which for the batch-axis layer are its second axis (its first is the block axis).
  rng = np.random.default_rng(0)
  cases = [  # layer, x's sharded axis, x, kernel and bias shapes, mode
      (lambda x, k, b, **kw: pp.einsum("btnh,nhk->btnk", x, k, b, **kw), 0,
       (8, 2, 2, 3), (2, 3, 4), (2, 4), "prox_exact"),                       # parameter space
      (lambda x, k, b, **kw: pp.einsum("btnh,nhk->btnk", x, k, b, **kw), 0,
       (8, 1, 2, 12), (2, 12, 4), (2, 4), "prox_cg2"),                       # batch space
      (lambda x, k, b, **kw: pp.dense_general(x, k, b, batch_dims=(0,), **kw), 1,
       (2, 8, 12), (2, 12, 3), (2, 3), "prox_exact"),                        # batch space
      (lambda x, k, b, **kw: pp.dense_general(x, k, b, axis=(-2, -1), **kw), 0,
       (8, 2, 2), (2, 2, 3), (3,), "prox_cg2"),                       # no blocks, parameter
  ]
  with pp.planner.recording() as plans:
    for layer, split, x_shape, k_shape, b_shape, mode in cases:
      x, kernel = jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.normal(size=k_shape))
      bias = jnp.asarray(rng.normal(size=b_shape))
      target = jnp.asarray(rng.normal(size=layer(x, kernel, bias, mode="gradient").shape))

      def direction(x, target, axis_name):
        loss = lambda k, b: 0.5 * jnp.mean(
            (layer(x, k, b, mode=mode, tau_prox=0.5, axis_name=axis_name) - target) ** 2)
        return jax.grad(loss, argnums=(0, 1))(kernel, bias)

      want = jax.jit(direction, static_argnums=2)(x, target, None)
      shards = lambda a: jnp.moveaxis(a.reshape(*a.shape[:split], 4, -1, *a.shape[split + 1:]),
                                      split, 0)
      got = jax.jit(jax.vmap(lambda x, t: direction(x, t, "data"), axis_name="data"))(
          shards(x), shards(target))
      for d, w in zip(got, want):  # every shard gets the direction of the global batch
        for shard in d:
          np.testing.assert_allclose(shard, w, rtol=2e-5, atol=1e-6)
  assert {plan.system for _, plan in plans} == {"batch", "parameter"}


# ------------------------------------------------------------------ precision, dtypes


PRECISION_CASES = {
    "per-head": (lambda x, k, b, **kw: pp.einsum("btnh,nhk->btnk", x, k, b, **kw),
                 (2, 3, 2, 4), (2, 4, 3), (2, 3)),
    "batch-dims": (lambda x, k, b, **kw: pp.dense_general(x, k, b, batch_dims=(0,), **kw),
                   (2, 6, 4), (2, 4, 3), (2, 3)),
    "mha-out": (lambda x, k, b, **kw: pp.einsum("btnh,nhd->btd", x, k, b, **kw),
                (2, 3, 2, 4), (2, 4, 5), (5,)),
}
PRECISION_PLANS = {"prox_exact": [None, pp.Plan("batch", "inverse", True),
                                  pp.Plan("parameter", "cholesky")],
                   "prox_cg3": [None, pp.Plan("batch", "eig_cg"), pp.Plan("parameter", "cg")]}


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRECISION_CASES)
def test_direction_products_run_at_solve_precision(name):
  # Under bfloat16 default matmuls (a TPU's default), every product that computes the
  # direction carries solve_precision; the forward pass and the input cotangent keep the
  # user's precision: exactly as many products as the plain layer's forward and input vjp.
  layer, x_shape, k_shape, b_shape = PRECISION_CASES[name]
  x, k, b = jnp.ones(x_shape), jnp.ones(k_shape), jnp.ones(b_shape)
  highest = jax.lax.Precision.HIGHEST
  for user in (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGH):
    plain = lambda x: jnp.sum(layer(x, k, b, mode="gradient", precision=user) ** 2)
    user_products = len(product_precisions(jax.make_jaxpr(jax.grad(plain))(x)))
    for mode, plans in PRECISION_PLANS.items():
      for plan in plans:
        loss = lambda x, k, b: jnp.sum(layer(x, k, b, mode=mode, precision=user, plan=plan) ** 2)
        with jax.default_matmul_precision("bfloat16"):
          found = product_precisions(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, k, b))
        assert found.count(user) == user_products, (mode, plan, user, found)
        assert found.count(highest) == len(found) - user_products > 0, (mode, plan, found)


def test_bfloat16_parameters_solve_in_float32():
  # The direction of bfloat16 parameters is the float32 direction, rounded once.
  x = jax.random.normal(jax.random.key(1), (3, 5, 2, 4))
  c = jax.random.normal(jax.random.key(2), (3, 5, 2, 3))
  directions = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    layer = pp.Einsum("btnh,nhk->btnk", (2, 4, 3), (2, 3), mode="prox_exact", param_dtype=dtype,
                      rngs=nnx.Rngs(0))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(c.astype(dtype) * m(x.astype(dtype)))))(layer)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(grads))
    directions[dtype] = ravel_pytree(jax.tree.map(lambda a: a.astype(jnp.float32), grads))[0]
  assert rel_err(directions[jnp.bfloat16], directions[jnp.float32]) <= 2e-2


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("equation,kernel_shape,x_shape,match", [
    ("btd,dk->bk", (4, 3), (2, 5, 4), "'t' are in one operand only"),      # summed input index
    ("bd,dkj->bk", (4, 3, 2), (2, 4), "'j' are in one operand only"),      # summed kernel index
    ("bdd,dk->bk", (4, 3), (2, 4, 4), "index repeated in 'bdd'"),
    ("bd,d...->b...", (4, 3), (2, 4), "'...' must appear in x and out"),
    ("...d,dk->k", (4, 3), (2, 4), "'...' must appear in x and out"),
    ("bd,dk", (4, 3), (2, 4), "explicit with two operands"),
    ("bd,dk->bkz", (4, 3), (2, 4), "'z' are in one operand only"),
])
def test_unsupported_equations_point_at_prox_module(equation, kernel_shape, x_shape, match):
  with pytest.raises(ValueError, match=match) as info:
    pp.einsum(equation, jnp.ones(x_shape), jnp.ones(kernel_shape))
  assert "pp.prox_module(nnx.Einsum)" in str(info.value)


def test_bad_shapes_and_options_raise_clearly():
  with pytest.raises(ValueError, match="gives kernel 2 dims; it has 3"):
    pp.einsum("bd,dk->bk", jnp.ones((2, 4)), jnp.ones((4, 3, 1)))
  with pytest.raises(ValueError, match=r"must have the sizes of the kernel axes"):
    pp.einsum("bd,dk->bk", jnp.ones((2, 5)), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"one value per output feature and block, 6"):
    pp.einsum("btnh,nhk->btnk", jnp.ones((2, 3, 2, 4)), jnp.ones((2, 4, 3)), jnp.ones(5))
  with pytest.raises(ValueError, match=r"bias of shape \(\*batch, \*features\) = \(2, 3\)"):
    pp.dense_general(jnp.ones((2, 5, 4)), jnp.ones((2, 4, 3)), jnp.ones(3), batch_dims=0)
  with pytest.raises(ValueError, match="both contracted and a batch axis"):
    pp.dense_general(jnp.ones((2, 4)), jnp.ones((2, 3)), batch_dims=1)
  with pytest.raises(ValueError, match="must be axes of an input with 2 dims"):
    pp.dense_general(jnp.ones((2, 4)), jnp.ones((4, 3)), axis=2)
  with pytest.raises(ValueError, match=r"nnx.LinearGeneral\) \(matrix-free"):
    pp.LinearGeneral(4, 3, dot_general=jax.lax.dot_general, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"does not take einsum_op.*nnx.Einsum\)"):
    pp.Einsum("bd,dk->bk", (4, 3), einsum_op=lambda *a, **k: jnp.einsum(*a, **k),
              rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'\\.\\.\\.' must appear"):
    pp.Einsum("bd,dk->bk", (4, 3), rngs=nnx.Rngs(0))(jnp.ones((2, 4)), "bd,d...->b...")
  layer = pp.LinearGeneral(4, 3, rngs=nnx.Rngs(0))  # out_sharding: as flax's (no mesh: no-op)
  np.testing.assert_array_equal(layer(jnp.ones((2, 4)), out_sharding=("data",)),
                                layer(jnp.ones((2, 4))))
  with pytest.raises(ValueError, match="Unknown ProxProp mode 'prox'"):
    pp.Einsum("bd,dk->bk", (4, 3), mode="prox", rngs=nnx.Rngs(0))


# Under jit with the batch sharded over a mesh with Explicit axes (jax.make_mesh's default),
# a reshape of a sharded array needs its output sharding: the layers must keep the axes
# apart outside the backward rule. Then shard_map with check_vma=True. The device count is
# fixed when JAX starts, hence a subprocess with 4 CPU devices.
EXPLICIT_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import proxprop_jax as pp
mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
rng = np.random.default_rng(0)
cases = [  # layer, x shape, kernel shape, bias shape, x's sharded axis, mode
    (lambda x, k, b, **kw: pp.einsum("btnh,nhd->btd", x, k, b, **kw),
     (8, 3, 2, 4), (2, 4, 5), (5,), P("data"), "prox_cg2"),
    (lambda x, k, b, **kw: pp.dense_general(x, k, b, batch_dims=(0,), **kw),
     (2, 8, 4), (2, 4, 3), (2, 3), P(None, "data"), "prox_cg2"),
    (lambda x, k, b, **kw: pp.dense_general(x, k, b, **kw),
     (8, 3, 6), (6, 2, 4), (2, 4), P("data"), "prox_exact"),
]
worst = 0.0
for layer, x_shape, k_shape, b_shape, spec, mode in cases:
  x, k, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, k_shape, b_shape))
  t = jnp.asarray(rng.normal(size=layer(x, k, b, mode="gradient").shape), jnp.float32)
  def step(x, t, k, b):
    loss = lambda k, b, x: 0.5 * jnp.mean((layer(x, k, b, mode=mode) - t) ** 2)
    return layer(x, k, b, mode=mode), jax.grad(loss, argnums=(0, 1))(k, b, x)
  want = jax.jit(step)(x, t, k, b)
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
  got = jax.jit(step)(put(x, spec), put(t, spec), put(k, P()), put(b, P()))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    worst = max(worst, float(np.abs(g - w).max() / np.abs(w).max()))
# shard_map with check_vma=True (autodiff sums the replicated parameters' cotangents) on
# an Auto mesh; the rows of the batch-axis layer (its second axis) split: batch space.
auto = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
layer = cases[1][0]
x, k, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 8, 12), (2, 12, 3), (2, 3)))
t = jnp.asarray(rng.normal(size=layer(x, k, b, mode="gradient").shape), jnp.float32)
loss = lambda k, b, x, t, axis: 0.5 * jnp.mean(
    (layer(x, k, b, mode="prox_exact", axis_name=axis) - t) ** 2)
want = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=4)(k, b, x, t, None)
per_device = lambda k, b, x, t: jax.grad(
    lambda k, b: jax.lax.pmean(loss(k, b, x, t, "data"), "data"), argnums=(0, 1))(k, b)
got = jax.jit(jax.shard_map(per_device, mesh=auto, in_specs=(P(), P(), P(None, "data"),
                                                              P(None, "data")),
                            out_specs=P(), check_vma=True))(k, b, x, t)
for g, w in zip(got, want):
  worst = max(worst, float(np.abs(g - w).max() / np.abs(w).max()))
print(worst)
"""


def test_jit_on_an_explicit_mesh_and_shard_map_give_the_one_device_results(tmp_path):
  script = tmp_path / "explicit_mesh.py"
  script.write_text(EXPLICIT_MESH_SCRIPT)
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("JAX_ENABLE_X64", None)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert float(out.stdout.split()[-1]) <= 1e-5  # float32: outputs and directions
