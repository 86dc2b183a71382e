"""Test helpers shared by several test files (test files import this, never each other)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def rel_err(got, want) -> float:
  """``max|got − want| / max|want|`` in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


def product_eps(precision=None) -> float:
  """The relative rounding of a float32 matrix product's inputs at ``precision`` on the
  default backend: what a float32 result computed at that precision is accurate to.

  XLA's CPU backend ignores the setting (float32, 2⁻²⁴). On a GPU, ``DEFAULT`` and
  ``HIGH`` products of float32 run in TF32 (10 mantissa bits, 2⁻¹¹); on a TPU in one
  bfloat16 pass (``DEFAULT``, 2⁻⁸) or three (``HIGH``, ≈ 2⁻¹⁶). ``HIGHEST`` is float32
  everywhere.
  """
  precision = jax.lax.Precision(precision) if isinstance(precision, str) else precision
  if precision == jax.lax.Precision.HIGHEST:
    return 2.0**-24
  backend = jax.default_backend()
  if backend == "gpu":
    return 2.0**-11
  if backend == "tpu":
    return 2.0**-16 if precision == jax.lax.Precision.HIGH else 2.0**-8
  return 2.0**-24


def gpu_marked(values, *chosen) -> list:
  """``values`` for ``pytest.mark.parametrize``, those in ``chosen`` marked ``gpu``: in the GPU
  smoke set (``python -m pytest -m gpu tests``; tests/test_markers.py checks what it covers)."""
  return [pytest.param(v, marks=pytest.mark.gpu) if v in chosen else v for v in values]


def flat(dk, db):
  """Kernel and bias directions as the ``(p, out)`` columns of ``θ = [W; b]``."""
  dk = np.asarray(dk).reshape(-1, np.shape(dk)[-1])
  return dk if db is None else np.concatenate([dk, np.asarray(db)[None]], axis=0)


def matrix_free_direction(layer_fn, x, kernel, bias, g, lam, steps):
  """Per-output-column ``jax.scipy.sparse.linalg.cg`` with ``v ↦ vjp(jvp(v)) + λv``.

  A second implementation of ``prox_cgN`` that forms no matrix: it only calls the
  plain layer ``layer_fn(x, kernel, bias)``.
  """
  params = (kernel, bias)

  def column(c):
    def embed(v):
      return jax.tree.map(lambda p, vi: jnp.zeros_like(p).at[..., c].set(vi), params, v)

    apply = lambda v: layer_fn(x, *embed(v))
    zero = jax.tree.map(lambda p: p[..., 0] * 0, params)
    _, apply_t = jax.vjp(apply, zero)
    operator = lambda v: jax.tree.map(lambda a, v: a + lam * v, apply_t(apply(v))[0], v)
    rhs = apply_t(g)[0]
    return jax.scipy.sparse.linalg.cg(operator, rhs, tol=0.0, atol=0.0, maxiter=steps)[0]

  dk, db = jax.vmap(column, out_axes=-1)(jnp.arange(kernel.shape[-1]))
  return dk, db


# ------------------------------------------------------------------ experiments


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_FIELDS = {"epoch", "minibatch_avg_loss", "full_batch_loss", "full_batch_acc", "val_loss",
                 "val_acc", "epoch_time_s"}
SUMMARY_FIELDS = {"test_loss", "test_acc", "train_time_s", "steps_per_s", "device", "epochs",
                  "diverged"}
# A small run on the offline digits: 2 steps per epoch.
DIGITS_FLAGS = ["--dataset", "digits", "--train-samples", "200", "--batch-size", "100",
                "--quiet"]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_metrics(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def read_run(out):
  """``(config, metrics, summary)`` of a finished run folder."""
  return (read_json(os.path.join(out, "config.json")), read_metrics(out),
          read_json(os.path.join(out, "summary.json")))


def without_times(metrics):
  return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in metrics]


def checkpoint_epochs(out):
  """The epochs of the checkpoints on disk, sorted."""
  folder = os.path.join(out, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def check_run_files(out, flags, epochs=2):
  """Asserts what every finished run folder holds; returns ``(config, metrics, summary)``."""
  config, metrics, summary = read_run(out)
  for flag, value in zip(flags[::2], flags[1::2]):
    assert str(config[flag.removeprefix("--").replace("-", "_")]) == value
  assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
  for m in metrics:
    assert set(m) == METRIC_FIELDS
    assert all(math.isfinite(v) for v in m.values())
    assert 0 <= m["full_batch_acc"] <= 1 and 0 <= m["val_acc"] <= 1 and m["epoch_time_s"] > 0
  assert metrics[0]["full_batch_loss"] != metrics[1]["full_batch_loss"]  # it trained
  assert SUMMARY_FIELDS <= set(summary) and 0 <= summary["test_acc"] <= 1
  assert summary["steps_per_s"] > 0 and "cpu" in summary["device"]
  assert summary["train_time_s"] == sum(m["epoch_time_s"] for m in metrics)
  assert summary["epochs"] == epochs and summary["diverged"] is False
  assert checkpoint_epochs(out)[-1] == epochs
  return config, metrics, summary


# The tests compile hundreds of small programs and run each a few times: XLA's backend
# optimisations cost more compile time than they save (the suite runs ~1.4x faster without
# them; results stay within every test's tolerance). tests/conftest.py sets this for the
# test processes; subprocesses that set their own XLA_FLAGS add it with `xla_flags`.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(*flags: str) -> str:
  """An ``XLA_FLAGS`` value: `FAST_COMPILE` and ``flags``."""
  return " ".join((FAST_COMPILE,) + flags)


def subprocess_env(**extra):
  """The environment of a command-line subprocess: this one, plus ``extra``."""
  return {**os.environ, **extra}


# Runs ``python -m MODULE ARGS`` with Ctrl-C armed. A job started in the background by a
# non-interactive shell (as CI may run the tests) inherits SIGINT ignored, and Python then
# leaves it ignored; restoring Python's handler first gives the child the KeyboardInterrupt a
# terminal's Ctrl-C would give. (A preexec_fn would do it too, but forks a multithreaded JAX.)
_WITH_CTRL_C = ("import runpy, signal, sys; "
                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def start_command(module, args) -> subprocess.Popen:
  """Starts ``python -m module args`` with Ctrl-C armed, its output piped as text."""
  return subprocess.Popen([sys.executable, "-c", _WITH_CTRL_C, module, *args], cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def product_precisions(closed_jaxpr) -> list:
  """The ``precision`` of every matrix product and convolution in a jaxpr, sub-jaxprs
  (loops, custom rules, jit) included; one entry per product (the lhs/rhs pair collapsed,
  unset as ``DEFAULT``)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        p = eqn.params["precision"]
        p = p[0] if isinstance(p, tuple) else p
        found.append(jax.lax.Precision.DEFAULT if p is None else p)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return found
