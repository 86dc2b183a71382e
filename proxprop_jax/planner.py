"""Deciding how to compute a ProxProp direction: the `Plan` of one layer call.

The direction ``D = (AᵀA + λI)⁻¹Aᵀg`` (or its ``N``-step CG iterate) can be
computed in two systems, with four solvers, and the choice is performance only —
every plan gives the same ``D`` up to rounding:

* **system** ``"parameter"``: form the Gram ``AᵀA`` (``p × p`` per block) and solve
  with ``Aᵀg`` as right-hand side; ``"batch"``: the push-through identity
  ``D = Aᵀ(AAᵀ + λI)⁻¹g`` with the row Gram ``AAᵀ`` (``rows × rows``), cheaper when
  ``rows < p`` (dense layers at usual batch sizes); ``"gradient"``: no solve.
* **solver** for ``prox_exact``: ``"cholesky"`` (two triangular solves),
  ``"inverse"`` (an explicit inverse, faster for many right-hand sides) or, for
  systems of size 1 or 2 (a norm layer's scale and bias), ``"closed_form"``; for
  ``prox_cgN``: ``"cg"`` (``N`` products with the formed matrix) or ``"eig_cg"``
  (one ``eigh``, then ``N`` diagonal recurrences: cheaper for many steps).
* **multiply_a_first** (batch space with ``"inverse"``/``"eig_cg"`` only): form
  ``Aᵀ·M`` for the ``rows × rows`` matrix ``M`` before applying it to the
  right-hand side, cheaper when ``p`` is smaller than the number of columns ``k``.
* solver ``"diagonal"`` (system ``"parameter"``, embeddings only): ``AᵀA`` is
  diagonal (token counts), so ``prox_exact`` divides and ``prox_cgN`` runs CG's
  diagonal recurrence (`direction.diagonal`); there is nothing to choose.
* **unroll** (CG solvers only): the ``N`` iterations as straight-line code instead of
  a ``while`` loop, for at most ``COSTS[backend]["unroll_steps"]`` steps. On a GPU
  every loop iteration is launched from the host and nothing fuses across
  iterations; unrolled, XLA sees one program but compiles more. No backend unrolls
  by default until a measurement says it pays (``planning(unroll_steps=10)``).

`plan` estimates each choice's cost in matrix-product FLOPs with per-backend
constants (`COSTS`) and returns the cheapest as a frozen, printable value. The
backward rule only executes it; passing a `Plan` to ``pp.dense``/``pp.conv``
(``plan=``) forces one. Plans are made for the backend JAX runs on; `planning`
plans for another one (e.g. to export a step for a GPU from a CPU) or with other
constants (`benchmarks/calibrate.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import jax

from proxprop_jax._recorder import Recorder
from proxprop_jax.layers import Problem
from proxprop_jax.modes import Mode

SYSTEMS = ("gradient", "batch", "parameter")
SOLVERS = ("none", "cholesky", "inverse", "closed_form", "cg", "eig_cg", "diagonal")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one layer call computes its direction (see the module docstring)."""

  system: str
  solver: str
  multiply_a_first: bool = False
  unroll: bool = False

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
    if self.unroll and self.solver not in ("cg", "eig_cg"):
      raise ValueError(f"Plan: unroll applies to the CG solvers 'cg' and 'eig_cg' only; "
                       f"got {self}.")

  def check(self, mode: Mode) -> None:
    """Raises unless this plan computes ``mode``'s direction."""
    wanted = ("none",) if mode.is_gradient else (
        ("cholesky", "inverse", "closed_form", "diagonal") if mode.is_exact
        else ("cg", "eig_cg", "diagonal"))
    if self.solver not in wanted:
      raise ValueError(f"{self} cannot compute mode {mode.name!r}: its solver must be one "
                       f"of {wanted}.")


# Costs in units of matrix-product FLOPs. `benchmarks/calibrate.py` measures each constant
# in isolation on the machine it runs on, prints them in this form and the plans both sets
# give for the layers of the experiments' models.
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
        unroll_steps=0,  # CG loops of at most this many steps are unrolled
    ),
    # Measured by benchmarks/calibrate.py on one NVIDIA H200 (jax 0.11.2, n = 512, k = 1024,
    # float32 products at HIGHEST): a Cholesky factorisation is cheap, an eigendecomposition
    # ~12× dearer, a triangular solve runs at a fifth of product speed, and CG's vector
    # updates cost nothing next to its product (measured ≈ 0).
    # Unrolling CG loops is not measured on a GPU yet (benchmarks/gpu.sh compares it).
    "gpu": dict(cholesky=10.4, eigh=129.0, trsm=5.28, cg_step=0.0, eig_cg_step=208.0,
                unroll_steps=0),
    # Other accelerators (TPUs), not measured: products ~100× faster than on a CPU while
    # small factorisations are latency bound: keep eigendecompositions out, factor only
    # for prox_exact.
    "accelerator": dict(cholesky=200.0, eigh=4000.0, trsm=3.0, cg_step=100.0,
                        eig_cg_step=100.0, unroll_steps=0),
}

_PLANNING = threading.local()


@contextlib.contextmanager
def planning(backend: str | None = None, **constants):
  """Plans made inside are for ``backend`` (default: JAX's) with ``constants`` replacing
  entries of its `COSTS`, e.g. ``planning("gpu")`` while exporting a step for a GPU
  from a CPU, or ``planning(unroll_steps=10)`` to compare against unrolled CG loops.
  Plans are made while a step is traced: JAX reuses the trace of a function it jitted
  before, so trace a new function inside the block."""
  unknown = set(constants) - set(COSTS["cpu"])
  if unknown:
    raise ValueError(f"planning: unknown cost constants {sorted(unknown)}; valid: "
                     f"{sorted(COSTS['cpu'])}.")
  previous = getattr(_PLANNING, "settings", None)
  _PLANNING.settings = (backend, constants)
  try:
    yield
  finally:
    _PLANNING.settings = previous


def _costs(backend: str) -> dict:
  """The constants for ``backend``: its own entry of `COSTS` if there is one (e.g. one
  added from `benchmarks/calibrate.py`), else the CPU or the accelerator estimates."""
  return COSTS.get(backend) or COSTS["cpu" if backend == "cpu" else "accelerator"]


def _exact_flops(n: int, k: int, c: dict) -> dict:
  """Costs of the exact solve of an ``n × n`` system with ``k`` right-hand sides (the
  factorisation counted twice: `solvers.shifted_cholesky` always factors twice)."""
  costs = {"cholesky": 2 * c["cholesky"] * n**3 + c["trsm"] * 2.0 * n * n * k,
           "inverse": (2 * c["cholesky"] + 5.0) * n**3 + 2.0 * n * n * k}
  if n <= 2:
    costs["closed_form"] = 2.0 * n * n * k
  return costs


def _cg_flops(n: int, k: int, steps: int, c: dict) -> dict:
  """Costs of ``steps`` CG steps: with the formed matrix, and in its eigenbasis."""
  return {"cg": steps * (2.0 * n * n * k + c["cg_step"] * n * k),
          "eig_cg": c["eigh"] * n**3 + 4.0 * n * n * k + steps * c["eig_cg_step"] * n * k}


def _solvers(n: int, k: int, mode: Mode, c: dict) -> dict:
  return _exact_flops(n, k, c) if mode.is_exact else _cg_flops(n, k, mode.cg_steps, c)


def plan(problem: Problem, mode: Mode, backend: str | None = None) -> Plan:
  """The cheapest `Plan` for ``problem`` in ``mode`` on ``backend`` (default: the one of
  an enclosing `planning`, else JAX's).

  Both systems need one ``rows·p·k`` product (``Aᵀy`` resp. ``Aᵀg``); they differ by
  forming ``AAᵀ`` (``2·rows²·p``) or ``AᵀA`` (``problem.gram_flops``), and the solve.
  """
  planned_for, constants = getattr(_PLANNING, "settings", None) or (None, {})
  backend = backend or planned_for or jax.default_backend()
  return _cheapest(problem, mode, backend, tuple(sorted(constants.items())))


@functools.lru_cache(maxsize=1024)
def _cheapest(problem: Problem, mode: Mode, backend: str, constants: tuple) -> Plan:
  if mode.is_gradient:
    return Plan("gradient", "none")
  c = {**_costs(backend), **dict(constants)}
  b, rows, p, k = problem.blocks, problem.rows, problem.params, problem.columns
  batch = {s: 2.0 * b * rows * rows * p + b * f for s, f in _solvers(rows, k, mode, c).items()}
  param = {s: problem.gram_flops + b * f for s, f in _solvers(p, k, mode, c).items()}
  system, costs = ("batch", batch) if min(batch.values()) < min(param.values()) else (
      "parameter", param)
  solver = min(costs, key=costs.get)
  reordered = system == "batch" and solver in ("inverse", "eig_cg") and p < k
  unroll = solver in ("cg", "eig_cg") and mode.cg_steps <= c["unroll_steps"]
  return Plan(system, solver, multiply_a_first=reordered, unroll=unroll)


def with_columns_split(chosen: Plan) -> Plan:
  """``chosen`` for a solve whose columns are split over devices: XLA splits a product by
  its columns but runs a triangular solve whole on every device, so an exact solve applies
  the (small, replicated) inverse instead of two triangular solves."""
  return dataclasses.replace(chosen, solver="inverse") if chosen.solver == "cholesky" else chosen


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
