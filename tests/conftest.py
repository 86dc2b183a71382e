"""Shared test set-up: float64 comparisons run under an ``x64`` fixture (lineax style)."""

import jax
import pytest


@pytest.fixture
def x64():
  """Enables float64 and strict dtype promotion for the test."""
  with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture(scope="session")
def paper_grid(tmp_path_factory):
  """The paper's whole grid on 200 digits, 2 epochs: the run folder (shared by the tests of
  ``experiments.paper`` and ``experiments.plot``, which leave its runs as they are)."""
  from experiments import paper  # pylint: disable=import-outside-toplevel

  out = str(tmp_path_factory.mktemp("paper"))
  paper.main(["--out", out, "--dataset", "digits", "--epochs", "2", "--train-samples", "200",
              "--batch-size", "100", "--quiet"])
  return out
