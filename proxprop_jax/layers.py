"""The kinds of layers that are linear in their parameters, ``z = A(x) θ``.

A kind knows the geometry of its layer and nothing about solving: how to apply
it, its input matrix ``A`` (``matrix``: without the bias column, per block), its
Gram ``AᵀA`` (``gram``: with the bias row and column, per block), the cost of
forming that Gram, and how parameter cotangents map to the columns of the
small systems (``to_columns``/``from_columns``).

Blocks: a layer whose output columns each depend on a disjoint subset of the
inputs has a block-diagonal ``AᵀA`` (a grouped convolution: one block per
group). Every array of the systems then has a leading block axis ``B``: the
Gram ``(B, p, p)``, the gradient ``(B, p, k)`` with ``k`` output columns per
block. A plain layer has ``B = 1``.

Kinds are frozen dataclasses: hashable, so they are static data of a
``jax.custom_vjp`` and of `planner.plan`'s cache.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from proxprop_jax import conv_gram, geometry, solvers


@dataclasses.dataclass(frozen=True)
class Problem:
  """The sizes that decide how to solve: see `planner.plan`.

  Attributes:
    blocks: the number of independent systems ``B``.
    rows: rows of ``A`` over all devices (batch × output positions).
    params: parameters per output column, ``p`` (the bias included).
    columns: output columns per block, ``k``.
    gram_flops: the cost of forming the parameter-space Gram ``AᵀA`` (all blocks).
  """

  blocks: int
  rows: int
  params: int
  columns: int
  gram_flops: float


def _append_bias(columns, bias_columns):
  """The kernel's columns ``(B, p0, k)`` with the bias's ``(B, k)`` as one more row."""
  return columns if bias_columns is None else jnp.concatenate(
      [columns, bias_columns[:, None, :]], axis=1)


@dataclasses.dataclass(frozen=True)
class Dense:
  """``z = x W + b`` over the last axis of ``x``; ``A = [x, 1]``, rows = leading dims."""

  use_bias: bool

  def apply(self, x, kernel, bias, precision=None):
    z = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return z if bias is None else z + bias

  def problem(self, x_shape, kernel_shape, devices: int) -> Problem:
    rows, p = math.prod(x_shape[:-1]) * devices, x_shape[-1] + self.use_bias
    return Problem(1, rows, p, kernel_shape[-1], 2.0 * rows * p * p)

  def matrix(self, x):
    return x.reshape(1, -1, x.shape[-1])

  def gram(self, x, precision=None):
    a = self.matrix(x)[0]
    ata = jnp.matmul(a.T, a, precision=precision)
    if self.use_bias:
      col = jnp.sum(a, axis=0)
      corner = jnp.full((1, 1), a.shape[0], a.dtype)
      ata = jnp.block([[ata, col[:, None]], [col[None, :], corner]])
    return ata[None]

  def cotangent_rows(self, g):
    return g.reshape(1, -1, g.shape[-1])

  def to_columns(self, kernel, bias):
    return _append_bias(kernel[None], None if bias is None else bias[None])

  def from_columns(self, d, kernel_shape):
    kernel = d[0, : kernel_shape[0]]
    return kernel, (d[0, -1] if self.use_bias else None)

  def dim_groups(self, kernel_ndim: int):
    """The kernel dims that index the systems' blocks, parameters and columns ``(B, p, k)``
    (each group flattened in C order; `sharding` splits the solve by them)."""
    return (), (0,), (1,)


@dataclasses.dataclass(frozen=True)
class Conv:
  """An N-d convolution (channels last, ``(*window, Cin/groups, Cout)`` kernels) with
  explicit padding; ``A = [patches(x), 1]``, rows = batch × output positions.

  With ``groups > 1`` group ``b`` reads input channels ``b·Cin/G … (b+1)·Cin/G`` and
  writes output channels ``b·Cout/G …``: one block per group.
  """

  use_bias: bool
  window: tuple[int, ...]
  strides: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  dilation: tuple[int, ...]
  groups: int = 1

  @property
  def _geometry(self):
    return self.window, self.strides, self.pads, self.dilation

  def apply(self, x, kernel, bias, precision=None):
    spatial = "DHW"[3 - len(self.window):]
    specs = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    dims = lax.conv_dimension_numbers(x.shape, kernel.shape, specs)
    z = lax.conv_general_dilated(x, kernel, self.strides, self.pads, rhs_dilation=self.dilation,
                                 dimension_numbers=dims, feature_group_count=self.groups,
                                 precision=precision)
    return z if bias is None else z + bias

  def problem(self, x_shape, kernel_shape, devices: int) -> Problem:
    out = geometry.conv_output_shape(x_shape[1:-1], *self._geometry)
    rows = x_shape[0] * math.prod(out) * devices
    group_shape = (x_shape[0] * devices, *x_shape[1:-1], x_shape[-1] // self.groups)
    flops = self.groups * conv_gram.gram_flops(group_shape, *self._geometry, self.use_bias)
    p = math.prod(self.window) * group_shape[-1] + self.use_bias
    return Problem(self.groups, rows, p, kernel_shape[-1] // self.groups, flops)

  def _by_group(self, x):
    """``(G, N, *spatial, Cin/G)``."""
    return jnp.moveaxis(x.reshape(*x.shape[:-1], self.groups, -1), -2, 0)

  def matrix(self, x):
    return jax.vmap(lambda x: conv_gram.patches(x, *self._geometry))(self._by_group(x))

  def gram(self, x, precision=None):
    return jax.vmap(lambda x: conv_gram.gram(x, *self._geometry, self.use_bias,
                                             precision=precision))(self._by_group(x))

  def cotangent_rows(self, g):
    return g.reshape(-1, self.groups, g.shape[-1] // self.groups).transpose(1, 0, 2)

  def to_columns(self, kernel, bias):
    k = kernel.reshape(-1, self.groups, kernel.shape[-1] // self.groups).transpose(1, 0, 2)
    return _append_bias(k, None if bias is None else bias.reshape(self.groups, -1))

  def from_columns(self, d, kernel_shape):
    kernel = d[:, : d.shape[1] - self.use_bias].transpose(1, 0, 2).reshape(kernel_shape)
    return kernel, (d[:, -1].reshape(-1) if self.use_bias else None)

  def dim_groups(self, kernel_ndim: int):
    """As `Dense.dim_groups`; with ``groups > 1`` the output channels index the blocks."""
    params, out = tuple(range(kernel_ndim - 1)), (kernel_ndim - 1,)
    return (out, params, ()) if self.groups > 1 else ((), params, out)


@dataclasses.dataclass(frozen=True)
class NormAffine:
  """The affine part of a normalisation layer, ``z = x̂ ⊙ scale + bias`` per feature.

  ``x̂`` is the normalised input; ``feature_axes`` (sorted, non-negative) index its
  features ``f`` (flattened in C order, like flax's ``scale.reshape``), every other
  axis is a row. Output feature ``f`` only reads ``θ_f = (scale_f, bias_f)``, so
  each feature is one block: ``A_f = [x̂[:, f], 1]`` over all rows, ``B = F``
  blocks of ``p = use_scale + use_bias ≤ 2`` parameters and ``k = 1`` column.
  """

  feature_axes: tuple[int, ...]
  use_scale: bool
  use_bias: bool

  def _feature_shape(self, x_shape):
    """``scale``'s broadcast shape: ``x``'s sizes at the feature axes, 1 elsewhere."""
    return tuple(n if i in self.feature_axes else 1 for i, n in enumerate(x_shape))

  def _row_axes(self, ndim):
    return tuple(i for i in range(ndim) if i not in self.feature_axes)

  def apply(self, x, scale, bias):
    shape = self._feature_shape(x.shape)
    z = x if scale is None else x * scale.reshape(shape)
    return z if bias is None else z + bias.reshape(shape)

  def problem(self, x_shape, devices: int) -> Problem:
    features = math.prod(x_shape[i] for i in self.feature_axes)
    rows = math.prod(x_shape) // features * devices
    # Σ x̂² and Σ x̂ per feature: a few elementwise FLOPs per entry of x̂.
    return Problem(features, rows, self.use_scale + self.use_bias, 1, 3.0 * rows * features)

  def _by_feature(self, x):
    """``(F, rows)``: the features first (flattened), the rows after."""
    x = jnp.moveaxis(x, self.feature_axes, tuple(range(len(self.feature_axes))))
    return x.reshape(math.prod(x.shape[: len(self.feature_axes)]), -1)

  def matrix(self, x):
    a = self._by_feature(x)[..., None]
    return a if self.use_scale else a[..., :0]

  def gram(self, x, precision=None):
    """``[[Σ x̂², Σ x̂], [Σ x̂, rows]]`` per feature (the entries that are used)."""
    rows = self._row_axes(x.ndim)
    features = math.prod(x.shape[i] for i in self.feature_axes)
    count = jnp.full((features,), math.prod(x.shape[i] for i in rows), x.dtype)
    if not self.use_scale:
      return count[:, None, None]
    sxx, sx = (jnp.sum(v, axis=rows).reshape(-1) for v in (x * x, x))
    if not self.use_bias:
      return sxx[:, None, None]
    return jnp.stack([jnp.stack([sxx, sx], -1), jnp.stack([sx, count], -1)], -2)

  def cotangent_rows(self, g):
    return self._by_feature(g)[..., None]

  def gradient(self, x, g, scale, bias):
    """``Aᵀg`` per feature, ``(F, p, 1)``: ``(Σ x̂ g, Σ g)`` over the rows (the entries used).

    The transpose of ``θ ↦ Aθ`` at the parameters ``scale``, ``bias`` (their shapes,
    dtypes and device variance: under ``shard_map`` a replicated parameter's
    cotangent comes out summed over devices, as autodiff's does; see `spmd`).
    """
    shape = self._feature_shape(x.shape)

    def product(scale, bias):  # Aθ; without a scale, x̂ is an offset, not a part of it
      parts = ([x * scale.reshape(shape)] if scale is not None else []) + (
          [jnp.broadcast_to(bias.reshape(shape), x.shape)] if bias is not None else [])
      return sum(parts[1:], parts[0])

    cotangents = jax.linear_transpose(product, scale, bias)(g)
    return jnp.stack([v for v in cotangents if v is not None], axis=-1)[..., None]

  def dim_groups(self, ndim: int = 1):
    """As `Dense.dim_groups`, for ``scale`` (else ``bias``): the features are the blocks."""
    return (0,), (), ()

  def from_columns(self, d):
    """``(scale, bias)`` directions, ``(F,)`` each (None where the layer has none)."""
    return (d[:, 0, 0] if self.use_scale else None), (d[:, -1, 0] if self.use_bias else None)


@dataclasses.dataclass(frozen=True)
class Embed:
  """A lookup ``z = onehot(ids) θ`` of rows of the ``(V, d)`` table ``θ``.

  ``A = onehot(ids)`` (one row per id) is never formed: ``AᵀA = diag(counts)``, the
  number of times each token occurs, and ``Aᵀg`` adds each row of ``g`` into its
  token's row. Both come from transposing the lookup itself, so ids outside
  ``[0, V)`` count exactly as ``jnp.take`` treats them. The ``d`` columns of ``θ``
  share one diagonal system (``B = 1``, ``p = V``, ``k = d``). A table with one row
  is broadcast, as in ``nnx.Embed``.
  """

  num_embeddings: int

  def apply(self, ids, table):
    if self.num_embeddings == 1:
      return jnp.broadcast_to(table, ids.shape + table.shape[1:])
    return jnp.take(table, ids, axis=0)

  def problem(self, ids_shape, table_shape, devices: int) -> Problem:
    rows = math.prod(ids_shape) * devices
    return Problem(1, rows, table_shape[0], table_shape[1], float(rows))

  def counts(self, ids, dtype):
    """``diag(AᵀA)``: how often each of the ``V`` tokens occurs in ``ids``, as ``dtype``."""
    lookup = lambda column: self.apply(ids, column[:, None])[..., 0]
    (counts,) = jax.linear_transpose(lookup, jax.ShapeDtypeStruct((self.num_embeddings,), dtype))(
        jnp.ones_like(ids, dtype))
    return counts

  def dim_groups(self, ndim: int = 2):
    """As `Dense.dim_groups`, for the table: its ``d`` columns (the diagonal system never
    mixes the ``V`` rows, so they count as none)."""
    return (), (), (1,)

  def gradient(self, ids, g):
    """``Aᵀg``, ``(V, d)``: the rows of ``g`` summed per token."""
    table = jax.ShapeDtypeStruct((self.num_embeddings, g.shape[-1]), g.dtype)
    (grad,) = jax.linear_transpose(lambda t: self.apply(ids, t), table)(g)
    return grad


@dataclasses.dataclass(frozen=True)
class DenseGeneral:
  """A dense layer over groups of axes, with its own weights per block index:
  ``z[r, b, f] = Σ_c x[r, b, c] W[b, c, f] + bias[b, f]``.

  Each of ``r`` (rows), ``b`` (blocks), ``c`` (contracted) and ``f`` (features)
  stands for a group of axes: ``x`` is ``(*rows, *blocks, *contracted)``, the kernel
  ``(*blocks, *contracted, *features)``, the bias ``(*blocks, *features)``, ``z``
  ``(*rows, *blocks, *features)``. Block ``b`` has ``A_b = [x[:, b, :], 1]`` with the
  groups flattened: one system per block index (per-head weights). The forward
  pass keeps the axes apart (under ``jit`` with Explicit mesh axes a reshape of a
  sharded array needs its output sharding; the backward rule runs with them Auto).
  The rows come first, like `Dense`'s, so the batch gather over devices concatenates
  axis 0.
  """

  use_bias: bool
  blocks: int  # the number of block axes
  contracted: int  # the number of contracted axes
  features: int  # the number of feature axes

  def _sizes(self, shape, tail: int):
    """``(R, B, rest)`` of an array ``(*rows, *blocks, *tail axes)``."""
    rows = len(shape) - self.blocks - tail
    return (math.prod(shape[:rows]), math.prod(shape[rows:rows + self.blocks]),
            math.prod(shape[rows + self.blocks:]))

  def apply(self, x, kernel, bias, precision=None):
    rows, nb, nc = x.ndim - self.blocks - self.contracted, self.blocks, self.contracted
    dims = ((tuple(range(rows + nb, x.ndim)), tuple(range(nb, nb + nc))),
            (tuple(range(rows, rows + nb)), tuple(range(nb))))
    z = lax.dot_general(x, kernel, dims, precision=precision)  # (*blocks, *rows, *features)
    z = jnp.moveaxis(z, tuple(range(nb)), tuple(range(rows, rows + nb))) if nb else z
    return z if bias is None else z + bias

  def problem(self, x_shape, kernel_shape, devices: int) -> Problem:
    rows, blocks, p0 = self._sizes(x_shape, self.contracted)
    rows, p = rows * devices, p0 + self.use_bias
    k = math.prod(kernel_shape[self.blocks + self.contracted:])
    return Problem(blocks, rows, p, k, 2.0 * blocks * rows * p * p)

  def matrix(self, x):
    return jnp.swapaxes(x.reshape(self._sizes(x.shape, self.contracted)), 0, 1)

  def gram(self, x, precision=None):
    a = self.matrix(x)
    ata = solvers.t_matmul(a, a, precision)
    if self.use_bias:
      col = jnp.sum(a, axis=1)
      corner = jnp.full((a.shape[0], 1, 1), a.shape[1], a.dtype)
      ata = jnp.concatenate([jnp.concatenate([ata, col[:, :, None]], axis=2),
                             jnp.concatenate([col[:, None, :], corner], axis=2)], axis=1)
    return ata

  def cotangent_rows(self, g):
    return jnp.swapaxes(g.reshape(self._sizes(g.shape, self.features)), 0, 1)

  def _split(self, kernel_shape):
    """``(B, p0, k)`` of a kernel shape."""
    nb, nc = self.blocks, self.contracted
    return (math.prod(kernel_shape[:nb]), math.prod(kernel_shape[nb:nb + nc]),
            math.prod(kernel_shape[nb + nc:]))

  def to_columns(self, kernel, bias):
    b, _, k = self._split(kernel.shape)
    return _append_bias(kernel.reshape(self._split(kernel.shape)),
                        None if bias is None else bias.reshape(b, k))

  def dim_groups(self, kernel_ndim: int):
    """As `Dense.dim_groups`, for the kernel ``(*blocks, *contracted, *features)``."""
    nb, nc = self.blocks, self.contracted
    return (tuple(range(nb)), tuple(range(nb, nb + nc)), tuple(range(nb + nc, kernel_ndim)))

  def from_columns(self, d, kernel_shape):
    nb, nc, p0 = self.blocks, self.contracted, self._split(kernel_shape)[1]
    kernel = d[:, :p0].reshape(kernel_shape)
    bias_shape = (*kernel_shape[:nb], *kernel_shape[nb + nc:])
    return kernel, (d[:, -1].reshape(bias_shape) if self.use_bias else None)
