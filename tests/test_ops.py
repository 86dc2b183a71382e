"""`pp.dense`, `pp.conv` and `pp.proximal` against float64 NumPy, jax.grad and matrix-free CG."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import proxprop_jax as pp
from tests import reference
from tests.helpers import flat, gpu_marked, matrix_free_direction, product_precisions, rel_err

MODES = ["gradient", "prox_exact", "prox_cg1", "prox_cg2", "prox_cg5"]
CONV_MODES = ["gradient", "prox_exact", "prox_cg2"]  # compile time: conv cases are many
RTOL = 1e-8


def _param_cotangents(layer_fn, x, kernel, bias, target):
  """Cotangents of ``½‖layer(x) − target‖²`` for (x, kernel, bias), and ``g``."""
  loss = lambda x, k, b: 0.5 * jnp.sum((layer_fn(x, k, b) - target) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, kernel, bias)
  return grads, layer_fn(x, kernel, bias) - target


# ------------------------------------------------------------------------------ dense


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x_shape", [(7, 12), (30, 5), (2, 3, 6)], ids=["batch-space",
                                                                       "param-space", "3d"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_matches_numpy(mode, x_shape, use_bias):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape))
  kernel = jnp.asarray(rng.normal(size=(x_shape[-1], 4)))
  bias = jnp.asarray(rng.normal(size=4)) if use_bias else None
  target = jnp.asarray(rng.normal(size=(*x_shape[:-1], 4)))
  layer = functools.partial(pp.dense, mode=mode, tau_prox=0.7)
  (dx, dk, db), g = _param_cotangents(layer, x, kernel, bias, target)
  a = reference.with_ones(np.asarray(x).reshape(-1, x_shape[-1]), use_bias)
  want = reference.direction(a, np.asarray(g).reshape(-1, 4), mode, 1 / 0.7)
  assert rel_err(flat(dk, db), want) <= RTOL
  np.testing.assert_allclose(dx, np.asarray(g) @ np.asarray(kernel).T, rtol=1e-12)
  assert dk.dtype == kernel.dtype and dk.shape == kernel.shape
  assert (db is None) == (bias is None)


# ------------------------------------------------------------------------------- conv

CONV_CASES = [
    # (x shape, window, strides, padding, dilation)
    ((2, 6, 5, 3), (3, 3), (1, 1), "SAME", (1, 1)),
    ((2, 6, 5, 3), (3, 2), (1, 1), "VALID", (1, 1)),
    ((2, 7, 6, 2), (3, 3), (2, 2), "SAME", (1, 1)),
    ((2, 7, 6, 2), (3, 3), (2, 1), "VALID", (1, 1)),
    ((2, 7, 7, 2), (3, 3), (1, 1), "SAME", (2, 2)),
    ((2, 6, 6, 2), (2, 3), (1, 2), ((1, 0), (2, 1)), (1, 2)),
    ((3, 9, 2), (4,), (1,), "SAME", (1,)),
    ((3, 9, 2), (3,), (2,), "VALID", (2,)),
    ((1, 4, 5, 4, 2), (2, 3, 2), (1, 1, 1), "SAME", (1, 1, 1)),
    ((1, 5, 4, 4, 2), (3, 2, 2), (2, 1, 1), "VALID", (1, 1, 1)),
    ((1, 2, 2, 9), (2, 2), (1, 1), "VALID", (1, 1)),  # few rows: batch-space solve
]


def _conv_reference_matrix(x_shape, x, window, strides, padding, dilation, use_bias):
  n = len(window)
  if padding == "SAME":
    pads = reference.same_pads(x_shape[1:-1], window, strides, dilation)
  elif padding == "VALID":
    pads = [(0, 0)] * n
  else:
    pads = list(padding)
  p, out = reference.patches(np.asarray(x), window, strides, pads, dilation)
  return reference.with_ones(p, use_bias), out


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", CONV_MODES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{len(c[1])}d-{c[1]}-s{c[2]}-"
                         f"{c[3] if isinstance(c[3], str) else 'explicit'}-d{c[4]}")
def test_conv_matches_numpy(mode, case):
  x_shape, window, strides, padding, dilation = case
  rng = np.random.default_rng(1)
  cin, cout = x_shape[-1], 3
  for use_bias in (True, False):
    x = jnp.asarray(rng.normal(size=x_shape))
    kernel = jnp.asarray(rng.normal(size=(*window, cin, cout)))
    bias = jnp.asarray(rng.normal(size=cout)) if use_bias else None
    layer = functools.partial(pp.conv, strides=strides, padding=padding, rhs_dilation=dilation,
                              mode=mode, tau_prox=0.5)
    a, out = _conv_reference_matrix(x_shape, x, window, strides, padding, dilation, use_bias)
    # Forward pass: A θ.
    np.testing.assert_allclose(
        np.asarray(layer(x, kernel, bias)).reshape(-1, cout),
        a @ flat(kernel, bias), rtol=1e-10, atol=1e-10)
    target = jnp.asarray(rng.normal(size=(x_shape[0], *out, cout)))
    (dx, dk, db), g = _param_cotangents(layer, x, kernel, bias, target)
    want = reference.direction(a, np.asarray(g).reshape(-1, cout), mode, 2.0)
    assert rel_err(flat(dk, db), want) <= RTOL, use_bias
    plain = lambda x: pp.conv(x, kernel, bias, strides=strides, padding=padding,
                              rhs_dilation=dilation, mode="gradient")
    np.testing.assert_allclose(dx, jax.vjp(plain, x)[1](g)[0], rtol=1e-12)


@pytest.mark.usefixtures("x64")
def test_conv_flattens_extra_batch_dims():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 5, 2)))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)))
  f = lambda x, k: jnp.sum(jnp.sin(pp.conv(x, k, mode="prox_exact")))
  got = jax.grad(f, argnums=(0, 1))(x, kernel)
  want = jax.grad(f, argnums=(0, 1))(x.reshape(6, 5, 5, 2), kernel)
  assert pp.conv(x, kernel).shape == (2, 3, 5, 5, 4)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-12)
  np.testing.assert_allclose(got[0].reshape(6, 5, 5, 2), want[0], rtol=1e-12)


# ------------------------------------------------- gradient mode, input cotangent, descent


def _dense_and_conv_problems(rng):
  yield (pp.dense, {}, jnp.asarray(rng.normal(size=(6, 9))),
         jnp.asarray(rng.normal(size=(9, 4))), jnp.asarray(rng.normal(size=4)))
  yield (pp.dense, {}, jnp.asarray(rng.normal(size=(40, 5))),
         jnp.asarray(rng.normal(size=(5, 4))), jnp.asarray(rng.normal(size=4)))
  yield (pp.conv, {"strides": 2}, jnp.asarray(rng.normal(size=(3, 6, 6, 2))),
         jnp.asarray(rng.normal(size=(3, 3, 2, 4))), jnp.asarray(rng.normal(size=4)))


def _loss(op, kw, mode, x, k, b):
  return jnp.mean(jnp.tanh(op(x, k, b, mode=mode, tau_prox=0.3, **kw)) ** 2)


@pytest.mark.usefixtures("x64")
def test_gradient_mode_is_jax_grad_and_input_cotangent_is_backprop():
  rng = np.random.default_rng(3)
  for op, kw, x, k, b in _dense_and_conv_problems(rng):
    plain = lambda x, k, b: jnp.mean(jnp.tanh(
        (x @ k + b) if op is pp.dense else jax.lax.conv_general_dilated(
            x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b) ** 2)
    want = jax.grad(plain, argnums=(0, 1, 2))(x, k, b)
    for mode in MODES:
      got = jax.grad(functools.partial(_loss, op, kw, mode), argnums=(0, 1, 2))(x, k, b)
      np.testing.assert_allclose(got[0], want[0], rtol=1e-12, atol=1e-15)  # input cotangent
      if mode == "gradient":
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-12, atol=1e-15)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("seed", range(5))
def test_direction_is_a_descent_direction(seed):
  rng = np.random.default_rng(seed)
  for op, kw, x, k, b in _dense_and_conv_problems(rng):
    grad = jax.grad(functools.partial(_loss, op, kw, "gradient"), argnums=(1, 2))(x, k, b)
    for mode in MODES[1:]:
      d = jax.grad(functools.partial(_loss, op, kw, mode), argnums=(1, 2))(x, k, b)
      inner = sum(float(jnp.vdot(di, gi)) for di, gi in zip(d, grad))
      assert inner > 0, (mode, inner)


# --------------------------------------------------------------------- CG properties


@pytest.mark.usefixtures("x64")
def test_cg_reaches_exact_after_as_many_steps_as_distinct_eigenvalues():
  # A = Q₁ diag(s) Q₂ᵀ with 3 distinct singular values: AᵀA + λI has 3 eigenvalues.
  rng = np.random.default_rng(4)
  q1, _ = np.linalg.qr(rng.normal(size=(20, 6)))
  q2, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  x = jnp.asarray(q1 @ np.diag([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]) @ q2.T)
  k, target = jnp.asarray(rng.normal(size=(6, 5))), jnp.asarray(rng.normal(size=(20, 5)))
  direction = lambda mode: _param_cotangents(
      functools.partial(pp.dense, mode=mode, tau_prox=0.5), x, k, None, target)[0][1]
  exact = direction("prox_exact")
  assert rel_err(direction("prox_cg2"), exact) > 1e-3
  assert rel_err(direction("prox_cg3"), exact) <= 1e-10


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("x_shape", [(8, 15), (40, 6)])
def test_each_cg_step_lowers_the_error_in_the_system_norm(x_shape):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=x_shape) * rng.uniform(0.1, 3, size=x_shape[-1]))
  k, b = jnp.asarray(rng.normal(size=(x_shape[-1], 3))), jnp.asarray(rng.normal(size=3))
  target = jnp.asarray(rng.normal(size=(x_shape[0], 3)))
  a = reference.with_ones(np.asarray(x), True)
  m = a.T @ a + 2.0 * np.eye(a.shape[1])
  direction = lambda mode: flat(*_param_cotangents(
      functools.partial(pp.dense, mode=mode, tau_prox=0.5), x, k, b, target)[0][1:])
  exact = direction("prox_exact")
  errors = [np.einsum("ic,ij,jc->c", e, m, e) for e in
            (direction(f"prox_cg{n}") - exact for n in range(1, 7))]
  errors.insert(0, np.einsum("ic,ij,jc->c", exact, m, exact))  # N = 0: D = 0
  assert np.all(np.diff(np.stack(errors), axis=0) < 0)


# ------------------------------------------------------- fast paths vs matrix-free CG


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("steps", gpu_marked([1, 3, 10], 3))
def test_fast_paths_match_matrix_free_cg(steps):
  rng = np.random.default_rng(6)
  problems = [
      (pp.dense, {}, (9, 14), (14, 3)),            # batch space
      (pp.dense, {}, (50, 6), (6, 3)),             # parameter space
      (pp.conv, {"padding": "SAME"}, (2, 6, 6, 3), (3, 3, 3, 4)),
      (pp.conv, {"strides": 2, "padding": "VALID"}, (2, 7, 7, 2), (3, 3, 2, 4)),
  ]
  for op, kw, x_shape, k_shape in problems:
    x, k = jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.normal(size=k_shape))
    b = jnp.asarray(rng.normal(size=k_shape[-1]))
    plain = functools.partial(op, mode="gradient", **kw)
    g = jnp.asarray(rng.normal(size=plain(x, k, b).shape))
    # Jitted: one compile per problem instead of one per eager operation.
    got = jax.jit(lambda x, k, b, g: jax.vjp(
        lambda k, b: op(x, k, b, mode=f"prox_cg{steps}", tau_prox=0.5, **kw), k, b)[1](g))(
            x, k, b, g)
    want = jax.jit(matrix_free_direction, static_argnums=(0, 5, 6))(plain, x, k, b, g, 2.0, steps)
    assert rel_err(flat(*got), flat(*want)) <= RTOL, (op.__name__, x_shape)


# -------------------------------------------------------------------------- proximal


def _dense_fn(params, x):
  return x @ params["kernel"] + params["bias"]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["gradient", "prox_exact"])
@pytest.mark.parametrize("rows", [6, 30])
def test_proximal_agrees_with_dense(mode, rows):
  rng = np.random.default_rng(7)
  x, g = jnp.asarray(rng.normal(size=(rows, 8))), jnp.asarray(rng.normal(size=(rows, 3)))
  params = {"kernel": jnp.asarray(rng.normal(size=(8, 3))), "bias": jnp.asarray(rng.normal(size=3))}
  got = jax.vjp(pp.proximal(_dense_fn, mode=mode, tau_prox=0.4), params, x)[1](g)
  want = jax.vjp(lambda p, x: pp.dense(x, p["kernel"], p["bias"], mode=mode, tau_prox=0.4),
                 params, x)[1](g)
  for leaf_got, leaf_want in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(leaf_got, leaf_want) <= RTOL


@pytest.mark.usefixtures("x64")
def test_proximal_conv_agrees_with_conv_exact():
  rng = np.random.default_rng(8)
  x, k = jnp.asarray(rng.normal(size=(2, 5, 5, 2))), jnp.asarray(rng.normal(size=(3, 3, 2, 3)))
  fn = lambda k, x: pp.conv(x, k, mode="gradient", strides=2)
  g = jnp.asarray(rng.normal(size=fn(k, x).shape))
  got = jax.vjp(pp.proximal(fn, mode="prox_exact", tau_prox=2.0), k, x)[1](g)
  want = jax.vjp(lambda k, x: pp.conv(x, k, strides=2, mode="prox_exact", tau_prox=2.0), k, x)[1](g)
  assert rel_err(got[0], want[0]) <= RTOL and rel_err(got[1], want[1]) <= 1e-12


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("steps", [1, 4])
def test_proximal_cg_is_one_cg_over_the_whole_pytree(steps):
  rng = np.random.default_rng(9)
  x, g = jnp.asarray(rng.normal(size=(10, 5))), jnp.asarray(rng.normal(size=(10, 3)))
  params = {"kernel": jnp.asarray(rng.normal(size=(5, 3))), "bias": jnp.asarray(rng.normal(size=3))}
  got = jax.vjp(pp.proximal(_dense_fn, mode=f"prox_cg{steps}", tau_prox=0.5), params, x)[1](g)[0]
  # θ = vec([W; b]) in ravel_pytree order (bias leaf first, then kernel): block-diagonal system.
  a = reference.with_ones(np.asarray(x), True)
  m1 = a.T @ a + 2.0 * np.eye(6)
  m = np.kron(m1, np.eye(3))  # rows of [W; b] flattened row-major
  rhs = (a.T @ np.asarray(g)).ravel()
  want = reference.cg(m, rhs, steps).reshape(6, 3)
  assert rel_err(flat(got["kernel"], got["bias"]), want) <= RTOL


def test_proximal_exact_refuses_large_parameter_counts():
  f = pp.proximal(lambda p, x: x @ p, mode="prox_exact")
  with pytest.raises(ValueError, match="at most 4096 parameters.*prox_cgN"):
    f(jnp.zeros((100, 50)), jnp.ones((2, 100)))


# ------------------------------------------------------------- precision, robustness


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg3"])
def test_low_precision_solves_in_float32(dtype, mode):
  rng = np.random.default_rng(10)
  x32 = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
  k32, b32 = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32), jnp.zeros(5, jnp.float32)
  g32 = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  x, k, b, g = (v.astype(dtype) for v in (x32, k32, b32, g32))
  dk, db = jax.vjp(lambda k, b: pp.dense(x, k, b, mode=mode, tau_prox=0.5), k, b)[1](g)
  assert dk.dtype == dtype and db.dtype == dtype
  # Same as a float32 solve on the rounded inputs, up to the final rounding to `dtype`.
  want = jax.vjp(lambda k, b: pp.dense(x.astype(jnp.float32), k, b, mode=mode, tau_prox=0.5),
                 k.astype(jnp.float32), b.astype(jnp.float32))[1](g.astype(jnp.float32))
  np.testing.assert_allclose(dk.astype(jnp.float32), want[0], rtol=2e-2, atol=2e-2 * float(jnp.abs(want[0]).max()))


@pytest.mark.usefixtures("x64")
def test_float64_is_kept_with_x64():
  x, k = jnp.ones((3, 4), jnp.float64), jnp.ones((4, 2), jnp.float64)
  dk = jax.grad(lambda k: pp.dense(x, k, mode="prox_exact").sum())(k)
  assert dk.dtype == jnp.float64


ROBUST_CASES = {
    "dead-units": lambda rng: (rng.normal(size=(12, 20)), np.where(np.arange(4) < 2, 0.0, 1.0)),
    "zero-inputs": lambda rng: (np.zeros((12, 20)), np.ones(4)),
    "zero-inputs-param-space": lambda rng: (np.zeros((50, 6)), np.ones(4)),
    "rank-one-inputs": lambda rng: (np.outer(rng.normal(size=50), rng.normal(size=6)), np.ones(4)),
}


@pytest.mark.parametrize("case", ROBUST_CASES)
@pytest.mark.parametrize("tau", [0.05, 1.0, 1e6])
@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg10"])
def test_no_nan_for_degenerate_problems(case, tau, mode):
  rng = np.random.default_rng(11)
  x, column_scale = ROBUST_CASES[case](rng)
  x = jnp.asarray(x, jnp.float32)
  k = jnp.asarray(rng.normal(size=(x.shape[1], 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(x.shape[0], 4)) * column_scale, jnp.float32)
  dk, db = jax.jit(jax.vjp(lambda k, b: pp.dense(x, k, b, mode=mode, tau_prox=tau),
                           k, jnp.zeros(4))[1])(g)
  assert np.all(np.isfinite(dk)) and np.all(np.isfinite(db))
  dead = column_scale == 0
  assert np.all(np.asarray(dk)[:, dead] == 0) and np.all(np.asarray(db)[dead] == 0)
  grad = np.concatenate([np.asarray(x).T @ np.asarray(g), np.asarray(g).sum(0)[None]])
  inner = float(np.sum(flat(dk, db) * grad))
  assert inner > 0 or np.all(grad == 0)


def test_large_tau_conv_is_finite_and_a_descent_direction():
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.uniform(size=(8, 8, 8, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(5, 5, 3, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(8, 8, 8, 4)), jnp.float32)
  for mode in ("prox_exact", "prox_cg3"):
    dk, db = jax.vjp(lambda k, b: pp.conv(x, k, b, mode=mode, tau_prox=1e6), k, jnp.zeros(4))[1](g)
    gk, gb = jax.vjp(lambda k, b: pp.conv(x, k, b, mode="gradient"), k, jnp.zeros(4))[1](g)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(db))
    assert float(jnp.vdot(dk, gk) + jnp.vdot(db, gb)) > 0


# ------------------------------------------------------------------------ bad input


def test_bad_shapes_name_the_shapes():
  with pytest.raises(ValueError, match=r"x \(4, 5\) and kernel \(4, 3\)"):
    pp.dense(jnp.ones((4, 5)), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"bias of shape \(3,\).*got \(4,\)"):
    pp.dense(jnp.ones((4, 5)), jnp.ones((5, 3)), jnp.ones(4))
  with pytest.raises(ValueError, match=r"x \(2, 5, 5, 3\) and kernel \(3, 3, 2, 4\)"):
    pp.conv(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 2, 4)))
  with pytest.raises(ValueError, match=r"bias of shape \(4,\)"):
    pp.conv(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones(3))
  with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID'"):
    pp.conv(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), padding="FULL")
  with pytest.raises(ValueError, match="strides must be an integer >= 1 or 2 of them"):
    pp.conv(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), strides=(1, 1, 1))


@pytest.mark.parametrize("op", ["dense", "conv", "proximal"])
def test_bad_mode_and_tau_raise_at_call_time(op):
  x, k = (jnp.ones((2, 3)), jnp.ones((3, 2))) if op != "conv" else (jnp.ones((1, 4, 4, 2)),
                                                                   jnp.ones((3, 3, 2, 2)))
  call = {"dense": lambda **kw: pp.dense(x, k, **kw), "conv": lambda **kw: pp.conv(x, k, **kw),
          "proximal": lambda **kw: pp.proximal(lambda p, x: x @ p, **kw)}[op]
  with pytest.raises(ValueError, match="valid modes are"):
    call(mode="prox_cg0")
  with pytest.raises(ValueError, match="tau_prox must be"):
    call(tau_prox=0.0)
  with pytest.raises(ValueError, match="tau_prox must be"):
    call(tau_prox=float("nan"))


# ------------------------------------------------------------------------- precision

PRECISION_PLANS = [None] + [pp.Plan(s, v, m) for s in ("batch", "parameter")
                            for v in ("cholesky", "inverse", "cg", "eig_cg")
                            for m in (False, True)
                            if not (m and (s == "parameter" or v in ("cholesky", "cg")))]


@pytest.mark.gpu
@pytest.mark.parametrize("op,x_shape,k_shape", [(pp.dense, (6, 9), (9, 4)),
                                                (pp.conv, (2, 5, 5, 3), (3, 3, 3, 4))])
def test_direction_products_run_at_solve_precision(op, x_shape, k_shape):
  # Under bfloat16 default matmuls (a TPU's default), every product that computes the
  # direction must carry solve_precision explicitly; the layer's forward pass and input
  # cotangent keep the user's precision. The user's products are exactly those of the
  # plain layer's forward pass and its input vjp.
  x, k, b = jnp.ones(x_shape), jnp.ones(k_shape), jnp.ones(k_shape[-1])
  default, high, highest = (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGH,
                            jax.lax.Precision.HIGHEST)

  def plain_products(precision):
    fn = lambda x: jnp.sum(op(x, k, b, mode="gradient", precision=precision) ** 2)
    return product_precisions(jax.make_jaxpr(jax.grad(fn))(x))

  for mode in ("gradient", "prox_exact", "prox_cg3"):
    for plan in PRECISION_PLANS:
      if plan is not None and not ((mode == "prox_exact") == (plan.solver in ("cholesky",
                                                                              "inverse"))):
        continue
      if mode == "gradient" and plan is not None:
        continue
      for user in (default, high):
        loss = lambda x, k, b: jnp.sum(op(x, k, b, mode=mode, tau_prox=0.5, precision=user,
                                          axis_name=None, plan=plan) ** 2)
        with jax.default_matmul_precision("bfloat16"):
          found = product_precisions(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, k, b))
        user_products = plain_products(user)
        if mode == "gradient":  # the plain layer, jax.grad's products at the user's precision
          assert found.count(user) == len(found), (mode, user)
          continue
        assert found.count(user) == len(user_products), (mode, plan, user, found)
        assert found.count(highest) == len(found) - len(user_products) > 0, (mode, plan, found)


@pytest.mark.gpu
def test_solve_precision_is_configurable_and_checked():
  x, k = jnp.ones((6, 9)), jnp.ones((9, 4))
  loss = lambda k: jnp.sum(pp.dense(x, k, mode="prox_cg2", solve_precision="high") ** 2)
  found = product_precisions(jax.make_jaxpr(jax.grad(loss))(k))
  assert jax.lax.Precision.HIGH in found and jax.lax.Precision.HIGHEST not in found
  with pytest.raises(ValueError, match="a jax.lax.DotAlgorithmPreset or one of their names"):
    pp.dense(x, k, solve_precision="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bf16_bf16_f32_x3", "TF32_TF32_F32_X3"])
def test_solve_precision_takes_an_algorithm_preset_by_name(name):
  # A 3-pass algorithm for the solve's products, the layer's own products untouched.
  preset = jax.lax.DotAlgorithmPreset[name.upper()]
  x, k = jnp.ones((6, 9)), jnp.ones((9, 4))
  for mode in ("prox_exact", "prox_cg2"):
    loss = lambda k: jnp.sum(pp.dense(x, k, mode=mode, solve_precision=name) ** 2)
    found = product_precisions(jax.make_jaxpr(jax.grad(loss))(k))
    assert found.count(preset) >= 2 and jax.lax.Precision.HIGHEST not in found, (mode, found)
    assert jax.lax.Precision.DEFAULT in found  # the forward pass and the input cotangent


# ------------------------------------------------------------------ non-finite inputs


@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg2"])
def test_one_non_finite_row_makes_the_whole_direction_non_finite(mode):
  # What the README documents: the Gram (or AAᵀ) mixes every row, so a NaN/Inf in one
  # input row reaches every entry of the direction, never a silently finite wrong one.
  x = jnp.ones((6, 4)).at[2, 1].set(jnp.nan)
  k = jnp.ones((4, 3))
  for bad in (x, x.at[2, 1].set(jnp.inf)):
    dk, db = jax.grad(lambda k, b: jnp.sum(pp.dense(bad, k, b, mode=mode) ** 2),
                      argnums=(0, 1))(k, jnp.zeros(3))
    assert not np.isfinite(np.asarray(dk)).any() and not np.isfinite(np.asarray(db)).any()


@pytest.mark.gpu
@pytest.mark.usefixtures("x64")
def test_traced_tau_gives_the_closed_form_of_its_value():
  # τ passed as a jit argument (a schedule inside a step): one trace for every value.
  rng = np.random.default_rng(9)
  x, k = jnp.asarray(rng.normal(size=(5, 7))), jnp.asarray(rng.normal(size=(7, 2)))
  c = jnp.asarray(rng.normal(size=(5, 2)))
  traces = []

  @jax.jit
  def direction(tau):
    traces.append(tau)
    return jax.grad(lambda k: jnp.sum(c * pp.dense(x, k, mode="prox_exact", tau_prox=tau)))(k)

  for tau in (0.1, 3.0):
    want = reference.direction(np.asarray(x), np.asarray(c), "prox_exact", 1 / tau)
    assert rel_err(direction(jnp.asarray(tau)), want) <= 1e-10
  assert len(traces) == 1
