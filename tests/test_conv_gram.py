"""`conv_gram`: the Gram ``AᵀA`` by shifts (no im2col) against ``patches(x)ᵀ patches(x)``
in float64, for 1/2/3-d, SAME/VALID/explicit (even negative) padding, strides, dilation,
odd and even kernels, with and without bias; the patches against a loop reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxprop_jax import conv_gram, geometry
from tests import reference

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
  return geometry.explicit_pads(padding, shape[1:-1], window, strides, dilation)


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
      a = conv_gram.patches(x, window, strides, pads, dilation)
      if use_bias:
        a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
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
  # At HIGHEST, as the layers form it: a float32 Gram at the default precision is TF32 on a GPU.
  fn = jax.jit(functools.partial(conv_gram.gram, window=window, strides=(1, 1), pads=pads,
                                 dilation=(1, 1), use_bias=True, method="shifts",
                                 precision=jax.lax.Precision.HIGHEST))
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
