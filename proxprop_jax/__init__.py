"""proxprop_jax: Proximal Backpropagation (Frerix et al., ICLR 2018) for JAX and Flax.

    import proxprop_jax as pp
    layer = pp.Linear(784, 256, mode="prox_cg3", tau_prox=0.05, rngs=nnx.Rngs(0))
"""

from proxprop_jax import _threads  # noqa: F401  (limits the BLAS threads of JAX's CPU LAPACK)
from proxprop_jax import linen, parallel
from proxprop_jax.modes import VALID_MODES, Mode, check_tau, parse_mode
from proxprop_jax.nnx import Conv, Linear, check_linear, prox_module
from proxprop_jax.ops import MAX_EXACT_PARAMS, conv, dense, proximal
from proxprop_jax.pooling import max_pool

__version__ = "0.1.0"

__all__ = [
    "Conv", "Linear", "MAX_EXACT_PARAMS", "Mode", "VALID_MODES", "check_linear", "check_tau",
    "conv", "dense", "linen", "parallel", "parse_mode", "prox_module", "proximal",
]
