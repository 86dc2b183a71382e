"""The paper's models and training steps, and an interleaved timer, shared by the benchmarks.

The models are those of the experiments (`experiments.models`), with the paper's settings
(`experiments.config.paper_settings`): the MLP 3072-4000-1000-4000-10 with Nesterov SGD
(momentum 0.95) and the ConvNet (conv5x5 3→16, 16→20, 20→20, SAME, ReLU, two max-pools, linear
1280→10) with Adam. Only the hidden layers are ProxProp layers (``pp.Linear`` / ``pp.Conv``);
the head is a plain ``nnx.Linear``. Mode ``"backprop"`` builds the same model from plain flax
layers (``nnx.Linear`` / ``nnx.Conv``): the baseline every ratio is taken against.

One training step is ``nnx.split`` / ``nnx.merge`` around a pure function compiled with
``jax.jit`` (flax's recommended pattern for fast NNX training loops; ``nnx.jit`` traces
the same program): loss, gradients (the ProxProp backward pass), optax update. The
state is donated, the batch is a jit argument (a closed-over batch would become a
compile-time constant that XLA constant-folds).
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import proxprop_jax as pp
from experiments import config as config_lib
from experiments import models
from experiments import optimizers
from proxprop_jax import ops, planner

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def build(model: str, mode: str, *, hidden=None, seed: int = 0, **options):
  """The model and its optimizer with the paper's settings for (model, mode).

  Args:
    model: ``"mlp"``, ``"convnet"`` (the paper's settings), ``"resnet"`` or ``"vit"``
      (converted by ``pp.convert``; Adam, lr 1e-3, τ = 1).
    mode: ``"backprop"`` or a ProxProp mode.
    hidden: the MLP's hidden sizes (None: the paper's 4000, 1000, 4000).
    seed: parameter init seed.
    **options: more arguments of `experiments.models.build` (``sharding_rules``,
      ``distribute_solves``, the ViT's sizes).
  """
  if model in models.CONVERTED:  # beyond the paper: Adam at lr 1e-3, τ = 1
    optimizer, lr, tau = "adam", 1e-3, 1.0
  else:
    optimizer, lr, tau = config_lib.paper_settings(model, mode)
  sizes = {} if hidden is None else {"hidden_sizes": tuple(hidden)}
  net = models.build(model, mode=mode, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES,
                     tau_prox=tau, seed=seed, **sizes, **options)
  return net, nnx.Optimizer(net, optimizers.make(optimizer, lr), wrt=nnx.Param)


def synthetic_batch(batch_size: int, seed: int = 0, dtype=jnp.float32):
  """Random CIFAR-shaped inputs in [0, 1) and labels."""
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.uniform(kx, (batch_size, *INPUT_SHAPE), dtype)
  y = jax.random.randint(ky, (batch_size,), 0, NUM_CLASSES)
  return x, y


@dataclasses.dataclass
class Compiled:
  """One (model, mode): its compiled step, state, compile time and memory analysis."""

  name: str
  step: Callable
  state: object
  compile_s: float
  memory_bytes: int | None
  memory_detail: dict


def variant(name: str) -> tuple[str, dict]:
  """``"mode"`` or ``"mode/choice"``: the mode, and a choice of the solve made differently
  from the defaults, to compare in one process: ``unroll`` (CG loops written out,
  `planner.planning` with ``unroll_steps=10``) or a ``solve_precision`` name (e.g.
  ``bf16_bf16_f32_x3``)."""
  mode, _, choice = name.partition("/")
  if not choice:
    return mode, {}
  if choice == "unroll":
    return mode, {"unroll_steps": 10}
  if choice.lower() not in ops.PRECISION_NAMES:
    raise ValueError(f"variant {name!r}: after '/' comes 'unroll' or a solve_precision, one of "
                     f"{ops.PRECISION_NAMES}")
  return mode, {"solve_precision": choice.lower()}


def compile_step(model: str, name: str, x, y, *, hidden=None, seed: int = 0) -> Compiled:
  """Builds the model and compiles one training step ``state, x, y → state, loss`` for the
  mode or `variant` ``name``."""
  mode, choice = variant(name)
  net, opt = build(model, mode, hidden=hidden, seed=seed)
  if "solve_precision" in choice:  # a static attribute of the layers: part of the program
    for layer in pp.conversion.prox_layers(net).values():
      layer.solve_precision = choice["solve_precision"]
  with planner.planning(**{k: v for k, v in choice.items() if k == "unroll_steps"}):
    return compile_train_step(name, net, opt, x, y)


def train_step(net, opt, loss=models.cross_entropy):
  """One training step of ``net`` with ``opt`` as a pure function ``state, x, y → state,
  loss`` (``loss(logits, labels)``), and the state to call it with."""
  graphdef, state = nnx.split((net, opt))

  def step(state, x, y):
    net, opt = nnx.merge(graphdef, state)
    value, grads = nnx.value_and_grad(lambda m: loss(m(x), y))(net)
    opt.update(net, grads)
    return nnx.state((net, opt)), value

  return step, state


def compile_train_step(name: str, net, opt, x, y, loss=models.cross_entropy) -> Compiled:
  """Compiles `train_step` of ``net`` with ``opt``, the state donated and the batch an
  argument."""
  step, state = train_step(net, opt, loss)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, x, y).compile()
  compile_s = time.perf_counter() - start
  memory, detail = memory_of(compiled)
  return Compiled(name, compiled, state, compile_s, memory, detail)


def memory_of(compiled):
  """XLA's memory analysis of a compiled program.

  Returns ``(peak, detail)`` with ``peak = arguments + outputs + temporaries − aliased``
  bytes: everything the program holds at once at its high-water mark, donated state
  counted once. ``None`` where the backend gives no analysis.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pragma: no cover - backend without an analysis
    return None, {}
  if m is None:
    return None, {}
  detail = {k: int(getattr(m, k + "_size_in_bytes", 0))
            for k in ("argument", "output", "temp", "alias", "generated_code")}
  peak = detail["argument"] + detail["output"] + detail["temp"] - detail["alias"]
  return peak, detail


def time_interleaved(entries: Sequence[Compiled], x, y, *, repeats: int, warmup: int = 2,
                     seed: int = 0):
  """Times every entry's step ``repeats`` times, interleaved (A B C, C A B, …).

  Every round runs each entry once, in a freshly shuffled order: on a shared,
  noisy machine the step that follows another program runs measurably slower or
  faster depending on which program ran before (allocator and cache state), and a
  fixed order would bias the same entry every round.

  Returns a dict name → list of seconds per step (each call synchronised with
  ``block_until_ready``).
  """
  for e in entries:
    for _ in range(warmup):
      e.state, loss = e.step(e.state, x, y)
      jax.block_until_ready((e.state, loss))
  times = {e.name: [] for e in entries}
  order = list(entries)
  rng = random.Random(seed)
  for _ in range(repeats):
    rng.shuffle(order)
    for e in order:
      start = time.perf_counter()
      e.state, loss = e.step(e.state, x, y)
      jax.block_until_ready((e.state, loss))
      times[e.name].append(time.perf_counter() - start)
  return times


def median(values):
  return statistics.median(values)


def environment() -> dict:
  """The device and library versions, for the table header."""
  import flax
  dev = jax.devices()[0]
  return {
      "device": f"{dev.platform}: {getattr(dev, 'device_kind', dev)}",
      "devices": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
  }


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:  # pragma: no cover
    return "?"


def write_json(path: str | None, env: dict, args, rows: list) -> None:
  """Writes a benchmark's environment, arguments and result rows to ``path`` (if given)."""
  if path:
    with open(path, "w") as f:
      json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
