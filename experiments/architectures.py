r"""Beyond the paper: BackProp vs ProxProp on a ResNet, a Vision Transformer and the ConvNet.

    python -m experiments.architectures --out runs/architectures --dataset digits

For each model (``resnet``, ``vit``: plain flax layers converted by ``pp.convert``; the paper's
``convnet``), Adam at lr 1e-3 with BackProp and with ProxProp (``prox_exact``, ``prox_cg3``) at
each τ of ``--taus``, ``--seeds`` seeds each, the same epochs and batch size for all. Each run
trains in ``OUT/<model>_<method>[_tau<τ>]_seed<s>``. Like ``experiments.paper`` the grid
resumes: unfinished runs continue, finished ones are kept (or extended to more ``--epochs``),
runs with other settings are reported and left alone, diverged runs are recorded. Then
``OUT/figures.png``/``.pdf`` (mean and min–max over seeds per method) and ``OUT/results.md``
(mean ± std over seeds) describe every finished run of the grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from experiments import cli
from experiments import config as config_lib
from experiments import paper
from experiments import plots
from experiments import records
from experiments import train

MODELS = ("resnet", "vit", "convnet")
PROX_MODES = ("prox_exact", "prox_cg3")
SHARED_FLAGS = ("dataset", "epochs", "batch_size", "train_samples", "data_dir", "parallel",
                "keep_checkpoints", "quiet", "lr", "compile_cache")
# Chosen so that the whole digits grid (63 runs) takes at most ~25 minutes on 2 CPU cores.
DEFAULTS = dict(dataset="digits", epochs=8, batch_size=100, lr=1e-3, quiet=True,
                keep_checkpoints=1)


class ArchRun(NamedTuple):
  """One run of the grid."""

  model: str
  mode: str
  tau_prox: float
  seed: int

  @property
  def method(self) -> str:
    """The curve this run belongs to: mode and τ (not the seed)."""
    return self.mode if self.mode == "backprop" else f"{self.mode} τ={self.tau_prox:g}"

  @property
  def name(self) -> str:
    tau = "" if self.mode == "backprop" else f"_tau{self.tau_prox:g}"
    return f"{self.model}_{self.mode}{tau}_seed{self.seed}"


def grid(models=MODELS, taus=(0.1, 1.0, 10.0), seeds=3) -> list[ArchRun]:
  """BackProp and every ProxProp mode at every τ, for every model and seed."""
  methods = [("backprop", 1.0)] + [(m, t) for m in PROX_MODES for t in taus]
  return [ArchRun(model, mode, tau, seed) for model in models for mode, tau in methods
          for seed in range(seeds)]


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.architectures", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--out", required=True, help="folder of the grid's runs and figures")
  parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
  parser.add_argument("--taus", nargs="+", type=config_lib.tau_arg, default=[0.1, 1.0, 10.0],
                      help="ProxProp's τ values")
  parser.add_argument("--seeds", type=config_lib.positive(int), default=3,
                      help="seeds 0 … N-1 per method")
  config_lib.add_flags(parser, SHARED_FLAGS, **DEFAULTS)
  return parser


def run_config(base: config_lib.RunConfig, out: str, run: ArchRun) -> config_lib.RunConfig:
  return dataclasses.replace(base, model=run.model, mode=run.mode, optimizer="adam",
                             tau_prox=run.tau_prox, seed=run.seed,
                             out=os.path.join(out, run.name))


def run_grid(base: config_lib.RunConfig, out: str, runs: list[ArchRun]) -> None:
  """Trains what `paper.plan` says for each run, with a progress line per run."""
  start = time.perf_counter()
  for i, run in enumerate(runs, 1):
    todo, what = paper.plan(run_config(base, out, run))
    print(f"== [{i}/{len(runs)}, {time.perf_counter() - start:.0f} s] {run.name}: {what}",
          flush=True)
    if todo is not None:
      train.run(todo)
  print(f"grid done in {time.perf_counter() - start:.0f} s")


def load_finished(out: str, runs: list[ArchRun]) -> dict:
  """``{model: {method: [run dicts over seeds]}}`` of the finished (or diverged) runs."""
  found = {}
  for run in runs:
    run_dir = os.path.join(out, run.name)
    state = records.run_state(run_dir)
    if state.status in ("finished", "diverged") and state.config is not None:
      loaded = plots.load_run(run_dir, run.method)
      found.setdefault(run.model, {}).setdefault(run.method, []).append(loaded)
  return found


def _mean_std(values) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.4f} ± {values.std():.4f}"


def results_table(found: dict) -> str:
  """One Markdown table per model: mean ± std over seeds."""
  text = ""
  for model, by_method in found.items():
    text += (f"### {model}\n\n| method | seeds | epochs | final training loss | best val acc "
             "| final val acc | test acc | s / epoch |\n|---|---|---|---|---|---|---|---|\n")
    for method, seed_runs in by_method.items():
      diverged = [r for r in seed_runs if r["summary"].get("diverged")]
      ok = [r for r in seed_runs if not r["summary"].get("diverged") and r["metrics"]]
      note = f" ({len(diverged)} diverged)" if diverged else ""
      if not ok:
        text += f"| {method} | {len(seed_runs)}{note} | – | – | – | – | – | – |\n"
        continue
      epochs = sorted({len(r["metrics"]) for r in ok})
      text += (f"| {method} | {len(seed_runs)}{note} | {'/'.join(map(str, epochs))} | "
               f"{_mean_std([r['metrics'][-1]['full_batch_loss'] for r in ok])} | "
               f"{_mean_std([max(m['val_acc'] for m in r['metrics']) for r in ok])} | "
               f"{_mean_std([r['metrics'][-1]['val_acc'] for r in ok])} | "
               f"{_mean_std([r['summary']['test_acc'] for r in ok])} | "
               f"{np.mean([m['epoch_time_s'] for r in ok for m in r['metrics']]):.2f} |\n")
    text += "\n"
  return text


def main(argv=None) -> dict:
  """Runs ``python -m experiments.architectures``; returns the finished runs it describes."""
  argv = sys.argv[1:] if argv is None else list(argv)
  base, args = config_lib.parse(make_parser(), argv)
  runs = grid(args.models, args.taus, args.seeds)

  def interrupted():
    return (f"interrupted: finished runs and epochs are saved in {args.out}; continue with: "
            f"{cli.command('experiments.architectures', argv)}")

  cli.run(lambda: run_grid(base, args.out, runs), interrupted)
  found = load_finished(args.out, runs)
  if not found:
    print(f"no finished run in {args.out}: nothing to draw")
    return found
  every = [r for by_method in found.values() for seed_runs in by_method.values()
           for r in seed_runs]
  fig = plots.seeds_figure(found, f"BackProp vs ProxProp, Adam: {plots.describe_runs(every)}")
  for ext in ("png", "pdf"):
    fig.savefig(os.path.join(args.out, f"figures.{ext}"), dpi=110)
  records.write_text(os.path.join(args.out, "results.md"), results_table(found))
  print(f"wrote {args.out}/figures.png, figures.pdf, results.md ({len(every)} runs)")
  return found


if __name__ == "__main__":
  cli.main(main)
