import math

import pytest

import proxprop_jax as pp


@pytest.mark.parametrize("text,cg_steps", [("gradient", None), ("prox_exact", None),
                                           ("prox_cg1", 1), ("prox_cg3", 3), ("prox_cg25", 25)])
def test_parse_valid(text, cg_steps):
  mode = pp.parse_mode(text)
  assert mode.name == text and str(mode) == text
  assert mode.cg_steps == cg_steps
  assert mode.is_cg == (cg_steps is not None)
  assert mode.is_exact == (text == "prox_exact")
  assert mode.is_gradient == (text == "gradient")
  assert pp.parse_mode(mode) is mode


def test_mode_is_frozen_and_hashable():
  a, b = pp.parse_mode("prox_cg3"), pp.parse_mode("prox_cg3")
  assert a == b and hash(a) == hash(b) and len({a, b, pp.parse_mode("prox_cg4")}) == 2
  with pytest.raises(AttributeError):
    a.cg_steps = 4


@pytest.mark.parametrize("bad", ["prox_cg0", "prox_cg", "prox_cgx", "exact", "prox_cg-1",
                                 "prox_cg03", "Gradient", " prox_exact", "", None, 3])
def test_parse_invalid_names_valid_forms(bad):
  with pytest.raises(ValueError, match=r"'gradient', 'prox_exact' or 'prox_cgN'"):
    pp.parse_mode(bad)


@pytest.mark.parametrize("tau", [1, 0.05, 1e6, 1e-8])
def test_check_tau_valid(tau):
  assert pp.check_tau(tau) == float(tau)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "a", None, True])
def test_check_tau_invalid(bad):
  with pytest.raises(ValueError, match="tau_prox must be a finite number > 0"):
    pp.check_tau(bad)
