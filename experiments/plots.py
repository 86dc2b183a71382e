"""Figures and tables from run folders (the files ``experiments.train`` writes)."""

from __future__ import annotations

import json
import os

from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure  # no pyplot: works without a display or a GUI backend


class Metric(NamedTuple):
  key: str  # field of metrics.jsonl
  label: str  # axis label
  short: str  # in panel titles
  log: bool  # log-scale axis


LOSS = Metric("full_batch_loss", "full-batch training loss", "training loss", True)
VAL_ACC = Metric("val_acc", "validation accuracy", "validation accuracy", False)


def load_run(run_dir: str, label: str | None = None) -> dict:
  """Reads one run folder: its config, per-epoch metrics and (if finished) summary."""

  def read_json(name):
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f if line.strip()]
  return dict(label=label or os.path.basename(os.path.normpath(run_dir)), dir=run_dir,
              config=read_json("config.json"), summary=read_json("summary.json"),
              metrics=metrics)


def _series(run, key, versus):
  metrics = run["metrics"]
  if versus == "epochs":
    x = [m["epoch"] for m in metrics]
  else:  # training time only, as the paper plots it
    x = np.cumsum([m["epoch_time_s"] for m in metrics])
  return x, [m[key] for m in metrics]


def _panel(ax, runs, metric: Metric, versus: str, title: str):
  for run in runs:
    ax.plot(*_series(run, metric.key, versus), label=run["label"])
  ax.set_xlabel("epoch" if versus == "epochs" else "training time [s]")
  ax.set_ylabel(metric.label)
  if metric.log:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")


# The paper's panels per model: (metric, versus).
PAPER_PANELS = {
    "mlp": [(LOSS, "epochs"), (LOSS, "time"), (VAL_ACC, "epochs")],
    "convnet": [(LOSS, "epochs"), (VAL_ACC, "epochs"), (LOSS, "time"), (VAL_ACC, "time")],
}
MODEL_TITLES = {"mlp": "MLP", "convnet": "ConvNet"}


def paper_figure(runs_by_model: dict, title: str = "") -> Figure:
  """The paper's figure: one row per model (MLP: 3 panels, ConvNet: 4 panels).

  Args:
    runs_by_model: ``{"mlp": [run, ...], "convnet": [run, ...]}`` (runs from `load_run`);
      models without runs are left out.
    title: figure title.
  """
  rows = [(m, runs) for m, runs in runs_by_model.items() if runs]
  columns = max(len(PAPER_PANELS[m]) for m, _ in rows)
  fig = Figure(figsize=(4.2 * columns, 3.6 * len(rows)), layout="constrained")
  grid = fig.add_gridspec(len(rows), columns)
  for r, (model, runs) in enumerate(rows):
    for c, (metric, versus) in enumerate(PAPER_PANELS[model]):
      _panel(fig.add_subplot(grid[r, c]), runs, metric, versus,
             f"{MODEL_TITLES[model]}: {metric.short} vs {versus}")
  if title:
    fig.suptitle(title)
  return fig


def runs_figure(runs: list) -> Figure:
  """Any set of runs: full-batch loss and validation accuracy, vs epochs and vs time."""
  fig = Figure(figsize=(16.8, 3.6), layout="constrained")
  for i, (metric, versus) in enumerate(
      [(LOSS, "epochs"), (LOSS, "time"), (VAL_ACC, "epochs"), (VAL_ACC, "time")]):
    _panel(fig.add_subplot(1, 4, i + 1), runs, metric, versus, f"{metric.short} vs {versus}")
  return fig


def results_table(runs: list) -> str:
  """Markdown table: final full-batch loss, best/final validation accuracy, test accuracy and
  mean epoch time (training steps only) of each run."""
  lines = ["| run | epochs | final full-batch loss | best val acc | final val acc | test acc "
           "| mean epoch time (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for run in runs:
    m, s = run["metrics"], run["summary"]
    test = f"{s['test_acc']:.4f}" if s else "–"
    lines.append(
        f"| {run['label']} | {len(m)} | {m[-1]['full_batch_loss']:.4f} "
        f"| {max(e['val_acc'] for e in m):.4f} | {m[-1]['val_acc']:.4f} | {test} "
        f"| {np.mean([e['epoch_time_s'] for e in m]):.3f} |")
  return "\n".join(lines) + "\n"
