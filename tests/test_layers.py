"""`layers`: each kind's forward, input matrix, Gram and column layout against float64 NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from proxprop_jax import layers
from tests import reference

pytestmark = pytest.mark.usefixtures("x64")


def _grouped_conv_case(rng, groups):
  x = rng.normal(size=(2, 5, 6, 2 * groups))
  kernel = rng.normal(size=(3, 3, 2, 3 * groups))
  kind = layers.Conv(True, (3, 3), (1, 2), ((1, 1), (0, 1)), (1, 1), groups)
  return kind, x, kernel, rng.normal(size=3 * groups)


def _reference_matrices(kind, x):
  """``A = [patches, 1]`` per block, by loops."""
  if isinstance(kind, layers.Dense):
    return [reference.with_ones(x.reshape(-1, x.shape[-1]), kind.use_bias)]
  cin = x.shape[-1] // kind.groups
  return [reference.with_ones(reference.patches(x[..., b * cin:(b + 1) * cin], kind.window,
                                                kind.strides, kind.pads, kind.dilation)[0],
                              kind.use_bias) for b in range(kind.groups)]


CASES = {
    "dense": lambda rng: (layers.Dense(True), rng.normal(size=(2, 3, 4)),
                          rng.normal(size=(4, 5)), rng.normal(size=5)),
    "dense-no-bias": lambda rng: (layers.Dense(False), rng.normal(size=(6, 4)),
                                  rng.normal(size=(4, 5)), None),
    "conv": lambda rng: _grouped_conv_case(rng, 1),
    "grouped-conv": lambda rng: _grouped_conv_case(rng, 3),
}


@pytest.mark.parametrize("name", CASES)
def test_kind_is_linear_with_its_input_matrix(name):
  kind, x, kernel, bias = CASES[name](np.random.default_rng(0))
  mats = _reference_matrices(kind, x)
  blocks, k = len(mats), kernel.shape[-1] // len(mats)
  theta = kind.to_columns(jnp.asarray(kernel), None if bias is None else jnp.asarray(bias))
  assert theta.shape == (blocks, mats[0].shape[1], k)
  # z = A θ per block, and the columns map back to the very same kernel and bias.
  z = np.asarray(kind.apply(jnp.asarray(x), jnp.asarray(kernel),
                            None if bias is None else jnp.asarray(bias)))
  z = z.reshape(-1, z.shape[-1])
  for b, a in enumerate(mats):
    np.testing.assert_allclose(a @ np.asarray(theta[b]), z[:, b * k:(b + 1) * k], rtol=1e-12,
                               atol=1e-12)
  back_kernel, back_bias = kind.from_columns(theta, kernel.shape)
  np.testing.assert_array_equal(back_kernel, kernel)
  if bias is not None:
    np.testing.assert_array_equal(back_bias, bias)
  # The Gram with the bias row/column, the matrix without it, the cotangent's rows.
  gram = np.asarray(kind.gram(jnp.asarray(x)))
  matrix = np.asarray(kind.matrix(jnp.asarray(x)))
  rows = np.asarray(kind.cotangent_rows(jnp.asarray(z)))
  for b, a in enumerate(mats):
    np.testing.assert_allclose(gram[b], a.T @ a, rtol=1e-12)
    np.testing.assert_array_equal(matrix[b], a[:, : a.shape[1] - kind.use_bias])
    np.testing.assert_array_equal(rows[b], z[:, b * k:(b + 1) * k])


@pytest.mark.parametrize("name", CASES)
def test_problem_sizes(name):
  kind, x, kernel, _ = CASES[name](np.random.default_rng(1))
  mats = _reference_matrices(kind, x)
  problem = kind.problem(x.shape, kernel.shape, devices=4)
  assert (problem.blocks, problem.rows, problem.params, problem.columns) == (
      len(mats), 4 * mats[0].shape[0], mats[0].shape[1], kernel.shape[-1] // len(mats))
  assert problem.gram_flops > 0
