"""Keeps the BLAS behind JAX's CPU LAPACK calls from slowing XLA down.

On CPU, jaxlib runs Cholesky, ``eigh`` and triangular solves through
``scipy.linalg.cython_lapack``, i.e. through the OpenBLAS bundled with SciPy's wheel. That
OpenBLAS starts one thread per core; between calls its idle threads busy-wait, taking
cores away from XLA's own thread pool, so every ProxProp step (which calls LAPACK on its
small batch- or parameter-space systems) slows down (``python -m benchmarks.blas_threads``
measures by how much). Setting ``OPENBLAS_NUM_THREADS=1`` before Python starts avoids it;
this module does the same at ``import proxprop_jax`` with ``threadpoolctl``, for SciPy's own
OpenBLAS only (its systems are small and XLA already keeps every core busy; NumPy's separate
BLAS is left as it is).

Environment:

* ``PROXPROP_BLAS_THREADS=N`` — use N threads instead of 1 (limits a BLAS shared with
  NumPy too); ``PROXPROP_BLAS_THREADS=keep`` — leave every BLAS alone.
* ``OPENBLAS_NUM_THREADS`` set by the user is respected: nothing is changed.

Where SciPy's LAPACK uses a BLAS shared with NumPy (e.g. a conda or system OpenBLAS/MKL),
limiting it would also slow NumPy, so nothing is changed and one warning gives the remedy.
"""

from __future__ import annotations

import os
import warnings

ENV_VAR = "PROXPROP_BLAS_THREADS"


def _leave_alone(env) -> bool:
  """``PROXPROP_BLAS_THREADS=keep``, or the user chose OpenBLAS's thread count themselves."""
  return env.get(ENV_VAR, "").strip() == "keep" or "OPENBLAS_NUM_THREADS" in env


def requested_threads(env=os.environ) -> int | None:
  """The thread count ``PROXPROP_BLAS_THREADS`` asks for; None for ``keep`` or unset."""
  value = env.get(ENV_VAR, "").strip()
  if value in ("", "keep"):
    return None
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"{ENV_VAR}={value!r}: valid values are a positive integer (the number of "
                     "BLAS threads for JAX's CPU LAPACK calls) or 'keep' (leave the BLAS alone)")
  return int(value)


def is_inside(path: str, folders) -> bool:
  """Whether ``path`` (links resolved) lies in one of ``folders``."""
  path = os.path.realpath(path)
  folders = [os.path.realpath(f) for f in folders]
  return any(os.path.commonpath([path, f]) == f for f in folders)


def plan(blas_libraries: list[dict], scipy_folders: list[str], numpy_folders: list[str] = (),
         env=os.environ):
  """Which BLAS libraries to limit, to how many threads, and what to warn about.

  ``blas_libraries``: threadpoolctl's info dicts (``filepath``, ``num_threads``, …) of the
  loaded BLAS libraries; ``scipy_folders`` / ``numpy_folders``: where SciPy's / NumPy's
  wheels keep their bundled libraries. A busy BLAS bundled with neither (a conda or system
  library) is taken to be the one SciPy links, shared with NumPy. Returns
  ``(libraries, threads, warning)``; ``warning`` is None or the text of the one warning.
  """
  if _leave_alone(env):
    return [], None, None
  requested = requested_threads(env)
  threads = 1 if requested is None else requested
  own = [lib for lib in blas_libraries if is_inside(lib["filepath"], scipy_folders)]
  if own:
    return own, threads, None
  if requested is not None:  # the user asked for it: shared or not, limit every BLAS
    return list(blas_libraries), threads, None
  busy = [lib for lib in blas_libraries if lib.get("num_threads", 1) > 1
          and not is_inside(lib["filepath"], numpy_folders)]
  if not busy:
    return [], None, None
  names = ", ".join(f"{lib['filepath']} ({lib['num_threads']} threads)" for lib in busy)
  return [], None, (
      f"JAX's CPU LAPACK calls (Cholesky, eigh) appear to use a BLAS shared with NumPy: "
      f"{names}. Its idle threads busy-wait and can make ProxProp steps much slower on CPU. "
      f"proxprop_jax leaves a shared BLAS alone; to limit it (NumPy's BLAS calls too), set "
      f"{ENV_VAR}=1 or OPENBLAS_NUM_THREADS=1 (MKL: MKL_NUM_THREADS=1) before starting "
      f"Python; {ENV_VAR}=keep silences this warning.")


def wheel_folders(module) -> list[str]:
  """Where a package's wheel keeps its bundled libraries (in it, or next to it in ``.libs``)."""
  package = os.path.dirname(module.__file__)
  return [package, package + ".libs"]


def limit_lapack_threads(env=os.environ):
  """Applies :func:`plan` to this process; returns the libraries it limited."""
  requested_threads(env)  # a bad value is an error even where nothing would be changed
  if _leave_alone(env):  # before importing SciPy: nothing to find out
    return []
  try:
    import numpy
    import scipy
    import scipy.linalg.cython_lapack  # noqa: F401  (loads the BLAS jaxlib's LAPACK uses)
    import threadpoolctl
  except ImportError:
    return []
  controller = threadpoolctl.ThreadpoolController()
  blas = [lib for lib in controller.info() if lib.get("user_api") == "blas"]
  libraries, threads, warning = plan(blas, wheel_folders(scipy), wheel_folders(numpy), env)
  if warning is not None:
    warnings.warn(warning, RuntimeWarning, stacklevel=2)
  if not libraries:
    return []
  selected = controller.select(filepath=[lib["filepath"] for lib in libraries])
  selected.limit(limits=threads)  # stays in effect: the limiter is never restored
  return [lib["filepath"] for lib in selected.info()]


#: the BLAS libraries limited at ``import proxprop_jax`` (their file paths)
LIMITED = limit_lapack_threads()
