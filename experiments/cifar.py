r"""Trains one of the paper's models on CIFAR-10 (or, offline, sklearn's digits).

Defaults are the reference's (ConvNet, ProxProp cg1, Adam 1e-3, tau 1, batch 500, 50 epochs)::

    python -m experiments.cifar --out runs/convnet_cg3 --mode prox_cg3
    python -m experiments.cifar --dataset digits --model mlp --mode prox_exact \
        --optimizer nesterov --lr 1 --tau-prox 0.05 --out runs/digits_mlp_exact

See ``experiments/train.py`` for the files written to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import proxprop_jax as pp
from experiments import data as data_lib
from experiments import models
from experiments import train


def mode_arg(text: str) -> str:
  """``backprop`` (plain flax layers) or a ProxProp mode string, validated by the library."""
  if text != "backprop":
    try:
      pp.parse_mode(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"invalid mode {text!r}; valid: {models.MODES_HELP}") from None
  return text


def tau_arg(text: str) -> float:
  try:
    return pp.check_tau(float(text))
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid tau {text!r}; must be a finite number > 0") from None


def positive(kind):
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not value > 0 or not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"invalid value {text!r}; must be a {kind.__name__} > 0")
    return value
  parse.__name__ = kind.__name__
  return parse


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.cifar", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--model", choices=("convnet", "mlp"), default="convnet",
                      help="the paper's ConvNet or MLP")
  parser.add_argument("--mode", type=mode_arg, default="prox_cg1", metavar="MODE",
                      help=models.MODES_HELP + "; backprop builds the model from plain flax "
                      "layers, gradient from ProxProp layers in gradient mode")
  parser.add_argument("--optimizer", choices=("adam", "nesterov"), default="adam",
                      help="Adam, or SGD with Nesterov momentum")
  parser.add_argument("--lr", type=positive(float), default=1e-3, help="learning rate")
  parser.add_argument("--tau-prox", type=tau_arg, default=1.0,
                      help="ProxProp's proximal step size tau (> 0)")
  parser.add_argument("--momentum", type=float, default=0.95, help="Nesterov momentum")
  parser.add_argument("--epochs", type=positive(int), default=50, help="training epochs")
  parser.add_argument("--batch-size", type=positive(int), default=500, help="mini-batch size")
  parser.add_argument("--train-samples", type=positive(int), default=None,
                      help="use only the first N training examples; None: all")
  parser.add_argument("--dataset", choices=("cifar10", "digits"), default="cifar10",
                      help="digits: sklearn's real 8x8 digits, offline")
  parser.add_argument("--data-dir", default=None,
                      help="tfds data dir holding prepared CIFAR-10; None: tfds' default")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the init, the data order and the digits split")
  parser.add_argument("--out", default="runs/cifar", help="output folder of the run")
  parser.add_argument("--parallel", choices=("auto", "none", "pmap", "sharded"), default="auto",
                      help="auto: sharded when several devices are present")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the last checkpoint in --out")
  parser.add_argument("--quiet", action="store_true",
                      help="one line per epoch instead of a progress bar")
  group = parser.add_argument_group("several processes (jax.distributed)")
  group.add_argument("--coordinator-address", default=None, help="host:port of process 0")
  group.add_argument("--num-processes", type=positive(int), default=None,
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


def config_from_args(args) -> dict:
  """The run's settings as saved in config.json (no process-topology flags)."""
  config = {k: v for k, v in vars(args).items() if k not in
            ("coordinator_address", "num_processes", "process_id")}
  if config["data_dir"] is not None:
    config["data_dir"] = os.path.expanduser(config["data_dir"])
  return config


def main(argv=None) -> dict:
  args = make_parser().parse_args(argv)
  initialize_distributed(args)
  try:
    return train.run(config_from_args(args))
  except (data_lib.DataNotPreparedError, train.RunDirError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
