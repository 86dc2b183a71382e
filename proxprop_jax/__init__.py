"""proxprop_jax: Proximal Backpropagation (Frerix et al., ICLR 2018) for JAX and Flax.

    import proxprop_jax as pp
    layer = pp.Linear(784, 256, mode="prox_cg3", tau_prox=0.05, rngs=nnx.Rngs(0))
    report = pp.convert(model, mode="prox_cg3", tau_prox=1.0)  # any NNX model, in place
"""

from proxprop_jax import _threads  # noqa: F401  (limits the BLAS threads of JAX's CPU LAPACK)
from proxprop_jax import linen, parallel, planner
from proxprop_jax.conversion import Report, convert, set_tau
from proxprop_jax.diagnosis import diagnostics
from proxprop_jax.flax_common import ProxLayer
from proxprop_jax.modes import VALID_MODES, Mode, check_tau, parse_mode
from proxprop_jax.nnx import (BatchNorm, Conv, Einsum, Embed, GroupNorm, LayerNorm, Linear,
                              LinearGeneral, RMSNorm, TauProx, check_linear, prox_module)
from proxprop_jax.ops import (MAX_EXACT_PARAMS, SOLVE_PRECISION, conv, dense, dense_general,
                              einsum, embed, norm_affine, proximal)
from proxprop_jax.planner import Plan
from proxprop_jax.pooling import max_pool
from proxprop_jax.reuse import ReusedParameterError

__version__ = "0.1.0"

__all__ = [
    "BatchNorm", "Conv", "Einsum", "Embed", "GroupNorm", "LayerNorm", "Linear", "LinearGeneral",
    "MAX_EXACT_PARAMS", "Mode", "Plan", "ProxLayer", "RMSNorm", "Report", "SOLVE_PRECISION",
    "ReusedParameterError", "TauProx", "VALID_MODES", "check_linear", "check_tau", "conv",
    "convert", "dense", "dense_general", "diagnostics", "einsum", "embed", "linen", "max_pool",
    "norm_affine", "parallel", "parse_mode", "planner", "prox_module", "proximal", "set_tau",
]
