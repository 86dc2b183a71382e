"""Shared test set-up: float64 comparisons run under an ``x64`` fixture (lineax style)."""

import jax
import pytest


@pytest.fixture
def x64():
  """Enables float64 and strict dtype promotion for the test."""
  with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
    yield
