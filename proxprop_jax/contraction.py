"""General linear contractions as (block-)dense layers: ``LinearGeneral`` and ``Einsum``.

A layer ``z = contract(x, kernel) + bias`` whose every axis is one of

* a **row** axis: in ``x`` and ``z`` only (batch, sequence positions);
* a **contracted** axis: in ``x`` and the kernel, summed;
* a **feature** axis: in the kernel and ``z`` only;
* a **block** axis: in ``x``, the kernel and ``z`` (per-head weights,
  ``LinearGeneral``'s ``batch_axis``)

is, after ordering the axes by group, the layer `layers.DenseGeneral`
``z[r, b, f] = Σ_c x[r, b, c] W[b, c, f] + bias[b, f]``: one dense system per
block index (the groups flattened), over all rows. A `Contraction` records which
axis is which; the transposes around the layer are plain JAX ops, so autodiff
carries the input cotangent and the direction back to the caller's layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string

#: What `from_equation` accepts; every refusal says so.
SUPPORTED_EQUATIONS = (
    "ProxProp einsum supports equations 'x,kernel->out' in which every kernel index is "
    "contracted with the input (in x and kernel, not in out), an output feature (in kernel "
    "and out only) or a block axis (in x, kernel and out), and every other input index is "
    "a row (in x and out); no index repeated within an operand, '...' only in x and out. "
    "For any other equation use pp.prox_module(nnx.Einsum) (matrix-free ProxProp).")


@dataclasses.dataclass(frozen=True)
class Contraction:
  """Which axes of ``x`` and the kernel are rows, blocks, contracted or features.

  Attributes:
    x_rows, x_blocks, x_contracted: axes of ``x``.
    kernel_blocks, kernel_contracted, kernel_features: axes of the kernel;
      ``kernel_blocks[i]`` pairs with ``x_blocks[i]``, and so on.
    output: the layer's output as a permutation of ``(rows, blocks, features)``.
    bias_axes: the kernel axes whose sizes give the bias's layout, in its order.
  """

  x_rows: tuple[int, ...]
  x_blocks: tuple[int, ...]
  x_contracted: tuple[int, ...]
  kernel_blocks: tuple[int, ...]
  kernel_contracted: tuple[int, ...]
  kernel_features: tuple[int, ...]
  output: tuple[int, ...]
  bias_axes: tuple[int, ...]

  def check(self, name: str, x_shape, kernel_shape, bias_shape) -> None:
    """Raises a ValueError naming the shapes unless ``x``, kernel and bias fit."""
    pairs = list(zip(self.x_blocks + self.x_contracted,
                     self.kernel_blocks + self.kernel_contracted))
    if any(x_shape[a] != kernel_shape[b] for a, b in pairs):
      raise ValueError(f"{name}: the input axes {[a for a, _ in pairs]} of x {tuple(x_shape)} "
                       f"must have the sizes of the kernel axes {[b for _, b in pairs]} of "
                       f"{tuple(kernel_shape)}.")
    want = math.prod(kernel_shape[a] for a in self.bias_axes)
    if bias_shape is not None and math.prod(bias_shape) != want:
      raise ValueError(f"{name}: the bias must hold one value per output feature and block, "
                       f"{want} = prod{tuple(kernel_shape[a] for a in self.bias_axes)}; got "
                       f"shape {tuple(bias_shape)}.")

  def inputs(self, x):
    """``x`` as ``(*rows, *blocks, *contracted)``, with one row if it has no row axis."""
    x = _permute(x, self.x_rows + self.x_blocks + self.x_contracted)
    return x if self.x_rows else x[None]

  def kernel(self, kernel):
    """The kernel as ``(*blocks, *contracted, *features)``."""
    return _permute(kernel, self.kernel_blocks + self.kernel_contracted + self.kernel_features)

  def bias(self, bias, kernel_shape):
    """The bias as ``(*blocks, *features)``."""
    bias = bias.reshape([kernel_shape[a] for a in self.bias_axes])
    return _permute(bias, tuple(self.bias_axes.index(a)
                                for a in self.kernel_blocks + self.kernel_features))

  def outputs(self, z):
    """The ``(*rows, *blocks, *features)`` output in the caller's layout."""
    return _permute(z if self.x_rows else z[0], self.output)


def _permute(a, order):
  return a if tuple(order) == tuple(range(a.ndim)) else a.transpose(order)


def _normalize(name: str, axes, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not all(isinstance(a, int) and -ndim <= a < ndim for a in axes):
    raise ValueError(f"{name} must be axes of an input with {ndim} dims; got {axes}.")
  normal = tuple(a % ndim for a in axes)
  if len(set(normal)) != len(normal):
    raise ValueError(f"{name} names an axis twice: {axes}.")
  return normal


@functools.lru_cache(maxsize=256)
def from_axes(x_ndim: int, kernel_ndim: int, axis, batch_dims) -> Contraction:
  """``LinearGeneral``'s contraction: ``x``'s ``axis`` with the kernel's axes after its
  leading ``batch_dims`` blocks; the output is ``(blocks, rows, features)`` like
  ``lax.dot_general``'s, and the bias ``(*blocks, *features)``."""
  axis = _normalize("axis", axis, x_ndim)
  blocks = _normalize("batch_dims", batch_dims, x_ndim)
  if set(axis) & set(blocks):
    raise ValueError(f"An axis cannot be both contracted and a batch axis: axis {axis}, "
                     f"batch axes {blocks}.")
  nb, nc = len(blocks), len(axis)
  if kernel_ndim < nb + nc:
    raise ValueError(f"The kernel needs {nb} batch + {nc} contracted axes (then the "
                     f"features); it has {kernel_ndim} dims.")
  rows = tuple(a for a in range(x_ndim) if a not in axis and a not in blocks)
  nr, nf = len(rows), kernel_ndim - nb - nc
  output = (*range(nr, nr + nb), *range(nr), *range(nr + nb, nr + nb + nf))
  features = tuple(range(nb + nc, kernel_ndim))
  return Contraction(rows, blocks, axis, tuple(range(nb)), tuple(range(nb, nb + nc)),
                     features, output, tuple(range(nb)) + features)


@functools.lru_cache(maxsize=256)
def from_equation(equation: str, x_ndim: int, kernel_ndim: int) -> Contraction:
  """The contraction of an einsum ``equation`` ``'x,kernel->out'``; the bias holds the
  kernel's indices that appear in ``out``, in ``out``'s order (as ``nnx.Einsum``'s).

  Raises:
    ValueError: for an equation outside `SUPPORTED_EQUATIONS`, or operands whose
      number of dims does not match it.
  """
  eq = equation.replace(" ", "")
  if eq.count("->") != 1 or eq.count(",") != 1:
    raise ValueError(f"The einsum equation must be explicit with two operands, "
                     f"'x,kernel->out'; got {equation!r}. {SUPPORTED_EQUATIONS}")
  lhs, out = eq.split("->")
  xs, ks = lhs.split(",")
  if "..." in ks or ("..." in xs) != ("..." in out):
    raise ValueError(f"Unsupported einsum equation {equation!r}: '...' must appear in x "
                     f"and out and not in the kernel. {SUPPORTED_EQUATIONS}")
  if "..." in xs:
    count = x_ndim - (len(xs) - 3)
    fresh = [c for c in string.ascii_letters if c not in eq][: max(count, 0)]
    xs, out = xs.replace("...", "".join(fresh)), out.replace("...", "".join(fresh))
  if not (xs + ks + out).isalpha():
    raise ValueError(f"Einsum indices must be letters; got {equation!r}.")
  for name, s, ndim in (("x", xs, x_ndim), ("kernel", ks, kernel_ndim)):
    if len(s) != ndim:
      raise ValueError(f"The einsum equation {equation!r} gives {name} {len(s)} dims; it has "
                       f"{ndim}.")
  for s in (xs, ks, out):
    if len(set(s)) != len(s):
      raise ValueError(f"Unsupported einsum equation {equation!r}: index repeated in "
                       f"{s!r}. {SUPPORTED_EQUATIONS}")
  strays = [c for c in out if c not in xs + ks]
  summed = [c for c in xs + ks if (c in xs) + (c in ks) + (c in out) == 1 and c not in out]
  if strays or summed:
    raise ValueError(f"Unsupported einsum equation {equation!r}: indices "
                     f"{''.join(strays + summed)!r} are in one operand only. "
                     f"{SUPPORTED_EQUATIONS}")
  rows = [c for c in xs if c not in ks]
  blocks = [c for c in xs if c in ks and c in out]
  contracted = [c for c in xs if c in ks and c not in out]
  features = [c for c in ks if c not in xs]
  canonical = rows + blocks + features
  return Contraction(
      tuple(map(xs.index, rows)), tuple(map(xs.index, blocks)), tuple(map(xs.index, contracted)),
      tuple(map(ks.index, blocks)), tuple(map(ks.index, contracted)),
      tuple(map(ks.index, features)), tuple(map(canonical.index, out)),
      tuple(ks.index(c) for c in out if c in ks))
