"""The models of the experiments, one copy each, used by the experiments, benchmarks and tests.

The paper's two models (``mlp``, ``convnet``) are built from ProxProp layers or, for true
BackProp (``mode="backprop"``), from plain flax layers. Only their hidden layers are ProxProp
layers; the final linear layer always takes the plain gradient, as in the reference. Their
initialization is PyTorch's default (uniform +-1/sqrt(fan_in) for kernel and bias), which is
what the paper's step sizes were tuned with.

Beyond the paper, ``resnet`` and ``vit`` are written with plain flax layers only (flax's
default init) and converted by `pp.convert` (see `build`): the proof that conversion works on
ordinary model code.

Models live in a registry: ``@register("name")`` on an ``nnx.Module`` whose constructor takes
``(input_shape, num_classes, layers, **sizes)`` makes it buildable as ``build("name", ...)``
and selectable by ``--model name``.

Sharding: the MLP's and the ViT's kernels carry flax sharding annotations in logical names
(``embed``: the model width, ``mlp``: the hidden width, ``heads``), bound to mesh axes by
`sharding_rules` (``embed`` → ``fsdp``, ``mlp`` and ``heads`` → ``model``): Megatron-style
column- then row-parallel pairs, attention heads over ``model``, and FSDP over ``fsdp``.
Without rules (``build(..., sharding_rules=None)``) no annotation is made.
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

#: The mesh axes the models' annotations use: ``fsdp`` splits the parameters' model width and
#: the batch, ``model`` their hidden width and heads (tensor parallel), ``data`` the batch.
MESH_AXES = ("data", "fsdp", "model")
LOGICAL_AXES = {"embed": "fsdp", "mlp": "model", "heads": "model"}
#: The models whose parameters carry sharding annotations.
SHARDED = ("mlp", "vit")


def sharding_rules(mesh_axes) -> tuple:
  """Flax logical axis rules binding the models' annotations to the axes of a mesh that has
  them (None: unsplit)."""
  return tuple((name, axis if axis in mesh_axes else None)
               for name, axis in LOGICAL_AXES.items())

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
    sharding_rules: `sharding_rules` of a mesh to annotate the parameters for, or None.
    distribute_solves: the ProxProp layers' ``distribute_solves``.
  """

  def __init__(self, mode: str, tau_prox: float, axis_name: str | None, rngs: nnx.Rngs,
               prox_linear: type = pp.Linear, sharding_rules=None, distribute_solves=False):
    self.rngs = rngs
    self.sharding_rules = sharding_rules
    if mode == "backprop":
      self.linear_cls, self.conv_cls, self.prox_kwargs = nnx.Linear, nnx.Conv, {}
    else:
      self.linear_cls, self.conv_cls = prox_linear, pp.Conv
      self.prox_kwargs = dict(mode=mode, tau_prox=tau_prox, axis_name=axis_name)
      if distribute_solves:  # only then: pp.prox_module layers have no columns to share
        self.prox_kwargs["distribute_solves"] = True

  def metadata(self, *names) -> dict:
    """A parameter's sharding metadata: its dims' logical ``names`` (empty without rules)."""
    return dict(out_sharding=names, sharding_rules=self.sharding_rules) if (
        self.sharding_rules and any(names)) else {}

  def linear(self, fan_in: int, fan_out: int, hidden: bool = True, names=(None, None)):
    """A dense layer; ``hidden=False`` is the plain head; ``names``: its kernel's logical
    axes (the bias takes the output's)."""
    cls, kwargs = (self.linear_cls, self.prox_kwargs) if hidden else (nnx.Linear, {})
    return cls(fan_in, fan_out, kernel_init=torch_uniform(), bias_init=torch_uniform(fan_in),
               kernel_metadata=self.metadata(*names), bias_metadata=self.metadata(names[1]),
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
  """Fully connected ``in-4000-1000-4000-classes`` with ReLU (3072 inputs for CIFAR-10).

  Sharded, the layers alternate column- and row-parallel (``embed → mlp``, ``mlp → embed``):
  a column-parallel layer's split output feeds the next layer's split input directly.
  """

  def __init__(self, input_shape, num_classes: int, layers: Layers,
               hidden_sizes=(4000, 1000, 4000)):
    sizes = (math.prod(input_shape),) + tuple(hidden_sizes)
    names = [("embed", "mlp"), ("mlp", "embed")]
    self.hidden = nnx.List([layers.linear(a, b, names=names[i % 2])
                            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))])
    self.head = layers.linear(sizes[-1], num_classes, hidden=False,
                              names=(names[len(hidden_sizes) % 2][0], None))

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)


# PyTorch's BatchNorm default: running averages follow the batch statistics within a few dozen
# steps, which short runs on small datasets need (flax's default 0.99 lags for hundreds).
BN_MOMENTUM = 0.9


@register("resnet")
class ResNet(nnx.Module):
  """A small pre-activation ResNet (He et al. 2016), from plain flax layers.

  A 3x3 stem, three stages of ``blocks`` pre-activation blocks (BatchNorm, ReLU, 3x3 conv,
  twice; the shortcut is a 1x1 stride-2 conv where the shape changes) with ``widths``
  channels, the second and third stages halving the resolution, then BatchNorm, ReLU, global
  average pooling and a linear head. ``blocks=3`` is ResNet-20; works on 8x8 and 32x32.
  """

  def __init__(self, input_shape, num_classes: int, layers: Layers,
               widths=(16, 32, 64), blocks: int = 3):
    rngs = layers.rngs
    self.stem = nnx.Conv(input_shape[-1], widths[0], (3, 3), padding="SAME", use_bias=False,
                         rngs=rngs)
    self.blocks = nnx.List()
    cin = widths[0]
    for stage, width in enumerate(widths):
      for i in range(blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        self.blocks.append(PreActBlock(cin, width, stride, rngs))
        cin = width
    self.norm = nnx.BatchNorm(cin, momentum=BN_MOMENTUM, rngs=rngs)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    x = nnx.relu(self.norm(x))
    return self.head(x.mean(axis=(1, 2)))


class PreActBlock(nnx.Module):
  """BatchNorm, ReLU, conv3x3, BatchNorm, ReLU, conv3x3, plus the shortcut."""

  def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
    self.norm1 = nnx.BatchNorm(cin, momentum=BN_MOMENTUM, rngs=rngs)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME", use_bias=False,
                          rngs=rngs)
    self.norm2 = nnx.BatchNorm(cout, momentum=BN_MOMENTUM, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.shortcut = (nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
                     if stride != 1 or cin != cout else None)

  def __call__(self, x):
    h = nnx.relu(self.norm1(x))
    shortcut = x if self.shortcut is None else self.shortcut(h)
    h = self.conv1(h)
    h = self.conv2(nnx.relu(self.norm2(h)))
    return h + shortcut


@register("vit")
class ViT(nnx.Module):
  """A small Vision Transformer (Dosovitskiy et al. 2021), from plain flax layers.

  Non-overlapping ``patch x patch`` patches (default: a 4x4 grid of them, so 2x2 patches on
  8x8 and 8x8 patches on 32x32) embedded by a linear map, a learned position embedding,
  ``depth`` pre-norm blocks (LayerNorm, ``nnx.MultiHeadAttention``; LayerNorm, MLP with GELU),
  a final LayerNorm, mean pooling over tokens and a linear head.
  """

  def __init__(self, input_shape, num_classes: int, layers: Layers, dim: int = 64,
               depth: int = 2, heads: int = 4, mlp_dim: int = 128, patch: int | None = None):
    rngs = layers.rngs
    height, width, channels = input_shape
    self.patch = patch or max(1, height // 4)
    tokens = (height // self.patch) * (width // self.patch)
    self.embed = nnx.Linear(self.patch * self.patch * channels, dim, rngs=rngs,
                            kernel_metadata=layers.metadata(None, "embed"))
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, dim)))
    self.blocks = nnx.List([EncoderBlock(dim, heads, mlp_dim, layers) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs,
                           kernel_metadata=layers.metadata("embed", None))

  def __call__(self, x):
    n, h, w, c = x.shape
    p = self.patch
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(x.reshape(n, (h // p) * (w // p), p * p * c)) + self.position[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=1))


class EncoderBlock(nnx.Module):
  """Pre-norm transformer encoder block; sharded, the heads and the MLP's hidden units are
  split over ``model`` (Megatron-style)."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, layers: Layers):
    rngs, meta = layers.rngs, layers.metadata
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        heads, dim, decode=False, rngs=rngs, kernel_metadata=meta("embed", "heads", None),
        bias_metadata=meta("heads", None), out_kernel_metadata=meta("heads", None, "embed"),
        out_bias_metadata=meta("embed"))
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, mlp_dim, rngs=rngs, kernel_metadata=meta("embed", "mlp"),
                           bias_metadata=meta("mlp"))
    self.mlp2 = nnx.Linear(mlp_dim, dim, rngs=rngs, kernel_metadata=meta("mlp", "embed"))

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.mlp2(nnx.gelu(self.mlp1(self.norm2(x))))


#: Models written with plain flax layers; their ProxProp variants come from `pp.convert`.
CONVERTED = ("resnet", "vit")


def build(name: str, *, mode: str, input_shape, num_classes: int = 10, tau_prox: float = 1.0,
          axis_name: str | None = None, seed: int = 0, prox_linear: type = pp.Linear,
          plain_head: bool = False, sharding_rules=None, distribute_solves: bool = False,
          **sizes) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: a key of `MODELS`.
    mode: ``"backprop"`` (plain flax layers) or a ProxProp mode (``"gradient"``,
      ``"prox_exact"``, ``"prox_cgN"``).
    input_shape: one example's shape, e.g. ``(height, width, channels)``.
    num_classes: outputs of the final linear layer.
    tau_prox: ProxProp's proximal step size; unused by ``backprop``.
    axis_name: the ``pmap`` axis the ProxProp layers reduce over (None outside ``pmap``).
    seed: parameter init seed.
    prox_linear: the ProxProp dense layer class of the paper's models (see `Layers`).
    plain_head: `CONVERTED` models: keep the plain gradient for the final layer ``head``
      (the paper's models always do).
    sharding_rules: `sharding_rules` of the mesh to annotate the MLP's and ViT's parameters
      for (build under ``jax.set_mesh(mesh)``: flax then splits them as it creates them), or
      None.
    distribute_solves: the ProxProp layers share their solves among the mesh's devices
      (``pp.Linear(..., distribute_solves=True)``).
    **sizes: the model's size arguments (``hidden_sizes`` of the MLP; ``channels``,
      ``kernel_size`` of the ConvNet; ``widths``, ``blocks`` of the ResNet; ``dim``, ``depth``,
      ``heads``, ``mlp_dim``, ``patch`` of the ViT); the defaults when left out.

  The paper's models put ProxProp layers in their hidden layers themselves; `CONVERTED`
  models are built from plain flax layers and, unless ``mode`` is ``"backprop"``, every
  layer that is linear in its parameters is converted by `pp.convert`.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
  converted = name in CONVERTED
  layers = Layers("backprop" if converted else mode, tau_prox, axis_name, nnx.Rngs(seed),
                  prox_linear, sharding_rules, distribute_solves)
  model = MODELS[name](tuple(input_shape), num_classes, layers, **sizes)
  if converted and mode != "backprop":
    pp.convert(model, mode=mode, tau_prox=tau_prox, axis_name=axis_name,
               exclude=("head",) if plain_head else None, distribute_solves=distribute_solves)
  return model


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy, the paper's loss."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
