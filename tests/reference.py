"""Independent float64 NumPy references for the maths of docs/math.md (no proxprop_jax code)."""

import itertools
import math

import numpy as np


def direction(a, g, mode: str, lam: float):
  """``D`` for input matrix ``a`` (rows, p), output cotangent ``g`` (rows, out)."""
  a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
  b = a.T @ g
  if mode == "gradient":
    return b
  m = a.T @ a + lam * np.eye(a.shape[1])
  if mode == "prox_exact":
    return np.linalg.solve(m, b)
  steps = int(mode.removeprefix("prox_cg"))
  return np.stack([cg(m, b[:, c], steps) for c in range(b.shape[1])], axis=1)


def cg(m, b, steps: int):
  """Textbook conjugate gradients on ``m x = b`` from ``x = 0``."""
  x = np.zeros_like(b)
  r = b.copy()
  p = r.copy()
  rr = r @ r
  for _ in range(steps):
    if rr == 0:
      break
    mp = m @ p
    alpha = rr / (p @ mp)
    x, r = x + alpha * p, r - alpha * mp
    rr, rr_old = r @ r, rr
    p = r + rr / rr_old * p
  return x


def same_pads(in_spatial, window, strides, dilation):
  pads = []
  for n, k, s, d in zip(in_spatial, window, strides, dilation):
    total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
    pads.append((total // 2, total - total // 2))
  return pads


def patches(x, window, strides, pads, dilation):
  """im2col by loops: one row per (n, output position), columns (tap, channel)."""
  x = np.pad(np.asarray(x, np.float64), [(0, 0), *pads, (0, 0)])
  out = [(x.shape[1 + i] - (k - 1) * d - 1) // s + 1
         for i, (k, s, d) in enumerate(zip(window, strides, dilation))]
  rows = []
  for n in range(x.shape[0]):
    for o in itertools.product(*map(range, out)):
      taps = [x[(n, *(oi * s + ti * d for oi, ti, s, d in zip(o, t, strides, dilation)))]
              for t in itertools.product(*map(range, window))]
      rows.append(np.concatenate(taps))
  return np.array(rows), out


def with_ones(a, use_bias: bool):
  return np.concatenate([a, np.ones((a.shape[0], 1))], axis=1) if use_bias else a
