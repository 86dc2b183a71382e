"""Shared test set-up: fast XLA compilation; float64 comparisons run under an ``x64`` fixture
(lineax style)."""

import os

from tests import helpers

# Before JAX starts its backend (it reads XLA_FLAGS once); subprocesses inherit it.
os.environ["XLA_FLAGS"] = helpers.xla_flags(os.environ.get("XLA_FLAGS", "")).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


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
