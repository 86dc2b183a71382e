"""A run's settings: one typed config, its command-line flags, and the paper's grid of runs.

`RunConfig` lists every setting with its default and meaning; `add_flags` declares the flags
of ``experiments.cifar`` and ``experiments.paper`` from it (each flag once, with its help);
`from_args` turns parsed flags back into a `RunConfig`; `check` rejects combinations argparse
cannot see (a ``--data-dir`` that does not exist, or one given with ``--dataset digits``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import NamedTuple

import proxprop_jax as pp
from experiments import compile_cache
from experiments import models
from experiments import optimizers

DATASETS = ("cifar10", "digits")
PARALLEL = ("auto", "none", "pmap", "sharded")


class ConfigError(ValueError):
  """Settings that cannot run together; the message names the flag and what would work."""


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
  """ProxProp's tau: a finite number > 0, validated by the library."""
  try:
    return pp.check_tau(float(text))
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid tau {text!r}; must be a finite number > 0") from None


def positive(kind: type):
  """An argparse type: a finite ``kind`` (int or float) > 0."""
  what = "an integer" if kind is int else "a number"

  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not value > 0 or not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"invalid value {text!r}; must be {what} > 0")
    return value

  parse.__name__ = kind.__name__
  return parse


def mesh_arg(text: str) -> str:
  """A device mesh ``axis=size,...`` over `models.MESH_AXES`, e.g. ``data=4,model=2``."""
  try:
    mesh = parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return ",".join(f"{axis}={size}" for axis, size in mesh)


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """``((axis, size), ...)`` of a ``--mesh`` value; a ValueError that names the valid forms."""
  axes = models.MESH_AXES
  mesh = []
  for part in text.split(","):
    axis, _, size = part.strip().partition("=")
    if axis not in axes or not size.isdigit() or int(size) < 1 or axis in dict(mesh):
      raise ValueError(f"invalid mesh {text!r}; give axis=size pairs over distinct axes of "
                       f"{', '.join(axes)} (sizes >= 1), e.g. data=4,model=2")
    mesh.append((axis, int(size)))
  return tuple(mesh)


def flag(default, help: str, **argparse_kwargs):  # pylint: disable=redefined-builtin
  """A `RunConfig` field: its default, and the help and argparse options of its flag."""
  return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one training run depends on; the defaults are the reference's settings."""

  model: str = flag("convnet", "the paper's ConvNet or MLP, or a ResNet or ViT built from plain "
                    "flax layers and converted", choices=tuple(models.MODELS))
  mode: str = flag("prox_cg1", models.MODES_HELP + "; backprop builds the model from plain flax "
                   "layers, gradient from ProxProp layers in gradient mode",
                   type=mode_arg, metavar="MODE")
  plain_head: bool = flag(False, "resnet/vit: the final layer keeps the plain gradient (the "
                          "paper's models always do)", action="store_true")
  optimizer: str = flag("adam", "Adam, AdamW (decoupled weight decay) or SGD with Nesterov "
                        "momentum", choices=optimizers.OPTIMIZERS)
  lr: float = flag(1e-3, "learning rate", type=positive(float))
  tau_prox: float = flag(1.0, "ProxProp's proximal step size tau (> 0)", type=tau_arg)
  momentum: float = flag(0.95, "Nesterov momentum (nesterov only)", type=float)
  weight_decay: float = flag(1e-4, "decoupled weight decay (adamw only)", type=float)
  epochs: int = flag(50, "training epochs (a finished run given more is extended)",
                     type=positive(int))
  batch_size: int = flag(500, "mini-batch size", type=positive(int))
  train_samples: int | None = flag(None, "use only the first N training examples; None: all",
                                   type=positive(int))
  dataset: str = flag("cifar10", "digits: sklearn's real 8x8 digits, offline", choices=DATASETS)
  data_dir: str | None = flag(None, "tfds data dir holding prepared CIFAR-10 (cifar10 only); "
                              "None: tfds' default")
  seed: int = flag(0, "seeds the init, the data order and the digits split", type=int)
  out: str = flag("runs/cifar", "output folder of the run")
  parallel: str = flag("auto", "auto: sharded when several devices are present", choices=PARALLEL)
  mesh: str | None = flag(None, "shard the parameters too, over a mesh of all devices, e.g. "
                          "data=4,model=2: the batch over data (and fsdp), the MLP's and ViT's "
                          "annotated kernels over model (tensor parallel) and fsdp (FSDP); "
                          "None: data parallel, parameters replicated", type=mesh_arg,
                          metavar="AXIS=N,...")
  keep_checkpoints: int = flag(2, "checkpoints kept on disk (the latest ones); 1 halves the "
                               "disk use", type=positive(int))
  resume: bool = flag(False, "continue the run in --out from its last checkpoint",
                      action="store_true")
  quiet: bool = flag(False, "one line per epoch instead of a progress bar", action="store_true")
  diagnostics: bool = flag(False, "log pp.diagnostics of every ProxProp layer (solve residual, "
                           "cosine to the gradient, ...) on the first mini-batch after every "
                           "epoch", action="store_true")
  compile_cache: str | None = flag(compile_cache.DEFAULT, "JAX's persistent compilation cache "
                                   "(with XLA's GPU autotuning): reruns, resumed runs and a "
                                   "grid's other runs compile from it", metavar="DIR",
                                   negation="--no-compile-cache")


# Settings that must match for --resume to continue a run. Not in it: epochs (a run can be
# extended), and what changes only where and how it runs (folders, devices, output).
RESUME_KEYS = ("model", "mode", "plain_head", "optimizer", "lr", "tau_prox", "momentum",
               "weight_decay", "batch_size", "train_samples", "dataset", "seed")
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
DEFAULTS = dataclasses.asdict(RunConfig())


def add_flags(parser: argparse.ArgumentParser, names=tuple(FIELDS), **defaults) -> None:
  """Declares the flags of the `RunConfig` fields ``names`` (``--tau-prox`` for ``tau_prox``).

  Args:
    parser: gets one ``--flag`` per name.
    names: the fields to expose.
    **defaults: defaults that differ from `RunConfig`'s for this command.
  """
  for name in names:
    field = FIELDS[name]
    kwargs = dict(field.metadata)
    negation = kwargs.pop("negation", None)  # a second flag that sets the field to None
    parser.add_argument("--" + name.replace("_", "-"), default=defaults.get(name, field.default),
                        **kwargs)
    if negation:
      parser.add_argument(negation, dest=name, action="store_const", const=None,
                          help=f"no {name.replace('_', ' ')}")


def from_args(args: argparse.Namespace, **overrides) -> RunConfig:
  """The `RunConfig` of parsed flags (fields without a flag keep their defaults), checked."""
  values = {k: v for k, v in vars(args).items() if k in FIELDS}
  values.update(overrides)
  if values.get("data_dir") is not None:
    values["data_dir"] = os.path.expanduser(values["data_dir"])
  config = RunConfig(**values)
  check(config)
  return config


def check(config: RunConfig) -> None:
  """Raises `ConfigError` for settings argparse cannot reject on its own."""
  if config.diagnostics and config.mode == "backprop":
    raise ConfigError("--diagnostics describes ProxProp layers; mode backprop has none (choose "
                      "a ProxProp mode, or gradient for the plain gradient through them)")
  if config.mesh is not None and config.parallel in ("none", "pmap"):
    raise ConfigError(f"--mesh shards a jit step over a mesh; --parallel {config.parallel} has "
                      f"none: use --parallel sharded (or auto), or leave --mesh out")
  if (config.mesh is not None and config.model not in models.SHARDED
      and any(axis != "data" for axis, _ in parse_mesh(config.mesh))):
    raise ConfigError(f"--mesh {config.mesh}: the {config.model} model has no sharding "
                      f"annotations to split its parameters by; models with them: "
                      f"{', '.join(models.SHARDED)} (or a mesh of data only)")
  if config.diagnostics and config.parallel == "pmap":
    raise ConfigError("--diagnostics runs on the global batch: use --parallel sharded (or "
                      "auto), not pmap")
  if config.data_dir is not None:
    if config.dataset != "cifar10":
      raise ConfigError(f"--data-dir is for --dataset cifar10 only; {config.dataset} needs "
                        f"no data folder (leave --data-dir out)")
    if not os.path.isdir(config.data_dir):
      raise ConfigError(f"--data-dir {config.data_dir} does not exist; give the folder that "
                        f"holds the prepared CIFAR-10 (README: Experiments, CIFAR-10), or leave "
                        f"--data-dir out for tfds' default folder")


def parse(parser: argparse.ArgumentParser, argv=None, **overrides):
  """Parses ``argv``; returns ``(config, args)``. Bad settings exit with status 2 and a message."""
  args = parser.parse_args(argv)
  try:
    return from_args(args, **overrides), args
  except ConfigError as e:
    parser.error(str(e))


class PaperRun(NamedTuple):
  """One run of the paper's grid."""

  name: str  # its folder under the grid's --out
  model: str
  mode: str
  optimizer: str
  lr: float
  tau_prox: float


# The paper's settings. MLP: Nesterov SGD (momentum 0.95, the RunConfig default), BackProp at
# lr 0.05, ProxProp at lr 1 with tau 0.05. ConvNet: Adam lr 1e-3, tau 1.
PAPER_GRID = (
    PaperRun("mlp_backprop", "mlp", "backprop", "nesterov", 0.05, 1.0),
    PaperRun("mlp_prox_exact", "mlp", "prox_exact", "nesterov", 1.0, 0.05),
    PaperRun("mlp_prox_cg3", "mlp", "prox_cg3", "nesterov", 1.0, 0.05),
    PaperRun("mlp_prox_cg5", "mlp", "prox_cg5", "nesterov", 1.0, 0.05),
    PaperRun("mlp_prox_cg10", "mlp", "prox_cg10", "nesterov", 1.0, 0.05),
    PaperRun("convnet_backprop", "convnet", "backprop", "adam", 1e-3, 1.0),
    PaperRun("convnet_prox_cg3", "convnet", "prox_cg3", "adam", 1e-3, 1.0),
    PaperRun("convnet_prox_cg10", "convnet", "prox_cg10", "adam", 1e-3, 1.0),
)


def paper_settings(model: str, mode: str) -> tuple[str, float, float]:
  """``(optimizer, lr, tau_prox)`` the paper uses for ``model`` in ``mode``.

  Modes outside the grid (``gradient``, ``prox_cg1``, ...) take the model's ProxProp settings.
  """
  runs = [r for r in PAPER_GRID if r.model == model]
  if not runs:
    raise ValueError(f"no paper settings for model {model!r}; valid: "
                     f"{', '.join(dict.fromkeys(r.model for r in PAPER_GRID))}")
  run = next((r for r in runs if r.mode == mode), None) or runs[-1]
  return run.optimizer, run.lr, run.tau_prox
