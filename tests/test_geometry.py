"""`geometry`: argument normalisation and output shapes against lax and flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from proxprop_jax import geometry
from tests import reference


def test_int_tuple():
  assert geometry.int_tuple(2, 3, "strides") == (2, 2, 2)
  assert geometry.int_tuple(None, 2, "strides") == (1, 1)
  assert geometry.int_tuple([1, 3], 2, "strides") == (1, 3)
  for bad in (0, (1, 2, 3), (1.5, 1), -1):
    with pytest.raises(ValueError, match="strides must be an integer >= 1 or 2 of them"):
      geometry.int_tuple(bad, 2, "strides")


@pytest.mark.parametrize("in_spatial,window,strides,dilation", [
    ((7, 6), (3, 3), (1, 1), (1, 1)), ((8, 7), (4, 2), (2, 1), (1, 2)), ((9,), (5,), (3,), (2,))])
def test_same_and_valid_pads_give_lax_output_shapes(in_spatial, window, strides, dilation):
  x = jnp.zeros((1, *in_spatial, 1))
  kernel = jnp.zeros((*window, 1, 1))
  spatial = "DHW"[3 - len(window):]
  dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  for padding in ("SAME", "VALID", 1, [(2, 0)] * len(window)):
    pads = geometry.explicit_pads(padding, in_spatial, window, strides, dilation)
    want = jax.lax.conv_general_dilated(x, kernel, strides, padding if isinstance(padding, str)
                                        else pads, rhs_dilation=dilation,
                                        dimension_numbers=dims).shape[1:-1]
    assert geometry.conv_output_shape(in_spatial, window, strides, pads, dilation) == want
  assert list(geometry.explicit_pads("SAME", in_spatial, window, strides, dilation)) == \
      reference.same_pads(in_spatial, window, strides, dilation)


def test_bad_padding_names_the_valid_forms():
  for bad in ("FULL", [(1, 1)], [(1, 2, 3), (0, 0)]):
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID', an integer"):
      geometry.explicit_pads(bad, (5, 5), (3, 3), (1, 1), (1, 1))


@pytest.mark.parametrize("padding,window", [("CIRCULAR", (3, 3)), ("REFLECT", (3, 2)),
                                            ("CAUSAL", (4,))])
def test_flax_paddings_reproduce_nnx_conv(padding, window):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *(7,) * len(window), 3)), jnp.float32)
  conv = nnx.Conv(3, 2, window, padding=padding, use_bias=False, rngs=nnx.Rngs(0))
  padded, rest = geometry.flax_padding(x, padding, window, (1,) * len(window))
  assert rest == "VALID"
  plain = nnx.Conv(3, 2, window, padding="VALID", use_bias=False, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(plain(padded), conv(x), rtol=1e-6, atol=1e-6)
