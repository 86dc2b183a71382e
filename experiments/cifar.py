r"""Trains one model (the paper's MLP or ConvNet, a ResNet or a ViT) on CIFAR-10 (or digits).

Defaults are the reference's (ConvNet, ProxProp cg1, Adam 1e-3, tau 1, batch 500, 50 epochs)::

    python -m experiments.cifar --out runs/convnet_cg3 --mode prox_cg3
    python -m experiments.cifar --dataset digits --model mlp --mode prox_exact \
        --optimizer nesterov --lr 1 --tau-prox 0.05 --out runs/digits_mlp_exact

See ``experiments/train.py`` for the files written to ``--out``. Exit status 3: the run
diverged; 130: interrupted (the message says how to continue).
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import cli
from experiments import config as config_lib
from experiments import records
from experiments import train


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.cifar", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  config_lib.add_flags(parser)
  group = parser.add_argument_group("several processes (jax.distributed)")
  group.add_argument("--coordinator-address", default=None, help="host:port of process 0")
  group.add_argument("--num-processes", type=config_lib.positive(int), default=None,
                     help="processes in the job")
  group.add_argument("--process-id", type=int, default=None, help="this process's index")
  return parser


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(args) -> None:
  """Joins a multi-process job when asked to; must run before anything touches devices."""
  flags = (args.coordinator_address, args.num_processes, args.process_id)
  if any(f is not None for f in flags) or any(v in os.environ for v in DISTRIBUTED_ENV):
    from proxprop_jax import parallel  # pylint: disable=import-outside-toplevel
    parallel.initialize_distributed(*flags)


def interrupted_message(config, argv) -> str:
  """One line: what an interrupted run has saved, and the command that continues it."""
  state = records.run_state(config.out)
  if state.status == "new":  # stopped before the run wrote its first file
    return (f"interrupted before the run started: nothing is saved in {config.out}; start it "
            f"again with: {cli.command('experiments.cifar', argv)}")
  saved = (f"{train.saved_epochs(state.epochs)} in {config.out}" if state.epochs else
           f"no epoch had finished; {config.out} is ready to start over")
  return (f"interrupted: {saved}; continue with: "
          f"{cli.command('experiments.cifar', argv, '--resume')}")


def main(argv=None) -> dict:
  """Runs ``python -m experiments.cifar``; returns the run's summary.

  Raises:
    SystemExit: 3 if the run diverged, 130 if interrupted, 1 on an error with its message.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  config, args = config_lib.parse(make_parser(), argv)
  initialize_distributed(args)
  summary = cli.run(lambda: train.run(config), lambda: interrupted_message(config, argv))
  if summary.get("diverged"):
    raise SystemExit(cli.EXIT_DIVERGED)
  return summary


if __name__ == "__main__":
  cli.main(main)
