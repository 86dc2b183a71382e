"""Plots any set of runs and prints their results table.

    python -m experiments.plot runs/digits/mlp_backprop runs/digits/mlp_prox_cg3 --out mlp.png

Runs are labelled by model, mode, tau, optimizer and learning rate from their config.json
(``--labels`` to choose); the title says what the runs share (``--title`` to choose).
``--diagnostics FILE`` also draws what runs trained with ``--diagnostics`` logged: the solve's
relative residual and the direction's cosine to the gradient, per layer and epoch.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import plots


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="folders written by experiments.cifar")
  parser.add_argument("--out", default="runs.png", help="image file (.png, .pdf, .svg)")
  parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                      help="legend labels, one per RUN_DIR (default: from each config.json)")
  parser.add_argument("--title", default=None, help="figure title (default: what the runs "
                      "share: dataset, batch size, epochs)")
  parser.add_argument("--diagnostics", default=None, metavar="FILE",
                      help="also draw the logged diagnostics of the runs into FILE")
  args = parser.parse_args(argv)
  if args.labels is not None and len(args.labels) != len(args.run_dirs):
    parser.error(f"--labels gives {len(args.labels)} labels for {len(args.run_dirs)} runs")
  missing = [d for d in args.run_dirs if not os.path.isdir(d)]
  if missing:
    parser.error(f"not a folder: {', '.join(missing)}")
  labels = args.labels or [None] * len(args.run_dirs)
  runs = [plots.load_run(d, label) for d, label in zip(args.run_dirs, labels)]
  all_labels = [run["label"] for run in runs]
  for run in runs:  # two runs with the same settings: tell them apart by their folders
    if all_labels.count(run["label"]) > 1:
      run["label"] += f" ({os.path.basename(os.path.normpath(run['dir']))})"
  title = plots.describe_runs(runs) if args.title is None else args.title
  diagnostics = None
  if args.diagnostics is not None:  # refused before anything is written
    try:
      diagnostics = plots.diagnostics_figure(runs, title)
    except ValueError as e:
      parser.error(f"--diagnostics: {e}")
  for warning in plots.mixed_settings(runs):
    print(f"warning: {warning}", file=sys.stderr)
  for run in runs:
    if not run["metrics"]:
      print(f"warning: {run['dir']} has no finished epoch yet: nothing to draw for it",
            file=sys.stderr)
  plots.runs_figure(runs, title).savefig(args.out, dpi=120)
  print(plots.results_table(runs), end="")
  print(f"wrote {args.out}")
  if diagnostics is not None:
    diagnostics.savefig(args.diagnostics, dpi=120)
    print(f"wrote {args.diagnostics}")


if __name__ == "__main__":
  main()
