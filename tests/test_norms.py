"""`pp.norm_affine` and the NNX norm layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm):
flax's forward pass, parameters and running statistics; the direction against float64
NumPy per feature (``A_f = [x̂[:, f], 1]`` from a NumPy normalisation); every plan;
several devices (vmap here, 4 fake devices in a subprocess); bfloat16."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import proxprop_jax as pp
from tests import helpers, reference

MODES = ["gradient", "prox_exact", "prox_cg1", "prox_cg3"]
ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture
def x64():
  """float64 with standard dtype promotion: flax's statistics code promotes to float32
  (``jnp.promote_types(dtype, float32)``), which strict promotion rejects for float64."""
  with jax.enable_x64(True):
    yield


def _randomise(*layers, seed=0):
  """Gives every layer the same random scale and bias (flax inits them to 1 and 0)."""
  rng = np.random.default_rng(seed)
  for name in ("scale", "bias"):
    if getattr(layers[0], name, None) is None:
      continue
    value = rng.normal(size=getattr(layers[0], name).shape)
    for layer in layers:
      variable = getattr(layer, name)
      variable[...] = jnp.asarray(value, variable[...].dtype)


def _variables(layer, kind):
  return nnx.state(layer, kind)


def _assert_same_variables(ours, theirs, kind):
  a, b = _variables(ours, kind), _variables(theirs, kind)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(u, v)


MIRRORS = [
    ("LayerNorm", (6,), {}, (2, 3, 6)),
    ("LayerNorm", (6,), {"use_scale": False, "epsilon": 1e-3}, (2, 3, 6)),
    ("LayerNorm", (18,), {"reduction_axes": (-2, -1), "feature_axes": (-2, -1)}, (2, 3, 6)),
    ("LayerNorm", (6,), {"param_dtype": jnp.bfloat16}, (2, 3, 6)),
    ("RMSNorm", (6,), {}, (2, 3, 6)),
    ("RMSNorm", (6,), {"dtype": jnp.bfloat16, "scale_init": nnx.initializers.zeros}, (2, 3, 6)),
    ("GroupNorm", (6, 3), {}, (2, 4, 4, 6)),
    ("GroupNorm", (6, None, 2), {"use_bias": False}, (2, 5, 6)),
    ("BatchNorm", (6,), {}, (4, 3, 6)),
    ("BatchNorm", (3,), {"axis": 1, "momentum": 0.5}, (4, 3, 2)),
    ("BatchNorm", (6,), {"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16}, (4, 6)),
    ("BatchNorm", (6,), {"use_fast_variance": False, "use_scale": False}, (5, 6)),
]


@pytest.mark.parametrize("name,args,kwargs,x_shape", MIRRORS)
def test_mirrors_the_flax_layer(name, args, kwargs, x_shape):
  ours = getattr(pp, name)(*args, mode="prox_exact", rngs=nnx.Rngs(0), **kwargs)
  theirs = getattr(nnx, name)(*args, rngs=nnx.Rngs(0), **kwargs)
  _assert_same_variables(ours, theirs, nnx.Param)  # names, shapes, dtypes, init
  _randomise(ours, theirs)
  x = jax.random.normal(jax.random.key(1), x_shape) * 3 + 1
  calls = [{}, {"use_running_average": True}] if name == "BatchNorm" else [{}]
  for call in calls:  # BatchNorm: training statistics, then the running averages
    got, want = ours(x, **call), theirs(x, **call)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-2 if want.dtype == jnp.bfloat16 else 2e-6
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=tol,
                               atol=tol * float(jnp.abs(want).max()))
    _assert_same_variables(ours, theirs, nnx.BatchStat)


def test_batchnorm_running_statistics_after_a_jitted_step():
  ours = pp.BatchNorm(4, mode="prox_cg2", momentum=0.8, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(4, momentum=0.8, rngs=nnx.Rngs(0))
  step = nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m))
  for seed in (1, 2):
    x = jax.random.normal(jax.random.key(seed), (8, 4)) * 2 + seed
    step(ours, x), step(theirs, x)
  _assert_same_variables(ours, theirs, nnx.BatchStat)
  assert not np.allclose(ours.mean[...], 0)  # the statistics did move
  ours.eval(), theirs.eval()
  np.testing.assert_allclose(ours(x), theirs(x), rtol=2e-6, atol=2e-6)


# ------------------------------------------------------------------ the direction


def _standardise(x, axes, eps, center=True):
  mean = x.mean(axes, keepdims=True) if center else 0.0
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axes, keepdims=True) + eps)


def _group_standardise(x, groups, eps):
  g = x.reshape(*x.shape[:-1], groups, -1)
  axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
  return _standardise(g, axes, eps).reshape(x.shape)


# (layer, layer args, its kwargs, x shape, NumPy x̂ of x for that layer, feature axes)
DIRECTIONS = {
    "LayerNorm": ("LayerNorm", (5,), {}, (3, 4, 5),
                  lambda x, m: _standardise(x, (2,), m.epsilon), (2,)),
    "LayerNorm-2-axes": ("LayerNorm", (20,), {"reduction_axes": (1, 2), "feature_axes": (1, 2)},
                         (3, 4, 5), lambda x, m: _standardise(x, (1, 2), m.epsilon), (1, 2)),
    "RMSNorm": ("RMSNorm", (5,), {}, (3, 4, 5),
                lambda x, m: _standardise(x, (2,), m.epsilon, center=False), (2,)),
    "GroupNorm": ("GroupNorm", (6, 2), {}, (2, 3, 3, 6),
                  lambda x, m: _group_standardise(x, 2, m.epsilon), (3,)),
    "BatchNorm-train": ("BatchNorm", (4,), {}, (6, 2, 4),
                        lambda x, m: _standardise(x, (0, 1), m.epsilon), (2,)),
    "BatchNorm-eval": ("BatchNorm", (4,), {"use_running_average": True}, (6, 2, 4),
                       lambda x, m: (x - np.asarray(m.mean[...], np.float64))
                       / np.sqrt(np.asarray(m.var[...], np.float64) + m.epsilon), (2,)),
}


def _by_feature(a, feature_axes):
  """``(rows, F)``: the features last, flattened in C order."""
  a = np.moveaxis(a, feature_axes, tuple(range(-len(feature_axes), 0)))
  return a.reshape(-1, int(np.prod(a.shape[a.ndim - len(feature_axes):])))


def _reference(xhat, c, feature_axes, use_scale, use_bias, mode, lam):
  """``(F, p)``: each feature's ``reference.direction`` with ``A_f = [x̂_f, 1]``."""
  xhat, c = _by_feature(xhat, feature_axes), _by_feature(c, feature_axes)
  out = []
  for f in range(xhat.shape[1]):
    a = np.stack([xhat[:, f]] * use_scale + [np.ones(len(xhat))] * use_bias, axis=1)
    out.append(reference.direction(a, c[:, f:f + 1], mode, lam)[:, 0])
  return np.array(out)


@pytest.mark.usefixtures("x64")
# flax writes BatchNorm's float64 batch statistics into its float32 running averages.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.parametrize("mode", helpers.gpu_marked(MODES, "prox_exact", "prox_cg3"))
@pytest.mark.parametrize("case", DIRECTIONS)
def test_direction_matches_numpy(case, mode):
  # The loss Σ C ⊙ layer(x) has g = C; x̂ and A_f = [x̂[:, f], 1] are NumPy's.
  name, args, kwargs, x_shape, normalise, feature_axes = DIRECTIONS[case]
  rng = np.random.default_rng(2)
  tau = 0.4
  layer = getattr(pp, name)(*args, mode=mode, tau_prox=tau, param_dtype=jnp.float64,
                            rngs=nnx.Rngs(0), **kwargs)
  _randomise(layer)
  if name == "BatchNorm":
    # flax keeps the running statistics in float32 whatever param_dtype is.
    layer.mean[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    layer.var[...] = jnp.asarray(rng.uniform(0.5, 2, size=4), jnp.float32)
  x = jnp.asarray(rng.normal(size=x_shape) * 2 + 1)
  c = jnp.asarray(rng.normal(size=x_shape))
  xhat = normalise(np.asarray(x), layer)  # before the call updates BatchNorm's statistics
  grads = nnx.grad(lambda m: jnp.sum(c * m(x)))(layer)
  use_bias = getattr(layer, "bias", None) is not None
  want = _reference(xhat, np.asarray(c), feature_axes, True, use_bias, mode, 1 / tau)
  got = np.stack([grads[n][...] for n in ("scale", "bias")[:1 + use_bias]], axis=1)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.abs(want).max())


# Every plan with scale and bias; scale only and bias only (A_f without x̂: an empty
# matrix in batch space) with one plan per system.
PLANS = [(pp.Plan(system, solver), "prox_exact" if solver in ("cholesky", "inverse") else
          "prox_cg1", use_scale, use_bias)
         for system in ("parameter", "batch") for solver in ("cholesky", "inverse", "cg", "eig_cg")
         for use_scale, use_bias in [(True, True), (True, False), (False, True)]
         if (use_scale and use_bias) or (system, solver) in [("parameter", "cholesky"),
                                                               ("batch", "eig_cg")]]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("plan,mode,use_scale,use_bias", PLANS,
                         ids=[f"{p.system}-{p.solver}-{s:d}{b:d}" for p, _, s, b in PLANS])
def test_every_plan_gives_the_direction(plan, mode, use_scale, use_bias):
  rng = np.random.default_rng(3)
  x, c = jnp.asarray(rng.normal(size=(3, 2, 4))), jnp.asarray(rng.normal(size=(3, 2, 4)))
  params = [jnp.asarray(rng.normal(size=4)) if use else None for use in (use_scale, use_bias)]
  loss = lambda s, b: jnp.sum(c * pp.norm_affine(x, s, b, feature_axes=(-1,), mode=mode,
                                                  tau_prox=2.0, plan=plan))
  grads = jax.grad(loss, argnums=(0, 1))(*params)
  got = np.stack([g for g in grads if g is not None], axis=1)
  want = _reference(np.asarray(x), np.asarray(c), (2,), use_scale, use_bias, mode, 0.5)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.abs(want).max())


def test_the_planner_takes_the_parameter_space():
  x = jnp.ones((16, 8))
  with pp.planner.recording() as plans:
    jax.grad(lambda s: jnp.sum(pp.norm_affine(x, s, s, mode="prox_cg3")))(jnp.ones(8))
  [(problem, plan)] = plans
  assert (problem.blocks, problem.rows, problem.params, problem.columns) == (8, 16, 2, 1)
  assert plan.system == "parameter"


def test_batchnorm_over_an_axis_is_the_global_batch_layer(mode="prox_cg2"):
  # vmap with axis_name runs the collectives like devices would: 4 shards of 8 examples.
  # Statistics (flax's pmean) and the direction (Gram psum, Aᵀg pmean) are the global ones.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(8, 2, 3)) * 2 + 1, jnp.float32)
  target = jnp.asarray(rng.normal(size=(8, 2, 3)), jnp.float32)
  loss = lambda m, x, t: 0.5 * jnp.mean(jnp.sum((m(x) - t) ** 2, -1))
  full = pp.BatchNorm(3, mode=mode, tau_prox=0.5, rngs=nnx.Rngs(0))
  sharded = pp.BatchNorm(3, mode=mode, tau_prox=0.5, axis_name="data", rngs=nnx.Rngs(0))
  assert sharded.stats_axis_name == "data"
  _randomise(full, sharded)
  want = nnx.grad(loss)(full, x, target)
  graphdef, state = nnx.split(sharded)

  def per_shard(state, x, t):
    model = nnx.merge(graphdef, state)
    grads = nnx.grad(loss)(model, x, t)
    return grads, nnx.state(model, nnx.BatchStat)

  shards = lambda a: a.reshape(4, 2, *a.shape[1:])
  grads, stats = jax.vmap(per_shard, in_axes=(None, 0, 0), axis_name="data")(
      state, shards(x), shards(target))
  for name in ("scale", "bias"):
    for d in grads[name][...]:  # every shard gets the direction of the global batch
      np.testing.assert_allclose(d, want[name][...], rtol=2e-5, atol=1e-6)
  for name in ("mean", "var"):
    for s in stats[name][...]:
      np.testing.assert_allclose(s, getattr(full, name)[...], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,args", [("LayerNorm", (6,)), ("BatchNorm", (6,))])
def test_bfloat16_parameters(name, args):
  x = jax.random.normal(jax.random.key(5), (4, 3, 6)) * 2
  layer = getattr(pp, name)(*args, mode="prox_cg2", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  float_layer = getattr(pp, name)(*args, mode="prox_cg2", rngs=nnx.Rngs(0))
  _randomise(layer, float_layer)
  for n in ("scale", "bias"):  # the same (bfloat16-representable) values in both
    if getattr(layer, n, None) is not None:
      getattr(float_layer, n)[...] = getattr(layer, n)[...].astype(jnp.float32)
  loss = lambda m: jnp.sum(jnp.sin(m(x).astype(jnp.float32)))
  got, want = nnx.grad(loss)(layer), nnx.grad(loss)(float_layer)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=5e-2,
                               atol=5e-2 * float(jnp.abs(w).max()))


def test_bad_input_raises():
  x, s = jnp.ones((2, 3)), jnp.ones(3)
  with pytest.raises(ValueError, match="feature_axes: distinct axes of x"):
    pp.norm_affine(x, s, feature_axes=2)
  with pytest.raises(ValueError, match="feature_axes: distinct axes of x"):
    pp.norm_affine(x, s, feature_axes=(1, -1))
  with pytest.raises(ValueError, match=r"scale of shape \(3,\)"):
    pp.norm_affine(x, jnp.ones(2))
  with pytest.raises(ValueError, match="solver 'diagonal'"):
    pp.norm_affine(x, s, mode="prox_exact", plan=pp.Plan("parameter", "diagonal"))
  with pytest.raises(ValueError, match="Unknown ProxProp mode"):
    pp.LayerNorm(3, mode="prox", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tau_prox must be"):
    pp.BatchNorm(3, tau_prox=0.0, rngs=nnx.Rngs(0))


def test_shard_map_and_sharded_jit_give_the_global_direction():
  # 4 fake devices in a subprocess (tests/_norms_devices_worker.py), pp.embed included.
  # A device's own Aᵀg, or one averaged where autodiff already summed it, is off by O(1).
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(), JAX_PLATFORMS="cpu",
             OPENBLAS_NUM_THREADS="1")
  env.pop("JAX_ENABLE_X64", None)
  out = subprocess.run([sys.executable, "-m", "tests._norms_devices_worker"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  errors = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(errors) == 5
  for case, err in errors.items():
    assert err < 1e-5, (case, err)
