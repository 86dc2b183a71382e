"""Parsing and validation of ProxProp modes and step sizes.

A mode says which parameter direction ``D`` a ProxProp layer returns in its
backward pass (``A`` = the layer's input matrix with a ones column for the bias,
``g = ∂L/∂z``, ``λ = 1/τ``):

* ``"gradient"``:   ``D = Aᵀ g`` (the plain gradient);
* ``"prox_exact"``: ``D = (AᵀA + λI)⁻¹ Aᵀ g`` (the exact proximal step);
* ``"prox_cgN"``:   ``N ≥ 1`` conjugate-gradient steps on ``(AᵀA + λI) D = Aᵀ g``
  from ``D = 0``, one independent CG per output column.

Modes are parsed once, when a layer is built or called, so a typo fails with a
clear message instead of deep inside a trace.
"""

from __future__ import annotations

import dataclasses
import math
import re

VALID_MODES = "'gradient', 'prox_exact' or 'prox_cgN' with an integer N >= 1 (e.g. 'prox_cg3')"

_CG_PATTERN = re.compile(r"prox_cg([1-9][0-9]*)")


@dataclasses.dataclass(frozen=True)
class Mode:
  """A parsed ProxProp mode (frozen and hashable, so it can be static jit data).

  Attributes:
    name: the canonical mode string, e.g. ``"prox_cg3"``.
    cg_steps: the number of CG steps for ``prox_cgN``, else ``None``.
  """

  name: str
  cg_steps: int | None = None

  @property
  def is_gradient(self) -> bool:
    return self.name == "gradient"

  @property
  def is_exact(self) -> bool:
    return self.name == "prox_exact"

  @property
  def is_cg(self) -> bool:
    return self.cg_steps is not None

  def __str__(self) -> str:
    return self.name


def parse_mode(mode: str | Mode) -> Mode:
  """Parses ``"gradient"``, ``"prox_exact"`` or ``"prox_cgN"`` (N ≥ 1) into a `Mode`.

  Args:
    mode: a mode string, or an already parsed `Mode` (returned unchanged).

  Returns:
    The parsed mode.

  Raises:
    ValueError: for anything else, naming the valid forms.
  """
  if isinstance(mode, Mode):
    return mode
  if isinstance(mode, str):
    if mode in ("gradient", "prox_exact"):
      return Mode(mode)
    match = _CG_PATTERN.fullmatch(mode)
    if match:
      return Mode(mode, int(match.group(1)))
  raise ValueError(f"Unknown ProxProp mode {mode!r}; valid modes are {VALID_MODES}.")


def check_tau(tau_prox) -> float:
  """Validates the proximal step size ``τ`` (``tau_prox``) and returns it as a float.

  Raises:
    ValueError: unless ``τ`` is a finite real number > 0.
  """
  try:
    tau = float(tau_prox)
  except (TypeError, ValueError):
    tau = math.nan
  if isinstance(tau_prox, bool) or not (math.isfinite(tau) and tau > 0):
    raise ValueError(
        f"tau_prox must be a finite number > 0 (the proximal step size τ, λ = 1/τ); "
        f"got {tau_prox!r}.")
  return tau
