"""ProxProp step time with and without ``OPENBLAS_NUM_THREADS=1``, before and after the limit.

    python -m benchmarks.blas_threads [--model mlp|convnet|all] [--modes prox_exact,prox_cg3]
                                      [--processes 2] [--repeats 10]

On CPU, jaxlib's LAPACK calls (Cholesky, eigh) go through SciPy's bundled OpenBLAS, whose
idle threads busy-wait and take cores from XLA; ``import proxprop_jax`` limits that
OpenBLAS to one thread. This script measures what that is worth.

``OPENBLAS_NUM_THREADS`` is read when OpenBLAS loads, so each setting of it (unset, ``1``)
gets its own Python process; the script starts ``--processes`` of each, alternating. Each
process imports the library with ``PROXPROP_BLAS_THREADS=keep`` (the limit not applied),
compiles one training step per mode (``benchmarks.common``: the paper's models, batch 500)
and then times, interleaved in that process, every mode *before* (SciPy's OpenBLAS at the
thread count it started with) and *after* (the count ``import proxprop_jax`` sets for the
same environment), switching with threadpoolctl: every round sets one of the two counts,
runs one untimed step, then each mode once in a shuffled order. Printed: the median step
time and its ratio to BackProp under the same setting, median over the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

DEFAULT_MODES = {"mlp": ("prox_exact", "prox_cg3", "prox_cg10"),
                 "convnet": ("prox_exact", "prox_cg3")}
SETTINGS = ("before", "after")


def _scipy_blas():
  """threadpoolctl's controller of SciPy's own BLAS, and the thread counts before/after."""
  import numpy
  import scipy
  import scipy.linalg.cython_lapack  # noqa: F401
  import threadpoolctl

  from proxprop_jax import _threads

  controller = threadpoolctl.ThreadpoolController()
  blas = [lib for lib in controller.info() if lib.get("user_api") == "blas"]
  user_env = {k: v for k, v in os.environ.items() if k != _threads.ENV_VAR}
  libraries, threads, _ = _threads.plan(blas, _threads.wheel_folders(scipy),
                                        _threads.wheel_folders(numpy), user_env)
  scipy_folders = _threads.wheel_folders(scipy)
  own = [lib for lib in blas if _threads.is_inside(lib["filepath"], scipy_folders)]
  if not own:
    raise SystemExit("SciPy has no bundled BLAS here; this benchmark measures that case only")
  selected = controller.select(filepath=[lib["filepath"] for lib in own])
  before = max(lib["num_threads"] for lib in own)
  return selected, {"before": before, "after": threads if libraries else before}


def child(models, modes_by_model, repeats: int) -> dict:
  """One process: every model's modes, before and after, interleaved; returns the medians."""
  import jax

  from benchmarks import common

  selected, counts = _scipy_blas()
  out = {"threads": counts, "rows": {}}
  rng = random.Random(0)
  for model in models:
    x, y = common.synthetic_batch(500)
    entries = [common.compile_step(model, mode, x, y)
               for mode in ("backprop", *modes_by_model[model])]
    for e in entries:  # warm-up
      for _ in range(2):
        e.state, loss = e.step(e.state, x, y)
        jax.block_until_ready((e.state, loss))
    times = {(s, e.name): [] for s in SETTINGS for e in entries}
    for _ in range(repeats):
      for setting in rng.sample(SETTINGS, len(SETTINGS)):
        selected.limit(limits=counts[setting])
        entries[0].state, loss = entries[0].step(entries[0].state, x, y)  # settle
        jax.block_until_ready(loss)
        for e in rng.sample(entries, len(entries)):
          start = time.perf_counter()
          e.state, loss = e.step(e.state, x, y)
          jax.block_until_ready((e.state, loss))
          times[setting, e.name].append(time.perf_counter() - start)
    out["rows"][model] = {f"{s}/{name}": statistics.median(t) for (s, name), t in times.items()}
    del entries
  return out


def _run_child(variable: str | None, args) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  env["PROXPROP_BLAS_THREADS"] = "keep"
  if variable is not None:
    env["OPENBLAS_NUM_THREADS"] = variable
  cmd = [sys.executable, "-m", "benchmarks.blas_threads", "--child", "--model", args.model,
         "--modes", args.modes or "", "--repeats", str(args.repeats)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"benchmark process failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _modes(args, model):
  if args.modes:
    return tuple(m.strip() for m in args.modes.split(",") if m.strip() and m != "backprop")
  return DEFAULT_MODES[model]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="all", choices=("mlp", "convnet", "all"))
  parser.add_argument("--modes", default=None, help="comma-separated ProxProp modes")
  parser.add_argument("--processes", type=int, default=2, help="processes per setting")
  parser.add_argument("--repeats", type=int, default=10, help="rounds per process")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  models = ("mlp", "convnet") if args.model == "all" else (args.model,)
  if args.child:
    print(json.dumps(child(models, {m: _modes(args, m) for m in models}, args.repeats)))
    return 0

  variables = {"unset": None, "=1": "1"}
  results = {name: [] for name in variables}
  for i in range(args.processes):
    for name, value in variables.items():
      print(f"process {i + 1}/{args.processes}, OPENBLAS_NUM_THREADS {name} ...",
            file=sys.stderr, flush=True)
      results[name].append(_run_child(value, args))

  threads = {name: runs[0]["threads"] for name, runs in results.items()}
  print("SciPy's OpenBLAS threads (before → after): "
        + "; ".join(f"OPENBLAS_NUM_THREADS {n}: {t['before']} → {t['after']}"
                    for n, t in threads.items()))
  print(f"{args.processes} processes per setting, alternating; {args.repeats} interleaved "
        f"rounds each; medians. before: SciPy's OpenBLAS as it starts (no limit); after: as "
        f"`import proxprop_jax` now leaves it. Cells: ratio to BackProp under the same "
        f"setting (step time)\n")
  columns = [(n, s) for n in variables for s in SETTINGS]
  print("| model | mode | " + " | ".join(
      f"OPENBLAS_NUM_THREADS {n}, {s}" for n, s in columns) + " |")
  print("|---|---|" + "---|" * len(columns))
  for model in models:
    for mode in ("backprop", *_modes(args, model)):
      cells = []
      for n, s in columns:
        ms = statistics.median(r["rows"][model][f"{s}/{mode}"] for r in results[n]) * 1e3
        ratio = statistics.median(r["rows"][model][f"{s}/{mode}"]
                                  / r["rows"][model][f"{s}/backprop"] for r in results[n])
        cells.append(f"{ratio:.2f} ({ms:.0f} ms)")
      print(f"| {model} | {mode} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
