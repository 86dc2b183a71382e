"""``import proxprop_jax`` limits the BLAS behind JAX's CPU LAPACK calls to one thread.

Each case starts a fresh Python (the limit is applied once, at import, and
``OPENBLAS_NUM_THREADS`` is read when OpenBLAS loads) and asks threadpoolctl for the thread
counts of SciPy's bundled OpenBLAS (the one jaxlib's LAPACK calls go through) and of
NumPy's BLAS.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from proxprop_jax import _threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent("""
    import json, os, sys
    import proxprop_jax
    import numpy, scipy, scipy.linalg.cython_lapack, threadpoolctl
    scipy_dir = os.path.dirname(scipy.__file__)
    numpy_dir = os.path.dirname(numpy.__file__)
    def owner(path):
      path = os.path.realpath(path)
      for name, folder in (("scipy", scipy_dir), ("numpy", numpy_dir)):
        if path.startswith(folder + os.sep) or path.startswith(folder + ".libs" + os.sep):
          return name
      return "other"
    counts = {}
    for lib in threadpoolctl.threadpool_info():
      if lib["user_api"] == "blas":
        counts.setdefault(owner(lib["filepath"]), []).append(lib["num_threads"])
    print(json.dumps(counts))
""")


def _probe(**env_vars):
  """Thread counts per BLAS owner (``scipy``/``numpy``/``other``) after ``import proxprop_jax``."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("OPENBLAS_NUM_THREADS", _threads.ENV_VAR)}
  env.update(env_vars, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def untouched():
  """The counts OpenBLAS starts with when proxprop_jax leaves it alone."""
  counts, _ = _probe(PROXPROP_BLAS_THREADS="keep")
  if "scipy" not in counts:
    pytest.skip("SciPy has no bundled BLAS here (shared BLAS: covered by test_plan_*)")
  if max(counts["scipy"]) < 2:
    pytest.skip("OpenBLAS starts with one thread on this machine: nothing to limit")
  return counts


def test_import_limits_scipy_openblas_to_one_thread(untouched):
  counts, stderr = _probe()
  assert counts["scipy"] == [1] * len(untouched["scipy"])
  assert counts.get("numpy") == untouched.get("numpy")  # NumPy's own BLAS is left alone
  assert "RuntimeWarning" not in stderr


def test_environment_variable_sets_the_thread_count(untouched):
  threads = max(untouched["scipy"]) + 1  # differs from both OpenBLAS's own count and 1
  counts, _ = _probe(PROXPROP_BLAS_THREADS=str(threads))
  assert counts["scipy"] == [threads] * len(untouched["scipy"])


def test_users_openblas_num_threads_is_respected(untouched):
  counts, _ = _probe(OPENBLAS_NUM_THREADS="2")
  assert counts["scipy"] == [2] * len(untouched["scipy"])


def test_bad_environment_value_names_the_valid_choices():
  env = dict(os.environ, PROXPROP_BLAS_THREADS="all", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "import proxprop_jax"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "PROXPROP_BLAS_THREADS='all'" in proc.stderr
  assert "positive integer" in proc.stderr and "'keep'" in proc.stderr


SCIPY_DIR = "/site-packages/scipy"
OWN = {"filepath": "/site-packages/scipy.libs/libscipy_openblas.so", "num_threads": 8}
SHARED = {"filepath": "/opt/conda/lib/libopenblas.so", "num_threads": 8}
NUMPY_DIR = "/site-packages/numpy"
NUMPY_OWN = {"filepath": "/site-packages/numpy.libs/libscipy_openblas64_.so", "num_threads": 8}


def test_plan_limits_only_scipys_own_blas():
  libs, threads, warning = _threads.plan([OWN, SHARED], [SCIPY_DIR, SCIPY_DIR + ".libs"],
                                        env={})
  assert (libs, threads, warning) == ([OWN], 1, None)


def test_plan_warns_with_the_remedy_for_a_shared_blas():
  libs, threads, warning = _threads.plan([SHARED, NUMPY_OWN], [SCIPY_DIR, SCIPY_DIR + ".libs"],
                                        [NUMPY_DIR, NUMPY_DIR + ".libs"], env={})
  assert libs == [] and threads is None
  assert SHARED["filepath"] in warning and "PROXPROP_BLAS_THREADS=1" in warning
  assert "OPENBLAS_NUM_THREADS=1" in warning and "PROXPROP_BLAS_THREADS=keep" in warning
  assert NUMPY_OWN["filepath"] not in warning


def test_plan_is_silent_when_only_numpys_own_blas_is_seen():
  # e.g. SciPy on Apple's Accelerate next to NumPy's bundled OpenBLAS: nothing is shared
  numpy_folders = [NUMPY_DIR, NUMPY_DIR + ".libs"]
  assert _threads.plan([NUMPY_OWN], [SCIPY_DIR], numpy_folders, env={}) == ([], None, None)


def test_plan_limits_a_shared_blas_when_asked():
  env = {"PROXPROP_BLAS_THREADS": "3"}
  assert _threads.plan([SHARED], [SCIPY_DIR], env=env) == ([SHARED], 3, None)


@pytest.mark.parametrize("env", [{"PROXPROP_BLAS_THREADS": "keep"},
                                 {"OPENBLAS_NUM_THREADS": "4"}])
def test_plan_changes_nothing_when_told_or_when_the_user_chose(env):
  assert _threads.plan([OWN, SHARED], [SCIPY_DIR], env=env) == ([], None, None)


def test_plan_is_silent_for_a_single_threaded_shared_blas():
  single = dict(SHARED, num_threads=1)
  assert _threads.plan([single], [SCIPY_DIR], env={}) == ([], None, None)
