"""Shared test set-up: fast XLA compilation; float64 comparisons run under an ``x64`` fixture
(lineax style)."""

import os
import tempfile
import time

from tests import helpers

# Before JAX starts its backend (it reads XLA_FLAGS once); subprocesses inherit it.
os.environ["XLA_FLAGS"] = helpers.xla_flags(os.environ.get("XLA_FLAGS", "")).strip()
# `pytest -n N` on a GPU machine: N test processes share the GPU, so each allocates what it
# uses instead of JAX's default 75% of the GPU's memory up front (the second would not get it).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The runs the tests start (in these processes and in subprocesses) keep their persistent
# compilation cache in one folder of this test session, never in the user's ~/.cache.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(), f"proxprop_jax_tests_{_SESSION}")

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
  ``experiments.paper`` and ``experiments.plot``, which leave its runs as they are).

  Under ``pytest -n`` the test processes share one grid: the first to create the folder
  trains it, the others wait for its ``done`` file.
  """
  from experiments import paper  # pylint: disable=import-outside-toplevel

  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # common to all workers of this session
  out, done, failed = (shared / f"paper_grid{end}" for end in ("", ".done", ".failed"))
  try:
    out.mkdir()
  except FileExistsError:  # another process trains it
    deadline = time.monotonic() + 900
    while not done.exists():
      if failed.exists() or time.monotonic() > deadline:
        pytest.fail(f"the process training the paper grid in {out} failed or timed out")
      time.sleep(1)
    return str(out)
  try:
    paper.main(["--out", str(out), "--dataset", "digits", "--epochs", "2", "--train-samples",
                "200", "--batch-size", "100", "--quiet"])
  except BaseException:
    failed.touch()
    raise
  done.touch()
  return str(out)
