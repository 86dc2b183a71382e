"""The paper's two models, the one copy used by the experiments, the benchmarks and the tests.

A model is built from ProxProp layers or, for true BackProp (``mode="backprop"``), from plain
flax layers. Only the hidden layers are ProxProp layers; the final linear layer always takes
the plain gradient, as in the reference. Initialization is PyTorch's default (uniform
+-1/sqrt(fan_in) for kernel and bias), which is what the paper's step sizes were tuned with.

Models live in a registry: ``@register("name")`` on an ``nnx.Module`` whose constructor takes
``(input_shape, num_classes, layers, **sizes)`` makes it buildable as ``build("name", ...)``
and selectable by ``--model name``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import proxprop_jax as pp

MODES_HELP = "backprop, gradient, prox_exact, prox_cgN (N >= 1)"

MODELS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes the model buildable as ``build(name, ...)``."""

  def add(cls: type) -> type:
    if name in MODELS:
      raise ValueError(f"model {name!r} is already registered ({MODELS[name].__name__})")
    MODELS[name] = cls
    return cls

  return add


@functools.cache  # one function per fan-in: layers keep it as a static attribute, and equal
# attributes let two builds of a model share their compiled steps
def torch_uniform(fan_in: int | None = None):
  """PyTorch's default layer init: uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)].

  Args:
    fan_in: the layer's fan-in. A bias needs it given (its own shape does not tell it); for a
      kernel (``(..., in, out)``, any window dims first) it is read off the shape.
  """

  def init(key, shape, dtype=jnp.float32):
    n = fan_in if fan_in is not None else math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(n)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Layers:
  """Makes a model's layers: plain flax for ``backprop``, ProxProp for the hidden ones otherwise.

  Args:
    mode: ``"backprop"`` or a ProxProp mode.
    tau_prox: ProxProp's proximal step size (unused by ``backprop``).
    axis_name: the ``pmap``/``shard_map`` axis the ProxProp layers reduce over.
    rngs: parameter init keys.
    prox_linear: the ProxProp dense layer class; e.g. ``pp.prox_module(nnx.Linear)`` for the
      matrix-free variant.
  """

  def __init__(self, mode: str, tau_prox: float, axis_name: str | None, rngs: nnx.Rngs,
               prox_linear: type = pp.Linear):
    self.rngs = rngs
    if mode == "backprop":
      self.linear_cls, self.conv_cls, self.prox_kwargs = nnx.Linear, nnx.Conv, {}
    else:
      self.linear_cls, self.conv_cls = prox_linear, pp.Conv
      self.prox_kwargs = dict(mode=mode, tau_prox=tau_prox, axis_name=axis_name)

  def linear(self, fan_in: int, fan_out: int, hidden: bool = True):
    """A dense layer; ``hidden=False`` is the plain head."""
    cls, kwargs = (self.linear_cls, self.prox_kwargs) if hidden else (nnx.Linear, {})
    return cls(fan_in, fan_out, kernel_init=torch_uniform(), bias_init=torch_uniform(fan_in),
               rngs=self.rngs, **kwargs)

  def conv(self, fan_in_channels: int, channels: int, size: int):
    """A ``size x size`` SAME convolution (always hidden)."""
    return self.conv_cls(fan_in_channels, channels, (size, size), padding="SAME",
                         kernel_init=torch_uniform(),
                         bias_init=torch_uniform(size * size * fan_in_channels),
                         rngs=self.rngs, **self.prox_kwargs)


@register("convnet")
class ConvNet(nnx.Module):
  """conv5x5 16, ReLU, maxpool 2 -> conv5x5 20, ReLU, maxpool 2 -> conv5x5 20, ReLU -> linear.

  The flatten size follows the input: 8*8*20 = 1280 for 32x32 CIFAR-10, 2*2*20 = 80 for 8x8
  digits. ``channels`` and ``kernel_size`` make smaller variants of the same architecture.
  """

  def __init__(self, input_shape, num_classes: int, layers: Layers,
               channels=(16, 20, 20), kernel_size: int = 5):
    height, width, in_channels = input_shape
    c1, c2, c3 = channels
    self.conv1 = layers.conv(in_channels, c1, kernel_size)
    self.conv2 = layers.conv(c1, c2, kernel_size)
    self.conv3 = layers.conv(c2, c3, kernel_size)
    self.head = layers.linear((height // 4) * (width // 4) * c3, num_classes, hidden=False)

  def __call__(self, x):
    x = pp.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = pp.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = nnx.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


@register("mlp")
class MLP(nnx.Module):
  """Fully connected ``in-4000-1000-4000-classes`` with ReLU (3072 inputs for CIFAR-10)."""

  def __init__(self, input_shape, num_classes: int, layers: Layers,
               hidden_sizes=(4000, 1000, 4000)):
    sizes = (math.prod(input_shape),) + tuple(hidden_sizes)
    self.hidden = nnx.List([layers.linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = layers.linear(sizes[-1], num_classes, hidden=False)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)


def build(name: str, *, mode: str, input_shape, num_classes: int = 10, tau_prox: float = 1.0,
          axis_name: str | None = None, seed: int = 0, prox_linear: type = pp.Linear,
          **sizes) -> nnx.Module:
  """Builds a registered model (``"convnet"`` or ``"mlp"``).

  Args:
    name: a key of `MODELS`.
    mode: ``"backprop"`` (plain flax layers) or a ProxProp mode (``"gradient"``,
      ``"prox_exact"``, ``"prox_cgN"``) for the hidden layers.
    input_shape: one example's shape, e.g. ``(height, width, channels)``.
    num_classes: outputs of the final (plain) linear layer.
    tau_prox: ProxProp's proximal step size; unused by ``backprop``.
    axis_name: the ``pmap`` axis the ProxProp layers reduce over (None outside ``pmap``).
    seed: parameter init seed.
    prox_linear: the ProxProp dense layer class (see `Layers`).
    **sizes: the model's size arguments (``hidden_sizes`` of the MLP; ``channels``,
      ``kernel_size`` of the ConvNet); the paper's sizes when left out.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
  layers = Layers(mode, tau_prox, axis_name, nnx.Rngs(seed), prox_linear)
  return MODELS[name](tuple(input_shape), num_classes, layers, **sizes)


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy, the paper's loss."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
