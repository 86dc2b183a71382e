"""JAX's persistent compilation cache for the experiments' runs.

Every program a run compiles (the model's initialisation, the training step, evaluation) is
written to one folder and read back by any later process that compiles the same program
with the same jax/jaxlib, XLA flags and device kind: a resumed run, a rerun, the other seeds
of a grid. On a GPU the folder also keeps XLA's per-fusion autotuning results (JAX's
``jax_persistent_cache_enable_xla_caches``, on by default), which are most of a first
compile there.

The runs turn it on with ``--compile-cache DIR`` (default `DEFAULT`) and off with
``--no-compile-cache``. A library user does the same with two lines before the first
compile::

    jax.config.update("jax_compilation_cache_dir", "/path/to/cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

Whoever can write to the folder can make JAX run code: keep it private.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

#: The default folder: ``$XDG_CACHE_HOME/proxprop_jax/jax`` (``~/.cache/...``).
DEFAULT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                       "proxprop_jax", "jax")


def use(folder: str | None) -> str | None:
  """Makes every later compile of this process use the cache in ``folder`` (None: no
  cache); returns the folder's absolute path.

  Every program is cached, however fast it compiled (JAX's default keeps only those over
  1 s): on a CPU the model's initialisation is many small programs of a second or less.
  """
  if folder is not None:
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != folder:
    compilation_cache.set_cache_dir(folder)
    # JAX sets its cache up at the first compile of a process; start over so that a process
    # that compiled before (a notebook, a grid of runs) uses this folder from now on.
    compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  return folder
