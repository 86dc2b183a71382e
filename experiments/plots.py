"""Figures and tables from run folders (the files ``experiments.train`` writes).

Every figure has the same four panels per row, in this order: training loss vs epochs, training
loss vs time, validation error vs epochs, validation error vs time. Validation error
(1 - accuracy) is drawn on a log axis, so runs at 97% and 98% accuracy stay apart. A method
(``mode``) keeps one colour in every panel of a figure.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: works without a display or a GUI backend

from experiments import records


class Metric(NamedTuple):
  key: str  # field of metrics.jsonl
  label: str  # axis label
  short: str  # in panel titles


LOSS = Metric("full_batch_loss", "full-batch training loss", "training loss")
VAL_ERROR = Metric("val_acc", "validation error (1 - accuracy)", "validation error")
PANELS = [(LOSS, "epochs"), (LOSS, "time"), (VAL_ERROR, "epochs"), (VAL_ERROR, "time")]
MODEL_TITLES = {"mlp": "MLP", "convnet": "ConvNet", "resnet": "ResNet", "vit": "ViT"}
# Methods in the order legends and colours follow; other modes come after, sorted.
METHOD_ORDER = ("backprop", "gradient", "prox_exact", "prox_cg1", "prox_cg3", "prox_cg5",
                "prox_cg10")


def load_run(run_dir: str, label: str | None = None) -> dict:
  """Reads one run folder: its config, per-epoch metrics (maybe none yet) and summary.

  Args:
    run_dir: a folder written by ``experiments.cifar``.
    label: its legend label; None: `run_label` of its config (the folder name without one).
  """
  config = records.read_json(os.path.join(run_dir, records.CONFIG))
  if label is None:
    label = run_label(config) if config else os.path.basename(os.path.normpath(run_dir))
  return dict(label=label, dir=run_dir, config=config,
              summary=records.read_json(os.path.join(run_dir, records.SUMMARY)),
              metrics=records.read_jsonl(os.path.join(run_dir, records.METRICS)))


def method_label(mode: str) -> str:
  """``BackProp``, ``ProxProp (exact)``, ``ProxProp (cg3)``, ``ProxProp (gradient)``."""
  if mode == "backprop":
    return "BackProp"
  return f"ProxProp ({mode.removeprefix('prox_')})"


def run_label(config: dict) -> str:
  """Model, mode, tau (ProxProp only), optimizer and learning rate of a run's config."""
  tau = "" if config["mode"] == "backprop" else f" τ={config['tau_prox']:g}"
  return f"{config['model']} {config['mode']}{tau} {config['optimizer']} lr={config['lr']:g}"


def legend_label(run: dict) -> str:
  """The run's label, and where it diverged if it did."""
  summary = run["summary"] or {}
  if summary.get("diverged"):
    return f"{run['label']} (diverged at epoch {summary['diverged_epoch']})"
  return run["label"]


def method_of(run: dict) -> str:
  """The run's mode (its folder name when it has no config)."""
  return run["config"]["mode"] if run["config"] else run["label"]


def colours(keys) -> dict:
  """One colour per key (a method), in `METHOD_ORDER`, the same in every panel."""
  ordered = sorted(set(keys), key=lambda k: (METHOD_ORDER.index(k) if k in METHOD_ORDER
                                             else len(METHOD_ORDER), k))
  palette = colormaps["tab10"].colors
  return {k: palette[i % len(palette)] for i, k in enumerate(ordered)}


def _series(runs, metric: Metric, versus: str):
  """``x`` and the mean, min and max of ``metric`` over ``runs`` (seeds of one method; one
  run: its values), up to the shortest run; versus time: the mean training time."""
  n = min(len(r["metrics"]) for r in runs)
  values = np.array([[m[metric.key] for m in r["metrics"][:n]] for r in runs], float)
  if metric is VAL_ERROR:
    values = 1.0 - values
  if versus == "epochs":
    x = np.array([m["epoch"] for m in runs[0]["metrics"][:n]])
  else:  # training time only, as the paper plots it
    x = np.mean([np.cumsum([m["epoch_time_s"] for m in r["metrics"][:n]]) for r in runs], 0)
  return x, values.mean(0), values.min(0), values.max(0)


def _group_label(runs) -> str:
  return legend_label(runs[0]) if len(runs) == 1 else f"{runs[0]['label']} ({len(runs)} seeds)"


def _panel(ax, groups, metric: Metric, versus: str, title: str, colour_of: dict, key_of):
  for runs in groups:
    if all(r["metrics"] for r in runs):
      x, mean, low, high = _series(runs, metric, versus)
      colour = colour_of[key_of(runs[0])]
      ax.plot(x, mean, label=_group_label(runs), color=colour,
              marker="o" if len(x) == 1 else None)  # one epoch: a point, not an empty line
      if len(runs) > 1:
        ax.fill_between(x, low, high, color=colour, alpha=0.2)
  ax.set_xlabel("epoch" if versus == "epochs" else "training time [s]")
  ax.set_ylabel(metric.label)
  # An error of 0 has no place on a log axis: leave that point out rather than squash the axis.
  ax.set_yscale("log", nonpositive="mask")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_lines():
    ax.legend(fontsize="small")


def _rows_figure(rows, key_of, title: str) -> Figure:
  """One row of `PANELS` per ``(row title, groups)``; a group is a list of runs drawn as one
  curve (several: seeds, their mean and min–max band); colours by ``key_of(run)``."""
  colour_of = colours(key_of(g[0]) for _, groups in rows for g in groups)
  fig = Figure(figsize=(4.2 * len(PANELS), 3.6 * len(rows)), layout="constrained")
  grid = fig.add_gridspec(len(rows), len(PANELS))
  for r, (row_title, groups) in enumerate(rows):
    for c, (metric, versus) in enumerate(PANELS):
      prefix = f"{row_title}: " if row_title else ""
      _panel(fig.add_subplot(grid[r, c]), groups, metric, versus,
             f"{prefix}{metric.short} vs {versus}", colour_of, key_of)
  if title:
    fig.suptitle(title)
  return fig


def paper_figure(runs_by_model: dict, title: str = "") -> Figure:
  """The paper's figure: one row of the four panels per model, one colour per method.

  Args:
    runs_by_model: ``{"mlp": [run, ...], "convnet": [run, ...]}`` (runs from `load_run`);
      models without runs are left out.
    title: figure title.
  """
  rows = [(MODEL_TITLES.get(m, m), [[r] for r in runs]) for m, runs in runs_by_model.items()
          if runs]
  return _rows_figure(rows, method_of, title)


def runs_figure(runs: list, title: str = "") -> Figure:
  """Any set of runs in one row of the four panels, one colour per run."""
  return _rows_figure([("", [[r] for r in runs])], lambda run: run["label"], title)


def seeds_figure(runs_by_model: dict, title: str = "") -> Figure:
  """One row of the four panels per model; each method is the mean over its seeds with a
  min–max band, one colour per method (its runs' label) in every panel.

  Args:
    runs_by_model: ``{model: {method: [run of each seed, ...]}}`` (runs from `load_run`).
    title: figure title.
  """
  rows = [(MODEL_TITLES.get(m, m), list(by_method.values()))
          for m, by_method in runs_by_model.items()]
  return _rows_figure(rows, lambda run: run["label"], title)


DIAGNOSTIC_PANELS = (("relative_residual", "relative residual of the solve", "log"),
                     ("cosine_to_gradient", "cosine to the gradient", "linear"))


def has_diagnostics(run: dict) -> bool:
  """Whether the run logged ``--diagnostics`` in its metrics."""
  return any("diagnostics" in m for m in run["metrics"])


def diagnostics_figure(runs: list, title: str = "") -> Figure:
  """Per run with diagnostics, one row: each `DIAGNOSTIC_PANELS` number vs epochs, one line
  per ProxProp layer (the layer's path in the model)."""
  runs = [r for r in runs if has_diagnostics(r)]
  if not runs:
    raise ValueError("none of these runs logged diagnostics (train with --diagnostics)")
  fig = Figure(figsize=(5.5 * len(DIAGNOSTIC_PANELS), 3.6 * len(runs)), layout="constrained")
  grid = fig.add_gridspec(len(runs), len(DIAGNOSTIC_PANELS))
  for r, run in enumerate(runs):
    rows = [m for m in run["metrics"] if "diagnostics" in m]
    layers = list(dict.fromkeys(path for m in rows for path in m["diagnostics"]))
    for c, (key, label, scale) in enumerate(DIAGNOSTIC_PANELS):
      ax = fig.add_subplot(grid[r, c])
      for path in layers:
        points = [(m["epoch"], m["diagnostics"][path][key]) for m in rows
                  if path in m["diagnostics"]]
        ax.plot(*zip(*points), marker=".", label=path)
      ax.set_yscale(scale, **({"nonpositive": "mask"} if scale == "log" else {}))
      ax.set_xlabel("epoch")
      ax.set_ylabel(label)
      ax.set_title(f"{run['label']}: {label}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize="x-small", title="layer")
  if title:
    fig.suptitle(title)
  return fig


def describe_runs(runs: list) -> str:
  """What a set of runs has in common, for a title: dataset, batch size, epochs.

  Says only what the runs show: a setting that differs between them is named as differing.
  """
  configs = [r["config"] for r in runs if r["config"]]
  parts = []
  for key, fmt in (("dataset", "{}"), ("batch_size", "batch {}")):
    values = sorted({str(c[key]) for c in configs})
    parts.append(fmt.format(values[0]) if len(values) == 1 else
                 f"{key.replace('_', ' ')}s {', '.join(values)}")
  epochs = sorted({len(r["metrics"]) for r in runs})
  parts.append(f"{epochs[0]} epochs" if len(epochs) == 1 else
               f"{epochs[0]}-{epochs[-1]} epochs (per run: see the table)")
  return ", ".join(parts)


def mixed_settings(runs: list) -> list[str]:
  """Warnings for runs that should not share axes: different models or datasets."""
  out = []
  for key in ("model", "dataset"):
    values = sorted({r["config"][key] for r in runs if r["config"]})
    if len(values) > 1:
      out.append(f"these runs mix {key}s ({', '.join(values)}): their curves are not "
                 f"comparable")
  return out


def results_table(runs: list) -> str:
  """Markdown table: epochs, final full-batch loss, best/final validation accuracy, test
  accuracy and mean epoch time (training steps only) of each run; a diverged run says in
  which epoch, one without a finished epoch shows dashes."""
  lines = ["| run | epochs | final full-batch loss | best val acc | final val acc | test acc "
           "| mean epoch time (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for run in runs:
    m, s = run["metrics"], run["summary"] or {}
    if s.get("diverged"):
      test = f"diverged at epoch {s['diverged_epoch']}"
    else:
      test = f"{s['test_acc']:.4f}" if s.get("test_acc") is not None else "–"
    if m:
      cells = (f"{m[-1]['full_batch_loss']:.4f} | {max(e['val_acc'] for e in m):.4f} "
               f"| {m[-1]['val_acc']:.4f} | {test} "
               f"| {np.mean([e['epoch_time_s'] for e in m]):.3f}")
    else:
      cells = f"– | – | – | {test} | –"
    lines.append(f"| {run['label']} | {len(m)} | {cells} |")
  return "\n".join(lines) + "\n"
