"""Deciding how to compute a ProxProp direction: the `Plan` of one layer call.

The direction ``D = (AᵀA + λI)⁻¹Aᵀg`` (or its ``N``-step CG iterate) can be
computed in two systems, with four solvers, and the choice is performance only —
every plan gives the same ``D`` up to rounding:

* **system** ``"parameter"``: form the Gram ``AᵀA`` (``p × p`` per block) and solve
  with ``Aᵀg`` as right-hand side; ``"batch"``: the push-through identity
  ``D = Aᵀ(AAᵀ + λI)⁻¹g`` with the row Gram ``AAᵀ`` (``rows × rows``), cheaper when
  ``rows < p`` (dense layers at usual batch sizes); ``"gradient"``: no solve.
* **solver** for ``prox_exact``: ``"cholesky"`` (two triangular solves) or
  ``"inverse"`` (an explicit inverse, faster for many right-hand sides); for
  ``prox_cgN``: ``"cg"`` (``N`` products with the formed matrix) or ``"eig_cg"``
  (one ``eigh``, then ``N`` diagonal recurrences: cheaper for many steps).
* **multiply_a_first** (batch space with ``"inverse"``/``"eig_cg"`` only): form
  ``Aᵀ·M`` for the ``rows × rows`` matrix ``M`` before applying it to the
  right-hand side, cheaper when ``p`` is smaller than the number of columns ``k``.
* solver ``"diagonal"`` (system ``"parameter"``, embeddings only): ``AᵀA`` is
  diagonal (token counts), so ``prox_exact`` divides and ``prox_cgN`` runs CG's
  diagonal recurrence (`direction.diagonal`); there is nothing to choose.

`plan` estimates each choice's cost in matrix-product FLOPs with per-backend
constants (`COSTS`) and returns the cheapest as a frozen, printable value. The
backward rule only executes it; passing a `Plan` to ``pp.dense``/``pp.conv``
(``plan=``) forces one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from proxprop_jax._recorder import Recorder
from proxprop_jax.layers import Problem
from proxprop_jax.modes import Mode

SYSTEMS = ("gradient", "batch", "parameter")
SOLVERS = ("none", "cholesky", "inverse", "cg", "eig_cg", "diagonal")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one layer call computes its direction (see the module docstring)."""

  system: str
  solver: str
  multiply_a_first: bool = False

  def __post_init__(self):
    if self.system not in SYSTEMS:
      raise ValueError(f"Plan.system must be one of {SYSTEMS}; got {self.system!r}.")
    if self.solver not in SOLVERS:
      raise ValueError(f"Plan.solver must be one of {SOLVERS}; got {self.solver!r}.")
    if (self.system == "gradient") != (self.solver == "none"):
      raise ValueError(f"Plan: solver 'none' goes with system 'gradient' and only with it; "
                       f"got {self}.")
    if self.multiply_a_first and not (self.system == "batch"
                                      and self.solver in ("inverse", "eig_cg")):
      raise ValueError(f"Plan: multiply_a_first applies to system 'batch' with solver "
                       f"'inverse' or 'eig_cg' only; got {self}.")
    if self.solver == "diagonal" and self.system != "parameter":
      raise ValueError(f"Plan: solver 'diagonal' goes with system 'parameter'; got {self}.")

  def check(self, mode: Mode) -> None:
    """Raises unless this plan computes ``mode``'s direction."""
    wanted = ("none",) if mode.is_gradient else (
        ("cholesky", "inverse", "diagonal") if mode.is_exact else ("cg", "eig_cg", "diagonal"))
    if self.solver not in wanted:
      raise ValueError(f"{self} cannot compute mode {mode.name!r}: its solver must be one "
                       f"of {wanted}.")


# Costs in units of matrix-product FLOPs. `benchmarks/calibrate.py` measures each constant
# in isolation on the machine it runs on, prints them in this form and the plans both sets
# give for the paper's layers.
COSTS = {
    # Set by timing whole steps of the paper's layers on a 2-core x86 CPU (XLA CPU products
    # against jaxlib's LAPACK calls): products run several times faster than factorisations
    # and triangular solves, and an elementwise CG step is memory bound (cost per element of
    # the (n, k) iterate).
    "cpu": dict(
        cholesky=2.0,  # × n³
        eigh=20.0,  # × n³
        trsm=3.0,  # × the FLOPs of a triangular solve
        cg_step=500.0,  # × n·k: the vector updates of one `gram_cg`/`row_gram_cg` step
        eig_cg_step=350.0,  # × n·k: one step of `eig_cg`'s diagonal recurrence
    ),
    # GPUs/TPUs: products are ~100× faster while small factorisations are latency bound
    # (estimates, to be re-measured on a device with benchmarks/calibrate.py): keep
    # eigendecompositions out, factor only for prox_exact.
    "accelerator": dict(cholesky=200.0, eigh=4000.0, trsm=3.0, cg_step=100.0,
                        eig_cg_step=100.0),
}


def _costs(backend: str) -> dict:
  """The constants for ``backend``: its own entry of `COSTS` if there is one (e.g. one
  added from `benchmarks/calibrate.py`), else the CPU or the accelerator estimates."""
  return COSTS.get(backend) or COSTS["cpu" if backend == "cpu" else "accelerator"]


def _exact_flops(n: int, k: int, c: dict) -> dict:
  """Costs of the exact solve of an ``n × n`` system with ``k`` right-hand sides."""
  return {"cholesky": c["cholesky"] * n**3 + c["trsm"] * 2.0 * n * n * k,
          "inverse": (c["cholesky"] + 5.0) * n**3 + 2.0 * n * n * k}


def _cg_flops(n: int, k: int, steps: int, c: dict) -> dict:
  """Costs of ``steps`` CG steps: with the formed matrix, and in its eigenbasis."""
  return {"cg": steps * (2.0 * n * n * k + c["cg_step"] * n * k),
          "eig_cg": c["eigh"] * n**3 + 4.0 * n * n * k + steps * c["eig_cg_step"] * n * k}


def _solvers(n: int, k: int, mode: Mode, c: dict) -> dict:
  return _exact_flops(n, k, c) if mode.is_exact else _cg_flops(n, k, mode.cg_steps, c)


@functools.lru_cache(maxsize=1024)
def plan(problem: Problem, mode: Mode, backend: str | None = None) -> Plan:
  """The cheapest `Plan` for ``problem`` in ``mode`` on ``backend`` (default: JAX's).

  Both systems need one ``rows·p·k`` product (``Aᵀy`` resp. ``Aᵀg``); they differ by
  forming ``AAᵀ`` (``2·rows²·p``) or ``AᵀA`` (``problem.gram_flops``), and the solve.
  """
  if mode.is_gradient:
    return Plan("gradient", "none")
  c = _costs(backend or jax.default_backend())
  b, rows, p, k = problem.blocks, problem.rows, problem.params, problem.columns
  batch = {s: 2.0 * b * rows * rows * p + b * f for s, f in _solvers(rows, k, mode, c).items()}
  param = {s: problem.gram_flops + b * f for s, f in _solvers(p, k, mode, c).items()}
  system, costs = ("batch", batch) if min(batch.values()) < min(param.values()) else (
      "parameter", param)
  solver = min(costs, key=costs.get)
  reordered = system == "batch" and solver in ("inverse", "eig_cg") and p < k
  return Plan(system, solver, multiply_a_first=reordered)


_RECORDER = Recorder()


def recording():
  """Collects the ``(Problem, Plan)`` of every ProxProp layer call traced inside.

  Plans are made while JAX traces a backward pass, so only a trace inside the
  block records (a cached ``jit`` does not retrace): e.g.
  ``with pp.planner.recording() as plans: jax.make_jaxpr(step)(...)``.
  """
  return _RECORDER.collecting()


def record(problem: Problem, chosen: Plan) -> None:
  """Adds one layer call's plan to every active `recording`."""
  _RECORDER.add((problem, chosen))


def describe(problem: Problem, mode: Mode, backend: str | None = None) -> str:
  """One line: the problem's sizes and the chosen plan (for logs and reports)."""
  return (f"{mode.name}: B={problem.blocks} rows={problem.rows} p={problem.params} "
          f"k={problem.columns} -> {plan(problem, mode, backend)}")
