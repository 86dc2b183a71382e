r"""Runs the paper's grid of experiments, then draws its figures and a results table.

    python -m experiments.paper --out runs/digits --dataset digits   # offline, CPU
    python -m experiments.paper --out runs/cifar10 --data-dir ~/tensorflow_datasets

Each run trains in ``OUT/<run name>`` (see ``experiments/train.py``). Finished runs are skipped
and unfinished ones resume from their last checkpoint, so an interrupted grid continues where
it stopped. Writes ``OUT/figures.png``, ``OUT/figures.pdf`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments import cifar
from experiments import data as data_lib
from experiments import plots
from experiments import train

# The paper's settings (SPEC section 3): (run name, label, model, mode, optimizer, lr, tau).
GRID = [
    ("mlp_backprop", "BackProp", "mlp", "backprop", "nesterov", 0.05, 1.0),
    ("mlp_prox_exact", "ProxProp (exact)", "mlp", "prox_exact", "nesterov", 1.0, 0.05),
    ("mlp_prox_cg3", "ProxProp (cg3)", "mlp", "prox_cg3", "nesterov", 1.0, 0.05),
    ("mlp_prox_cg5", "ProxProp (cg5)", "mlp", "prox_cg5", "nesterov", 1.0, 0.05),
    ("mlp_prox_cg10", "ProxProp (cg10)", "mlp", "prox_cg10", "nesterov", 1.0, 0.05),
    ("convnet_backprop", "BackProp", "convnet", "backprop", "adam", 1e-3, 1.0),
    ("convnet_prox_cg3", "ProxProp (cg3)", "convnet", "prox_cg3", "adam", 1e-3, 1.0),
    ("convnet_prox_cg10", "ProxProp (cg10)", "convnet", "prox_cg10", "adam", 1e-3, 1.0),
]


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.paper", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--out", required=True, help="folder of the grid's runs and figures")
  parser.add_argument("--dataset", choices=("cifar10", "digits"), default="cifar10",
                      help="digits: sklearn's real 8x8 digits, offline")
  parser.add_argument("--epochs", type=cifar.positive(int), default=50,
                      help="training epochs of every run")
  parser.add_argument("--only", choices=("mlp", "convnet"), default=None,
                      help="run only this model's part of the grid")
  parser.add_argument("--data-dir", default=None,
                      help="tfds data dir holding prepared CIFAR-10; None: tfds' default")
  parser.add_argument("--train-samples", type=cifar.positive(int), default=None,
                      help="use only the first N training examples; None: all")
  parser.add_argument("--batch-size", type=cifar.positive(int), default=500,
                      help="mini-batch size (the paper's: 500)")
  parser.add_argument("--seed", type=int, default=0, help="seed of every run")
  parser.add_argument("--parallel", choices=("auto", "none", "pmap", "sharded"), default="auto",
                      help="auto: sharded when several devices are present")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  return parser


def run_config(args, name, model, mode, optimizer, lr, tau) -> dict:
  """One grid run's settings, in the form ``experiments.cifar`` passes to ``train.run``."""
  return dict(model=model, mode=mode, optimizer=optimizer, lr=lr, tau_prox=tau, momentum=0.95,
              epochs=args.epochs, batch_size=args.batch_size, train_samples=args.train_samples,
              dataset=args.dataset, data_dir=args.data_dir, seed=args.seed,
              out=os.path.join(args.out, name), parallel=args.parallel, resume=True,
              quiet=args.quiet)


def is_finished(run_dir: str, epochs: int) -> bool:
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f)["epochs"] >= epochs


def main(argv=None) -> None:
  args = make_parser().parse_args(argv)
  grid = [g for g in GRID if args.only in (None, g[2])]
  start = time.perf_counter()
  for name, label, *settings in grid:
    config = run_config(args, name, *settings)
    if is_finished(config["out"], args.epochs):
      print(f"== {name}: finished, skipped")
      continue
    print(f"== {name}: {label}, " + ", ".join(f"{k}={config[k]}" for k in
                                             ("model", "mode", "optimizer", "lr", "tau_prox")))
    try:
      train.run(config)
    except (data_lib.DataNotPreparedError, train.RunDirError) as e:
      sys.exit(f"error: {e}")
  print(f"grid done in {time.perf_counter() - start:.0f} s")

  runs = [plots.load_run(os.path.join(args.out, name), label) for name, label, *_ in grid]
  by_model = {m: [r for r, g in zip(runs, grid) if g[2] == m] for m in ("mlp", "convnet")}
  fig = plots.paper_figure(by_model, title=f"ProxProp vs BackProp on {args.dataset} "
                           f"(batch {args.batch_size}, {args.epochs} epochs)")
  for ext in ("png", "pdf"):
    fig.savefig(os.path.join(args.out, f"figures.{ext}"), dpi=120)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    for model, model_runs in by_model.items():
      if model_runs:
        f.write(f"### {plots.MODEL_TITLES[model]} ({args.dataset})\n\n")
        f.write(plots.results_table(model_runs) + "\n")
  print(f"wrote {args.out}/figures.png, figures.pdf, results.md")


if __name__ == "__main__":
  main()
