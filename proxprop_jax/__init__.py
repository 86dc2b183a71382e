"""proxprop_jax: Proximal Backpropagation (Frerix et al., ICLR 2018) for JAX and Flax.

    import proxprop_jax as pp
    layer = pp.Linear(784, 256, mode="prox_cg3", tau_prox=0.05, rngs=nnx.Rngs(0))
"""

from proxprop_jax import linen, parallel, planner
from proxprop_jax.flax_common import ProxLayer
from proxprop_jax.modes import VALID_MODES, Mode, check_tau, parse_mode
from proxprop_jax.nnx import Conv, Linear, TauProx, check_linear, prox_module
from proxprop_jax.ops import MAX_EXACT_PARAMS, SOLVE_PRECISION, conv, dense, proximal
from proxprop_jax.planner import Plan
from proxprop_jax.conversion import Report, convert, set_tau
from proxprop_jax.diagnosis import diagnostics
from proxprop_jax.reuse import ReusedParameterError

__version__ = "0.1.0"

__all__ = [
    "Conv", "Linear", "MAX_EXACT_PARAMS", "Mode", "Plan", "ProxLayer", "SOLVE_PRECISION",
    "TauProx", "VALID_MODES", "check_linear", "check_tau", "conv", "dense", "linen", "parallel",
    "parse_mode", "planner", "prox_module", "proximal",
]
__all__ += ["Report", "ReusedParameterError", "convert", "diagnostics", "set_tau"]
