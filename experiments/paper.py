r"""Runs the paper's grid of experiments, then draws its figures and a results table.

    python -m experiments.paper --out runs/digits --dataset digits   # offline, CPU
    python -m experiments.paper --out runs/cifar10 --data-dir ~/tensorflow_datasets

Each run trains in ``OUT/<run name>`` (see ``experiments/train.py``). Running the command again
continues the grid: an unfinished run resumes from its last checkpoint, a finished one with
fewer epochs than ``--epochs`` is extended, one with as many is kept. A run folder holding
more epochs, other settings or other files but no run is reported and left as it is; a run that
diverges is recorded and the grid goes on. ``OUT/figures.png``, ``OUT/figures.pdf`` and
``OUT/results.md`` then describe every finished run in ``OUT``, each with its own number of
epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from experiments import cli
from experiments import config as config_lib
from experiments import plots
from experiments import records
from experiments import train

SHARED_FLAGS = ("dataset", "epochs", "batch_size", "train_samples", "data_dir", "seed",
                "parallel", "keep_checkpoints", "quiet", "compile_cache")


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.paper", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--out", required=True, help="folder of the grid's runs and figures")
  parser.add_argument("--only", choices=tuple(dict.fromkeys(r.model for r in
                                                            config_lib.PAPER_GRID)),
                      default=None, help="run only this model's part of the grid")
  config_lib.add_flags(parser, SHARED_FLAGS)
  return parser


def run_config(base: config_lib.RunConfig, out: str, run: config_lib.PaperRun):
  """One grid run's `RunConfig`: the shared flags with the run's own settings."""
  return dataclasses.replace(base, model=run.model, mode=run.mode, optimizer=run.optimizer,
                             lr=run.lr, tau_prox=run.tau_prox, out=os.path.join(out, run.name))


def plan(config) -> tuple[config_lib.RunConfig | None, str]:
  """What the grid trains for this run now (None: nothing), and what it says about it.

  The config to train has ``resume`` set where the run's folder holds a run (``config`` comes
  without it).
  """
  state = records.run_state(config.out)
  if state.status == "new":
    if os.path.isdir(config.out) and os.listdir(config.out):
      return None, "holds other files but no run; not used, left as it is (move them away)"
    return config, "starting"
  if state.config is None:
    return None, "holds a summary.json but no config.json; not reused, left as it is"
  changed = records.settings_differ({**config_lib.DEFAULTS, **state.config}, config,
                                    config_lib.RESUME_KEYS)
  if changed:
    return None, (f"holds a run with other settings (setting: (run, grid)): {changed}; not "
                  f"reused, reported as it is (move it away to rerun it)")
  if state.status == "diverged":
    return None, f"diverged at epoch {state.summary['diverged_epoch']} before; recorded as such"
  resume = dataclasses.replace(config, resume=True)
  if state.status == "started":
    return resume, f"resuming after epoch {state.epochs}"
  done = state.summary["epochs"]
  if done < config.epochs:
    return resume, f"finished with {done} epochs; extending to {config.epochs}"
  if done > config.epochs:
    return None, (f"finished with {done} epochs, more than --epochs {config.epochs}; not "
                  f"shortened, reported with its {done} epochs")
  return None, "finished, kept"


def finished_runs(out: str, grid) -> list[dict]:
  """Every finished (or diverged) run in ``out``: the grid's in grid order, then any other."""
  names = [r.name for r in grid]
  others = sorted(n for n in os.listdir(out) if n not in names) if os.path.isdir(out) else []
  runs = []
  for name in names + others:
    run_dir = os.path.join(out, name)
    state = records.run_state(run_dir)
    if state.status in ("finished", "diverged") and state.config is not None:
      runs.append(plots.load_run(run_dir, plots.method_label(state.config["mode"])))
  return runs


def write_results(out: str, runs: list[dict]):
  """Writes ``figures.png``/``.pdf`` (one row per model) and ``results.md`` (one table per
  model); returns the figure."""
  order = [r.model for r in config_lib.PAPER_GRID]
  by_model = {}
  for run in sorted(runs, key=lambda r: (order.index(r["config"]["model"])
                                         if r["config"]["model"] in order else len(order))):
    by_model.setdefault(run["config"]["model"], []).append(run)
  for model_runs in by_model.values():  # the same method twice in a row: name the folders
    labels = [r["label"] for r in model_runs]
    for run in model_runs:
      if labels.count(run["label"]) > 1:
        run["label"] += f" ({os.path.basename(run['dir'])})"
  legends = {}
  for model, model_runs in by_model.items():  # epochs differ in a row: the legend says so
    differ = len({len(r["metrics"]) for r in model_runs}) > 1
    legends[model] = [dict(r, label=f"{r['label']}, {len(r['metrics'])} epochs") if differ
                      else r for r in model_runs]
  fig = plots.paper_figure(legends, title=f"ProxProp paper grid: {plots.describe_runs(runs)}")
  for ext in ("png", "pdf"):
    fig.savefig(os.path.join(out, f"figures.{ext}"), dpi=120)
  text = "".join(f"### {plots.MODEL_TITLES.get(model, model)} "
                 f"({', '.join(sorted({r['config']['dataset'] for r in model_runs}))})\n\n"
                 f"{plots.results_table(model_runs)}\n" for model, model_runs in by_model.items())
  records.write_text(os.path.join(out, "results.md"), text)
  return fig


def run_grid(base: config_lib.RunConfig, out: str, grid) -> None:
  """Trains what `plan` says for each run of ``grid``."""
  start = time.perf_counter()
  diverged = []
  for run in grid:
    todo, what = plan(run_config(base, out, run))
    print(f"== {run.name}: {plots.method_label(run.mode)}, {what}")
    if todo is not None:
      summary = train.run(todo)
      if summary.get("diverged"):
        diverged.append(run.name)
  print(f"grid done in {time.perf_counter() - start:.0f} s"
        + (f"; diverged: {', '.join(diverged)}" if diverged else ""))


def main(argv=None, grid=config_lib.PAPER_GRID) -> list[dict]:
  """Runs ``python -m experiments.paper``; returns the finished runs it describes.

  Args:
    argv: the command-line arguments (None: ``sys.argv[1:]``).
    grid: the runs (`config.PaperRun`); the paper's by default.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = make_parser()
  base, args = config_lib.parse(parser, argv)
  chosen = [r for r in grid if args.only in (None, r.model)]

  def interrupted():
    return (f"interrupted: finished runs and epochs are saved in {args.out}; continue with: "
            f"{cli.command('experiments.paper', argv)}")

  cli.run(lambda: run_grid(base, args.out, chosen), interrupted)
  runs = finished_runs(args.out, grid)  # all of them, not only those of --only
  if not runs:
    print(f"no finished run in {args.out}: nothing to draw")
    return runs
  write_results(args.out, runs)
  print(f"wrote {args.out}/figures.png, figures.pdf, results.md "
        f"({len(runs)} runs: {plots.describe_runs(runs)})")
  return runs


if __name__ == "__main__":
  cli.main(main)
