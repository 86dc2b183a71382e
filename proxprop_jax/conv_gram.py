"""The input matrix ``A(x)`` of a convolution and its Gram matrix ``AᵀA``.

A convolution is linear in its kernel: ``z = A(x) θ`` with ``A(x)`` the im2col
patches of ``x`` (one row per batch element and output position, one column per
kernel tap and input channel, in the kernel's own row-major ``(*window, Cin)``
order) and, for the bias, one more column of ones.

Two ways to form ``AᵀA`` (same matrix, different cost; `gram` picks the cheaper by
the FLOP estimates of `gram_flops`):

* ``"patches"``: materialise ``A`` and multiply, ``2 · rows · p²`` FLOPs
  (``rows = N · prod(out)``, ``p = prod(window) · C``). The reference.
* ``"shifts"``: never materialise ``A``. With ``v = o·s + t·d − pad_lo`` the input
  position that tap ``t`` reads at output position ``o``, every Gram entry is

      G[(t, c), (t', c')] = Σₙ Σᵥ Wₜ(v) · x[n, v, c] · x[n, v + (t' − t)·d, c']

  where ``Wₜ(v) = 1`` iff ``v = o·s + t·d − pad_lo`` for some output position ``o``
  (a per-dimension 0/1 *membership* matrix; positions outside the input are the
  zero padding and contribute nothing). So a Gram block depends on the pair of taps
  only through the shift ``e = t' − t`` and a window-membership weight:

  - one spatial dim (the *inner* one, the cheapest to treat so) is kept whole: for
    each shift ``e`` of the other (*outer*) dims, one matrix product over the batch
    and the outer positions, ``M = Σ x[n, v, :, :]ᵀ x[n, v + e·d, :, :]`` of size
    ``(S·C)²`` (``S`` = the inner input extent), gives every pair of inner positions;
    the inner taps are then read off its diagonals (offset ``(t' − t)·d``) and summed
    with the inner membership;
  - outer positions with the same membership (restricted to the taps the shift
    allows) are contracted in one product: for a stride-1 SAME convolution all but
    ``2·pad`` rows per dim share one membership, so each shift costs one big
    product plus a few one-row products;
  - only the lexicographically non-negative half of the outer shifts is computed;
    the other half are transposed blocks (``G`` is symmetric).

  Cost ``≈ 2 · N · Σₑ (valid outer positions) · (S·C)²``: for the paper's ConvNet
  about 10× fewer FLOPs than ``"patches"``, all in large matrix products. Strides,
  dilation and any padding (even negative) only change the membership matrices,
  so the method is exact for all of them; for strided convolutions it loses its
  advantage (patches shrink with the stride, shifts do not), which the FLOP
  estimate accounts for.

The bias column ``Aᵀ1`` is the membership-weighted sum ``Σᵥ Wₜ(v) Σₙ x[n, v, c]``
and the corner is ``rows``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np
import jax.numpy as jnp
from jax import lax

from proxprop_jax import geometry

METHODS = ("auto", "patches", "shifts")


def patches(x, window, strides, pads, dilation):
  """im2col: ``A(x)`` without the bias column, shape ``(rows, prod(window)·Cin)``.

  Args:
    x: (N, *spatial, Cin).
    window, strides, dilation: one int per spatial dim.
    pads: one ``(low, high)`` pair per spatial dim (may be negative).

  Returns:
    The patch matrix; column ``t·Cin + c`` holds tap ``t`` (row-major over the
    window) of channel ``c``, matching ``kernel.reshape(-1, Cout)``.
  """
  x = lax.pad(x, jnp.array(0, x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
  out = geometry.conv_output_shape(x.shape[1:-1], window, strides, [(0, 0)] * len(window), dilation)
  taps = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = (0, *(o * d for o, d in zip(offset, dilation)), 0)
    limit = (x.shape[0], *(b + (n - 1) * s + 1 for b, n, s in zip(start[1:-1], out, strides)),
             x.shape[-1])
    taps.append(lax.slice(x, start, limit, (1, *strides, 1)))
  stacked = jnp.stack(taps, axis=-2)  # (N, *out, taps, Cin)
  return stacked.reshape(-1, len(taps) * x.shape[-1])


def _geometry(x_shape, window, strides, pads, dilation):
  """Normalised, hashable geometry ``(x_shape, window, strides, pads, dilation)``."""
  if len(x_shape) != len(window) + 2:
    raise ValueError(f"x must be (N, *spatial, C) with {len(window)} spatial dims; "
                     f"got {tuple(x_shape)}.")
  return (tuple(int(s) for s in x_shape), tuple(int(k) for k in window),
          tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in pads),
          tuple(int(d) for d in dilation))


# ------------------------------------------------------------ the shift layout


def membership(size: int, k: int, s: int, lo: int, d: int, out: int) -> np.ndarray:
  """``W[t, v] = 1`` iff tap ``t`` reads input position ``v`` at some output position.

  Shape ``(k, size)``: ``v + lo − t·d ∈ {0, s, …, (out − 1)·s}``.
  """
  u = np.arange(size)[None, :] + lo - np.arange(k)[:, None] * d
  return ((u >= 0) & (u % s == 0) & (u < out * s)).astype(np.int64)


class _RowGroup(NamedTuple):
  rows: tuple[int, ...]    # outer input positions contracted together (one dim)
  weight: tuple[int, ...]  # their common membership over the k taps (0 outside the shift's taps)


class _ShiftLayout(NamedTuple):
  perm: tuple[int, ...]              # spatial dims, reordered so that the inner dim is last
  shifts: tuple[tuple[int, ...], ...]  # outer tap shifts e ≥ 0 (lexicographic)
  groups: tuple[tuple[tuple[_RowGroup, ...], ...], ...]  # per shift, per outer dim
  flops: float


def _dim_groups(w: np.ndarray, size: int, k: int, e: int, d: int) -> tuple[_RowGroup, ...]:
  """Rows of one outer dim for tap shift ``e``, grouped by their restricted membership."""
  taps = np.zeros(k, bool)
  taps[max(0, -e):min(k, k - e)] = True
  lo, hi = max(0, -e * d), min(size, size - e * d)  # v and v + e·d inside the input
  groups: dict[tuple[int, ...], list[int]] = {}
  for v in range(lo, hi):
    key = tuple(int(a) for a in w[:, v] * taps)
    if any(key):
      groups.setdefault(key, []).append(v)
  return tuple(_RowGroup(tuple(rows), key) for key, rows in groups.items())


@functools.lru_cache(maxsize=256)
def _shift_layout(x_shape, window, strides, pads, dilation) -> _ShiftLayout | None:
  """The cheapest shift layout over the choices of inner dim (None for 0-d convs)."""
  n_batch, *spatial, c = x_shape
  dims = len(window)
  out = geometry.conv_output_shape(spatial, window, strides, pads, dilation)
  ws = [membership(spatial[i], window[i], strides[i], pads[i][0], dilation[i], out[i])
        for i in range(dims)]
  best = None
  for inner in range(dims):
    perm = tuple(i for i in range(dims) if i != inner) + (inner,)
    outer = perm[:-1]
    f = spatial[inner] * c
    shifts = tuple(e for e in itertools.product(*(range(1 - window[i], window[i]) for i in outer))
                   if e >= (0,) * len(outer))
    groups, flops = [], 0.0
    for e in shifts:
      per_dim = tuple(_dim_groups(ws[i], spatial[i], window[i], ei, dilation[i])
                      for i, ei in zip(outer, e))
      groups.append(per_dim)
      count = math.prod(sum(len(rg.rows) for rg in rgs) for rgs in per_dim)
      ngroups = math.prod(len(rgs) for rgs in per_dim)
      # the products, then weighting and diagonal read-out (small)
      flops += 2.0 * n_batch * count * f * f + 2.0 * ngroups * f * f * math.prod(
          window[i] for i in outer)
    flops += 2.0 * len(shifts) * math.prod(window) * window[inner] * f * f
    if best is None or flops < best.flops:
      best = _ShiftLayout(perm, shifts, tuple(groups), flops)
  return best


def gram_flops(x_shape, window, strides, pads, dilation, use_bias: bool,
               method: str = "auto") -> float:
  """Estimated FLOPs of `gram` with ``method`` (``"auto"``: the cheaper one)."""
  geo = _geometry(x_shape, window, strides, pads, dilation)
  out = geometry.conv_output_shape(geo[0][1:-1], *geo[1:])
  rows = geo[0][0] * math.prod(out)
  p = math.prod(window) * geo[0][-1] + use_bias
  patch_flops = 2.0 * rows * p * p
  if method == "patches":
    return patch_flops
  shift_flops = _shift_layout(*geo).flops
  if method == "shifts":
    return shift_flops
  if method != "auto":
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  return min(patch_flops, shift_flops)


# -------------------------------------------------------------------------- the Gram


def gram(x, window, strides, pads, dilation, use_bias: bool, *, method: str = "auto",
         precision=None):
  """``AᵀA`` of shape ``(p, p)``, ``p = prod(window)·Cin (+1 with a bias)``.

  Args:
    x: (N, *spatial, Cin).
    window, strides, dilation: one int per spatial dim.
    pads: one ``(low, high)`` pair per spatial dim (may be negative).
    use_bias: append the bias row and column.
    method: ``"patches"``, ``"shifts"`` or ``"auto"`` (the cheaper by `gram_flops`).
    precision: passed to the matrix products.
  """
  geo = _geometry(x.shape, window, strides, pads, dilation)
  if method == "auto":
    method = ("shifts" if gram_flops(*geo, use_bias, "shifts")
              < gram_flops(*geo, use_bias, "patches") else "patches")
  if method == "patches":
    a = patches(x, *geo[1:])
    if use_bias:
      a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    return lax.dot_general(a, a, (((0,), (0,)), ((), ())), precision=precision)
  if method != "shifts":
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  ata = _gram_shifts(x, geo, precision)
  if not use_bias:
    return ata
  col = _bias_column(x, geo, precision)
  rows = x.shape[0] * math.prod(geometry.conv_output_shape(geo[0][1:-1], *geo[1:]))
  corner = jnp.full((1, 1), rows, ata.dtype)
  return jnp.concatenate([jnp.concatenate([ata, col[:, None]], axis=1),
                          jnp.concatenate([col[None, :], corner], axis=1)], axis=0)


def _bias_column(x, geo, precision):
  """``Aᵀ1`` without the corner: ``Σᵥ Wₜ(v) Σₙ x[n, v, c]`` in tap-major order."""
  x_shape, window, strides, pads, dilation = geo
  spatial = x_shape[1:-1]
  out = geometry.conv_output_shape(spatial, window, strides, pads, dilation)
  s = jnp.sum(x, axis=0)  # (*spatial, C)
  for i in range(len(window)):  # contract dim i with its membership, taps go last
    w = jnp.asarray(membership(spatial[i], window[i], strides[i], pads[i][0], dilation[i],
                               out[i]), x.dtype)
    s = jnp.tensordot(s, w, axes=[[0], [1]], precision=precision)  # (... rest, C, taps so far) → moves axis
  # s is now (C, k_0, ..., k_{D-1}); tap-major, channel-minor:
  return jnp.moveaxis(s, 0, -1).reshape(-1)


def _take(a, rows, axis):
  """``a`` at static positions ``rows`` along ``axis`` (a slice where they are evenly spaced)."""
  rows = np.asarray(rows)
  step = int(rows[1] - rows[0]) if len(rows) > 1 else 1
  if step > 0 and np.array_equal(rows, rows[0] + step * np.arange(len(rows))):
    start = [0] * a.ndim
    limit = list(a.shape)
    strides = [1] * a.ndim
    start[axis], limit[axis], strides[axis] = int(rows[0]), int(rows[-1]) + 1, step
    return lax.slice(a, start, limit, strides)
  return jnp.take(a, jnp.asarray(rows), axis=axis)


def _gram_shifts(x, geo, precision):
  """``AᵀA`` (no bias) by the shift method; see the module docstring."""
  x_shape, window, strides, pads, dilation = geo
  layout = _shift_layout(*geo)
  perm = layout.perm
  outer, inner = perm[:-1], perm[-1]
  n_batch, *spatial, c = x_shape
  out = geometry.conv_output_shape(spatial, window, strides, pads, dilation)
  s_in, k_in, d_in = spatial[inner], window[inner], dilation[inner]
  f = s_in * c
  k_outer = tuple(window[i] for i in outer)
  t_outer = math.prod(k_outer)

  # (*outer spatial, N, inner·C): the products contract over the leading axes.
  xt = jnp.transpose(x, (*(1 + i for i in outer), 0, 1 + inner, len(window) + 1))
  xt = xt.reshape(*(spatial[i] for i in outer), n_batch, f)

  # Inner read-out: Z[t, t', v, v'] = W(t, v) · [v' = v + (t' − t)·d].
  w_in = membership(s_in, k_in, strides[inner], pads[inner][0], d_in, out[inner])
  z = np.zeros((k_in, k_in, s_in, s_in), np.int64)
  for t, t2 in itertools.product(range(k_in), repeat=2):
    for v in range(s_in):
      v2 = v + (t2 - t) * d_in
      if w_in[t, v] and 0 <= v2 < s_in:
        z[t, t2, v, v2] = 1
  z = jnp.asarray(z, x.dtype)

  blocks = []
  for e, per_dim in zip(layout.shifts, layout.groups):
    products, weights = [], []
    for combo in itertools.product(*per_dim):
      lhs, rhs = xt, xt
      for axis, (rg, ei, i) in enumerate(zip(combo, e, outer)):
        lhs = _take(lhs, rg.rows, axis)
        rhs = _take(rhs, [r + ei * dilation[i] for r in rg.rows], axis)
      lhs, rhs = lhs.reshape(-1, f), rhs.reshape(-1, f)
      products.append(lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), precision=precision))
      weight = np.ones((), np.int64)
      for rg in combo:
        weight = np.multiply.outer(weight, np.asarray(rg.weight))
      weights.append(weight.reshape(-1))
    if products:
      m = jnp.stack(products)  # (groups, f, f)
      wt = jnp.asarray(np.stack(weights), x.dtype)  # (groups, t_outer)
      p_e = jnp.einsum("gt,gij->tij", wt, m, precision=precision)
    else:
      p_e = jnp.zeros((t_outer, f, f), x.dtype)
    p_e = p_e.reshape(t_outer, s_in, c, s_in, c)
    # block[to, t, c, t', c'] for the outer pair (to, to + e) and inner taps (t, t')
    blocks.append(jnp.einsum("abvw,ovcwd->oacbd", z, p_e, precision=precision))
  blk = jnp.stack(blocks)  # (shifts, t_outer, k_in, c, k_in, c)

  # Assemble the outer tap pairs: direct blocks for e = to' − to in the computed
  # half, transposed blocks (of −e, read at to') for the other half.
  shift_index = {e: i for i, e in enumerate(layout.shifts)}
  taps = list(itertools.product(*(range(k) for k in k_outer)))
  e_idx = np.zeros((t_outer, t_outer), np.int64)
  src = np.zeros((t_outer, t_outer), np.int64)
  flip = np.zeros((t_outer, t_outer), bool)
  for a, ta in enumerate(taps):
    for b, tb in enumerate(taps):
      e = tuple(q - p for p, q in zip(ta, tb))
      if e in shift_index:
        e_idx[a, b], src[a, b] = shift_index[e], a
      else:
        e_idx[a, b], src[a, b], flip[a, b] = shift_index[tuple(-q for q in e)], b, True
  picked = blk[e_idx, src]  # (to, to', k_in, c, k_in, c)
  picked = jnp.where(jnp.asarray(flip)[:, :, None, None, None, None],
                     jnp.transpose(picked, (0, 1, 4, 5, 2, 3)), picked)
  ata = jnp.transpose(picked, (0, 2, 3, 1, 4, 5))  # (to, t_in, c, to', t_in', c)
  # Back to the kernel's tap order (row-major over the original spatial dims).
  k_perm = (*k_outer, k_in)
  ata = ata.reshape(*k_perm, c, *k_perm, c)
  dims = len(window)
  inv = np.argsort(perm)
  order = (*inv, dims, *(dims + 1 + j for j in inv), 2 * dims + 1)
  ata = jnp.transpose(ata, order)
  p = math.prod(window) * c
  return ata.reshape(p, p)
