"""Helpers shared by the tests of ``experiments/`` (test files import this, never each other)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

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


def subprocess_env(**extra):
  """The environment of a command-line subprocess: this interpreter's, one BLAS thread."""
  return {**os.environ, "OPENBLAS_NUM_THREADS": "1", **extra}


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
