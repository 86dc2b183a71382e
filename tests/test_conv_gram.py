"""The fast paths of the performance work against their references.

* `conv_gram.gram` by shifts (no im2col) against ``patches(x)ᵀ patches(x)`` in
  float64, for 1/2/3-d, SAME/VALID/explicit (even negative) padding, strides,
  dilation, odd and even kernels, with and without bias;
* every solver path `ops._direction` can take (batch-space CG with ``AAᵀ``,
  parameter-space CG with the formed Gram, CG in an eigenbasis, Cholesky solve,
  explicit inverse in either multiplication order), each forced by the cost
  model, against float64 NumPy and (CG) against matrix-free CG.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import proxprop_jax as pp
from proxprop_jax import conv_gram, ops, solvers
from tests import reference
from tests.test_ops import _matrix_free_direction

pytestmark = pytest.mark.usefixtures("x64")

RTOL = 1e-10

# (x shape, window, strides, padding, dilation)
GRAM_CASES = [
    ((3, 11, 2), (3,), (1,), "SAME", (1,)),
    ((3, 11, 2), (4,), (2,), "VALID", (1,)),
    ((3, 12, 2), (3,), (1,), ((2, -1),), (3,)),
    ((2, 7, 6, 3), (3, 3), (1, 1), "SAME", (1, 1)),
    ((2, 8, 7, 2), (4, 2), (1, 1), "SAME", (1, 1)),
    ((2, 9, 9, 2), (5, 5), (1, 1), "SAME", (1, 1)),
    ((2, 8, 7, 3), (3, 3), (2, 2), "SAME", (1, 1)),
    ((2, 8, 9, 2), (2, 4), (2, 1), "VALID", (1, 1)),
    ((2, 9, 8, 2), (3, 3), (1, 1), "SAME", (2, 2)),
    ((2, 8, 7, 3), (3, 3), (1, 2), ((2, 1), (0, 3)), (2, 1)),
    ((2, 8, 7, 2), (3, 2), (2, 1), ((-1, 2), (1, -1)), (1, 2)),
    ((2, 5, 6, 4, 2), (3, 2, 3), (1, 1, 1), "SAME", (1, 1, 1)),
    ((1, 6, 5, 7, 2), (3, 2, 3), (2, 1, 2), "VALID", (1, 2, 1)),
]


def _pads(shape, window, strides, padding, dilation):
  return ops._pads(padding, shape[1:-1], window, strides, dilation)


@pytest.mark.parametrize("case", GRAM_CASES, ids=lambda c: f"{len(c[1])}d-k{c[1]}-s{c[2]}-"
                         f"{c[3] if isinstance(c[3], str) else 'explicit'}-d{c[4]}")
def test_shift_gram_matches_patches(case):
  shape, window, strides, padding, dilation = case
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape))
  pads = _pads(shape, window, strides, padding, dilation)

  @jax.jit
  def grams(x):
    out = {}
    for use_bias in (False, True):
      a = conv_gram.input_matrix(x, window, strides, pads, dilation, use_bias)
      out[use_bias] = (a.T @ a, conv_gram.gram(x, window, strides, pads, dilation, use_bias,
                                                method="shifts"))
    return out

  for use_bias, (want, got) in grams(x).items():
    assert got.shape == want.shape and got.dtype == jnp.float64
    err = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    assert err <= RTOL, (use_bias, err)


def test_patches_match_the_loop_reference():
  shape, window, strides, dilation = (2, 7, 6, 2), (3, 2), (2, 1), (1, 2)
  x = np.random.default_rng(1).normal(size=shape)
  pads = [(1, 0), (2, 1)]
  want, _ = reference.patches(x, window, strides, pads, dilation)
  got = conv_gram.patches(jnp.asarray(x), window, strides, pads, dilation)
  np.testing.assert_array_equal(got, want)


def test_shift_gram_under_jit_and_in_float32():
  shape, window, pads = (4, 10, 10, 3), (5, 5), ((2, 2), (2, 2))
  x = np.random.default_rng(2).uniform(size=shape)
  fn = jax.jit(functools.partial(conv_gram.gram, window=window, strides=(1, 1), pads=pads,
                                 dilation=(1, 1), use_bias=True, method="shifts"))
  want = np.asarray(conv_gram.gram(jnp.asarray(x), window, (1, 1), pads, (1, 1), True,
                                   method="patches"))
  assert np.abs(np.asarray(fn(jnp.asarray(x))) - want).max() <= 1e-12 * np.abs(want).max()
  got32 = fn(jnp.asarray(x, jnp.float32))
  assert got32.dtype == jnp.float32
  assert np.abs(np.asarray(got32, np.float64) - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("shape,cin", [((32, 32), 3), ((16, 16), 16), ((8, 8), 20)])
def test_shift_gram_is_much_cheaper_for_the_papers_convnet(shape, cin):
  x_shape, window, pads = (500, *shape, cin), (5, 5), ((2, 2), (2, 2))
  flops = {m: conv_gram.gram_flops(x_shape, window, (1, 1), pads, (1, 1), True, m)
           for m in ("patches", "shifts", "auto")}
  assert flops["shifts"] * 3 < flops["patches"]
  assert flops["auto"] == min(flops["patches"], flops["shifts"])


def test_strided_convs_fall_back_to_patches_when_cheaper():
  # A 2x2 stride-2 "patchify" conv: patches are tiny, shifts are not.
  x_shape, window, strides = (8, 32, 32, 4), (2, 2), (2, 2)
  pads = ((0, 0), (0, 0))
  patch = conv_gram.gram_flops(x_shape, window, strides, pads, (1, 1), True, "patches")
  assert conv_gram.gram_flops(x_shape, window, strides, pads, (1, 1), True) == patch


# ---------------------------------------------------------------- the solver paths


def _force(monkeypatch, *, eig: bool, inverse: bool):
  """Makes the cost model choose the eigenbasis CG / the explicit inverse (or not)."""
  monkeypatch.setattr(ops, "_cg_in_eigenbasis", lambda n, k, steps: eig)
  monkeypatch.setattr(ops, "_inverse_is_cheaper", lambda n, k: inverse)


PROBLEMS = [
    # (op, kwargs, x shape, kernel shape, batch space?): batch space with p < out and
    # p > out, parameter space (dense and conv).
    (pp.dense, {}, (5, 8), (8, 12), True),
    (pp.dense, {}, (9, 14), (14, 3), True),
    (pp.dense, {}, (40, 6), (6, 3), False),
    (pp.conv, {"padding": "SAME"}, (2, 6, 6, 2), (3, 3, 2, 4), False),
]


def _problem(rng, op, kw, x_shape, k_shape):
  x, k = jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.normal(size=k_shape))
  b = jnp.asarray(rng.normal(size=k_shape[-1]))
  plain = functools.partial(op, mode="gradient", **kw)
  g = jnp.asarray(rng.normal(size=plain(x, k, b).shape))
  g = g.at[..., 0].set(0.0)  # a dead unit: its column must stay exactly zero
  if op is pp.dense:
    a = reference.with_ones(np.asarray(x), True)
  else:
    a = reference.with_ones(reference.patches(np.asarray(x), k_shape[:-2], (1, 1),
                                              [(1, 1), (1, 1)], (1, 1))[0], True)
  return x, k, b, g, a


@pytest.mark.parametrize("eig,inverse", list(itertools.product([False, True], repeat=2)))
def test_every_solver_path_matches_numpy(monkeypatch, eig, inverse):
  _force(monkeypatch, eig=eig, inverse=inverse)
  rng = np.random.default_rng(3)
  modes = ("prox_exact", "prox_cg1", "prox_cg3")
  for op, kw, x_shape, k_shape, batch_space in PROBLEMS:
    x, k, b, g, a = _problem(rng, op, kw, x_shape, k_shape)
    assert (a.shape[0] < a.shape[1]) == batch_space  # the space the cost model picks

    @jax.jit
    def directions(x, k, b, g):
      return [jax.vjp(lambda k, b: op(x, k, b, mode=mode, tau_prox=0.5, **kw), k, b)[1](g)
              for mode in modes]

    plain = functools.partial(op, mode="gradient", **kw)
    matrix_free = jax.jit(lambda x, k, b, g: _matrix_free_direction(plain, x, k, b, g, 2.0, 3))
    for mode, (dk, db) in zip(modes, directions(x, k, b, g)):
      got = np.concatenate([np.asarray(dk).reshape(-1, k_shape[-1]), np.asarray(db)[None]])
      want = reference.direction(a, np.asarray(g).reshape(-1, k_shape[-1]), mode, 2.0)
      err = np.abs(got - want).max() / np.abs(want).max()
      assert err <= 1e-8, (op.__name__, x_shape, mode, err)
      assert np.all(got[:, 0] == 0), (op.__name__, x_shape, mode)
      if mode == "prox_cg3":  # and against matrix-free CG (v ↦ vjp(jvp(v)) + λv)
        mk, mb = matrix_free(x, k, b, g)
        want = np.concatenate([np.asarray(mk).reshape(-1, k_shape[-1]), np.asarray(mb)[None]])
        assert np.abs(got - want).max() <= 1e-8 * np.abs(want).max(), (op.__name__, x_shape)


def test_kernel_cg_is_textbook_cg_in_parameter_space():
  rng = np.random.default_rng(4)
  a, g = rng.normal(size=(7, 12)), rng.normal(size=(7, 4))
  m = a.T @ a + 0.3 * np.eye(12)
  for steps in (1, 2, 5, 9):
    y = solvers.kernel_cg(jnp.asarray(a @ a.T), jnp.asarray(g), 0.3, steps)
    want = np.stack([reference.cg(m, (a.T @ g)[:, c], steps) for c in range(4)], axis=1)
    np.testing.assert_allclose(a.T @ np.asarray(y), want, rtol=1e-9, atol=1e-12)


def test_gram_cg_is_textbook_cg():
  rng = np.random.default_rng(5)
  a, rhs = rng.normal(size=(20, 8)), rng.normal(size=(8, 3))
  rhs[:, 1] = 0
  m = a.T @ a
  for steps in (1, 4, 8):
    got = solvers.gram_cg(jnp.asarray(m), jnp.asarray(rhs), 0.7, steps)
    want = np.stack([reference.cg(m + 0.7 * np.eye(8), rhs[:, c], steps) for c in range(3)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(np.asarray(got)[:, 1] == 0)


def test_spd_inverse_matches_numpy_and_falls_back():
  rng = np.random.default_rng(6)
  a = rng.normal(size=(10, 10))
  m = a @ a.T
  np.testing.assert_allclose(jax.jit(solvers.spd_inverse)(m, 0.2),
                             np.linalg.inv(m + 0.2 * np.eye(10)), rtol=1e-9)
  # float32, rank 2, λ far below rounding: Cholesky breaks down, the fallback is finite.
  low = rng.normal(size=(30, 2)).astype(np.float32) * 100
  inv = jax.jit(solvers.spd_inverse)(jnp.asarray(low @ low.T), 1e-6)
  assert np.all(np.isfinite(inv))


def test_eig_cg_from_the_residual_is_textbook_cg():
  # eig_cg does not carry the iterate: w = (c − r) / (s + λ). Batch-space weights.
  rng = np.random.default_rng(7)
  evals = np.abs(rng.normal(size=9)) * 3
  coeffs = rng.normal(size=(9, 11))
  coeffs[:, 3] = 0
  got = solvers.eig_cg(jnp.asarray(evals), jnp.asarray(coeffs), 0.4, 5, weights=evals)
  # Weights ⟨u, v⟩ = uᵀ diag(s) v: plain CG for u = √s ⊙ w (the matrices are diagonal).
  root = np.sqrt(evals)
  want = np.stack([reference.cg(np.diag(evals + 0.4), root * coeffs[:, c], 5) / root
                   for c in range(11)], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  assert np.all(np.asarray(got)[:, 3] == 0)


def test_eig_cg_on_column_blocks_matches_whole_array(monkeypatch):
  rng = np.random.default_rng(8)
  evals = np.abs(rng.normal(size=9)) * 3
  coeffs = rng.normal(size=(9, 11))
  coeffs[:, 5] = 0
  whole = solvers.eig_cg(jnp.asarray(evals), jnp.asarray(coeffs), 0.4, 5, weights=evals)
  monkeypatch.setattr(solvers, "EIG_CG_CHUNK", 4)  # 11 columns: 3 blocks, one padded
  blocks = solvers.eig_cg(jnp.asarray(evals), jnp.asarray(coeffs), 0.4, 5, weights=evals)
  np.testing.assert_allclose(blocks, whole, rtol=1e-13, atol=1e-15)
  assert np.all(np.asarray(blocks)[:, 5] == 0)
