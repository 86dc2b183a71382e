"""The paper's models, training steps, and an interleaved timer, shared by the benchmarks.

Everything here is self-contained (it does not import ``experiments``) so that the
benchmark measures exactly the models of SPEC §3:

* MLP 3072-4000-1000-4000-10, ReLU, Nesterov SGD (momentum 0.95);
* ConvNet conv5x5 3→16 SAME, ReLU, maxpool 2 → conv5x5 16→20, ReLU, maxpool 2 →
  conv5x5 20→20, ReLU → Linear 1280→10, Adam.

Only the hidden layers are ProxProp layers (``pp.Linear`` / ``pp.Conv``); the head is a
plain ``nnx.Linear``. Mode ``"backprop"`` builds the same model from plain flax layers
(``nnx.Linear`` / ``nnx.Conv``): the baseline every ratio is taken against.

One training step is ``nnx.split`` / ``nnx.merge`` around a pure function compiled with
``jax.jit`` (flax's recommended pattern for fast NNX training loops; ``nnx.jit`` traces
the same program): loss, gradients (the ProxProp backward pass), optax update. The
state is donated, the batch is a jit argument (a closed-over batch would become a
compile-time constant that XLA constant-folds).
"""

from __future__ import annotations

import dataclasses
import json
import math
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

#: the paper's proximal step sizes (SPEC §3)
TAU = {"mlp": 0.05, "convnet": 1.0}
INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def torch_uniform(fan_in: int | None = None):
  """PyTorch's default init, uniform ±1/√fan_in (fan_in read off a kernel's shape)."""

  def init(key, shape, dtype=jnp.float32):
    n = fan_in if fan_in is not None else math.prod(shape[:-1])
    return jax.random.uniform(key, shape, dtype, -1 / math.sqrt(n), 1 / math.sqrt(n))

  return init


def _linear(mode, tau, fan_in, fan_out, rngs, hidden=True):
  kwargs = dict(kernel_init=torch_uniform(), bias_init=torch_uniform(fan_in), rngs=rngs)
  if mode == "backprop" or not hidden:
    return nnx.Linear(fan_in, fan_out, **kwargs)
  return pp.Linear(fan_in, fan_out, mode=mode, tau_prox=tau, **kwargs)


def _conv(mode, tau, cin, cout, rngs, size=5):
  kwargs = dict(padding="SAME", kernel_init=torch_uniform(),
                bias_init=torch_uniform(size * size * cin), rngs=rngs)
  if mode == "backprop":
    return nnx.Conv(cin, cout, (size, size), **kwargs)
  return pp.Conv(cin, cout, (size, size), mode=mode, tau_prox=tau, **kwargs)


class MLP(nnx.Module):
  """``3072-hidden…-10`` with ReLU; the paper's hidden sizes are (4000, 1000, 4000)."""

  def __init__(self, mode: str, tau: float, rngs: nnx.Rngs, hidden=(4000, 1000, 4000)):
    sizes = (math.prod(INPUT_SHAPE), *hidden)
    self.hidden = nnx.List([_linear(mode, tau, a, b, rngs) for a, b in zip(sizes, sizes[1:])])
    self.head = _linear(mode, tau, sizes[-1], NUM_CLASSES, rngs, hidden=False)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)


class ConvNet(nnx.Module):
  """The paper's ConvNet for 32×32×3 inputs."""

  def __init__(self, mode: str, tau: float, rngs: nnx.Rngs):
    self.conv1 = _conv(mode, tau, 3, 16, rngs)
    self.conv2 = _conv(mode, tau, 16, 20, rngs)
    self.conv3 = _conv(mode, tau, 20, 20, rngs)
    self.head = _linear(mode, tau, 8 * 8 * 20, NUM_CLASSES, rngs, hidden=False)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = nnx.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


def build(model: str, mode: str, *, hidden=None, seed: int = 0):
  """The model and its optimizer (MLP: Nesterov SGD 0.95; ConvNet: Adam)."""
  rngs = nnx.Rngs(seed)
  if model == "mlp":
    net = MLP(mode, TAU["mlp"], rngs, **({} if hidden is None else {"hidden": tuple(hidden)}))
    lr = 0.05 if mode == "backprop" else 1.0
    tx = optax.sgd(lr, momentum=0.95, nesterov=True)
  elif model == "convnet":
    net = ConvNet(mode, TAU["convnet"], rngs)
    tx = optax.adam(1e-3)
  else:
    raise ValueError(f"unknown model {model!r}; valid: mlp, convnet")
  return net, nnx.Optimizer(net, tx, wrt=nnx.Param)


def cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


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


def compile_step(model: str, mode: str, x, y, *, hidden=None, seed: int = 0) -> Compiled:
  """Builds the model and compiles one training step ``state, x, y → state, loss``."""
  net, opt = build(model, mode, hidden=hidden, seed=seed)
  graphdef, state = nnx.split((net, opt))

  def train_step(state, x, y):
    net, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(net)
    opt.update(net, grads)
    return nnx.state((net, opt)), loss

  start = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, x, y).compile()
  compile_s = time.perf_counter() - start
  memory, detail = memory_of(compiled)
  return Compiled(mode, compiled, state, compile_s, memory, detail)


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
