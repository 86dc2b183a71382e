"""ProxProp layers as ``jax.custom_vjp`` transforms: `dense`, `conv` and `proximal`.

A ProxProp layer is linear in its parameters, ``z = A(x) θ`` with ``θ = [W; b]``
and ``A = [x, 1]`` (dense) or ``A = [patches(x), 1]`` (conv). Its forward pass and
its input cotangent are the plain layer's. Its parameter cotangent, given
``g = ∂L/∂z`` and ``λ = 1/τ``, is the proximal direction

    D = θₖ − argmin_θ ½‖Aθ − (z − g)‖² + (λ/2)‖θ − θₖ‖²  =  (AᵀA + λI)⁻¹ Aᵀ g,

exactly (``prox_exact``), by ``N`` CG steps per output column (``prox_cgN``), or
the plain gradient ``Aᵀ g`` (``gradient``).

Which small system is solved is a performance choice, not a semantic one:

* batch space, ``rows < p``: ``D = Aᵀ (AAᵀ + λI)⁻¹ g`` (push-through identity);
* parameter space otherwise: factor the Gram ``AᵀA`` of shape ``(p, p)``.

CG iterates are computed in the eigenbasis of that small matrix (`solvers.eig_cg`).

Several devices (``axis_name``): each device's loss is the mean over its shard,
so the global ``Aᵀg`` is the ``pmean`` of the local ones and the global Gram the
``psum``; a batch-space solve gathers the rows of every device instead. Every
device returns the direction of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from proxprop_jax import conv_gram, solvers
from proxprop_jax.modes import Mode, check_tau, parse_mode

AxisName = Any  # a hashable axis name, a tuple of them, or None

#: `proximal` materialises the Gram for ``prox_exact`` up to this many parameters.
MAX_EXACT_PARAMS = 4096


@dataclasses.dataclass(frozen=True)
class _Prox:
  """Static configuration of one ProxProp backward pass."""

  mode: Mode
  lam: float
  axis_name: AxisName


def _config(mode, tau_prox, axis_name) -> _Prox:
  return _Prox(parse_mode(mode), 1.0 / check_tau(tau_prox), _check_axis_name(axis_name))


def _check_axis_name(axis_name):
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)
  try:
    hash(axis_name)
  except TypeError:
    raise ValueError(f"axis_name must be None, a hashable axis name or a tuple of them; "
                     f"got {axis_name!r}.") from None
  return axis_name


def _axis_size(axis_name) -> int:
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return math.prod(lax.axis_size(n) for n in names)


def _varying_axes(x) -> frozenset:
  """The manual axes ``x`` varies over (``shard_map`` with ``check_vma=True``), else {}."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()) if mat is not None else getattr(aval, "vma", ()))


def _summed_by_autodiff(value, axis_name, data) -> bool:
  """Whether a per-device sum over ``axis_name`` is already in ``value``.

  Under ``shard_map`` with ``check_vma=True``, the ``data`` varies over the axis,
  and a replicated (invariant) parameter used with it gets an implicit ``pvary``
  whose transpose ``psum``s the parameter's cotangent: an autodiff result that
  does not vary is already the sum over devices (and the rows' cotangents then
  carry the scale of the global loss, ``lax.pmean`` of the devices' losses).
  Under ``pmap`` or ``check_vma=False`` nothing is summed for us.
  """
  names = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
  return names <= _varying_axes(data) and not names & _varying_axes(value)


def _reduce(reduce, value, axis_name, data):
  """``reduce(value, axis_name)`` (``lax.psum``/``lax.pmean``) unless already summed."""
  return value if _summed_by_autodiff(value, axis_name, data) else reduce(value, axis_name)


def _vary_like(value, like):
  """Marks ``value`` varying over the manual axes ``like`` varies over (cotangent types)."""
  missing = tuple(sorted(_varying_axes(like) - _varying_axes(value), key=str))
  return lax.pcast(value, missing, to="varying") if missing else value


try:  # Varying -> Invariant gather: every device then holds the same, invariant rows.
  from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant
except ImportError:  # pragma: no cover - older/newer JAX
  _all_gather_invariant = None


# --------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class _DenseLayer:
  """``z = x W + b`` over the last axis of ``x``; ``A = [x, 1]``."""

  use_bias: bool
  precision: Any = None

  def apply(self, x, kernel, bias):
    z = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return z if bias is None else z + bias

  def input_matrix(self, x):
    a = x.reshape(-1, x.shape[-1])
    if self.use_bias:
      a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
    return a

  def gram(self, x):
    a = self.input_matrix(x)
    return a.T @ a

  def gram_flops(self, x_shape):
    rows, p = math.prod(x_shape[:-1]), x_shape[-1] + self.use_bias
    return 2.0 * rows * p * p


@dataclasses.dataclass(frozen=True)
class _ConvLayer:
  """An N-d convolution (NHWC / HWIO) with explicit padding; ``A = [patches(x), 1]``."""

  use_bias: bool
  window: tuple[int, ...]
  strides: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  dilation: tuple[int, ...]
  precision: Any = None

  def apply(self, x, kernel, bias):
    spatial = "DHW"[3 - len(self.window):]
    specs = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    dims = lax.conv_dimension_numbers(x.shape, kernel.shape, specs)
    z = lax.conv_general_dilated(x, kernel, self.strides, self.pads, rhs_dilation=self.dilation,
                                 dimension_numbers=dims, precision=self.precision)
    return z if bias is None else z + bias

  def _geometry(self):
    return self.window, self.strides, self.pads, self.dilation

  def input_matrix(self, x):
    return conv_gram.input_matrix(x, *self._geometry(), self.use_bias)

  def gram(self, x):
    return conv_gram.gram(x, *self._geometry(), self.use_bias)

  def gram_flops(self, x_shape):
    return conv_gram.gram_flops(x_shape, *self._geometry(), self.use_bias)


# ------------------------------------------------------------------ the direction D


# Costs in matrix-product FLOPs, measured on a 2-core CPU (benchmarks/RESULTS.md): XLA's
# products run several times faster than LAPACK's factorisations and triangular solves,
# and an elementwise CG step is memory bound (per element of the (n, k) iterate).
_CPU_COSTS = dict(
    cholesky=2.0,  # × n³
    eigh=20.0,  # × n³
    trsm=3.0,  # × the FLOPs of a triangular solve
    cg_step=500.0,  # × n·k, the vector updates of one `gram_cg` / `kernel_cg` step
    eig_cg_step=350.0,  # × n·k, one step of `eig_cg`'s diagonal recurrence
)
# On GPUs/TPUs products are ~100× faster while small factorisations are latency bound
# (estimates, not measured here): keep eigendecompositions out, factor only for prox_exact.
_ACCELERATOR_COSTS = dict(cholesky=200.0, eigh=4000.0, trsm=3.0, cg_step=100.0,
                          eig_cg_step=100.0)


def _cost(name: str) -> float:
  return (_CPU_COSTS if jax.default_backend() == "cpu" else _ACCELERATOR_COSTS)[name]


def _inverse_is_cheaper(n: int, k: int) -> bool:
  """Whether applying ``(M + λI)⁻¹`` as an explicit inverse beats two triangular solves."""
  return 5.0 * n**3 + 2.0 * n * n * k < _cost("trsm") * 2.0 * n * n * k


def _cg_flops(n: int, k: int, steps: int) -> tuple[float, float]:
  """Costs of ``steps`` CG steps on an ``n × n`` system with ``k`` columns: with the
  formed matrix (a product per step), and in its eigenbasis (``eigh``, two rotations)."""
  direct = steps * (2.0 * n * n * k + _cost("cg_step") * n * k)
  eigen = _cost("eigh") * n**3 + 4.0 * n * n * k + steps * _cost("eig_cg_step") * n * k
  return direct, eigen


def _cg_in_eigenbasis(n: int, k: int, steps: int) -> bool:
  """Whether ``eigh`` + two rotations beats ``steps`` products with the formed matrix."""
  direct, eigen = _cg_flops(n, k, steps)
  return eigen < direct


def _solve_flops(n: int, k: int, mode: Mode | None) -> float:
  """Estimated cost of solving the ``n × n`` system for ``k`` columns in ``mode``."""
  if mode is None or mode.is_exact:
    return _cost("cholesky") * n**3 + min(5.0 * n**3 + 2.0 * n * n * k,
                                          _cost("trsm") * 2.0 * n * n * k)
  return min(_cg_flops(n, k, mode.cg_steps))


def _use_batch_space(layer, x_shape, rows: int, p: int, out: int, mode: Mode | None = None) -> bool:
  """Whether the ``rows × rows`` system is cheaper than the ``p × p`` one (FLOPs).

  Both need one ``rows·p·out`` product (``Aᵀy`` resp. ``Aᵀg``); the difference is
  forming ``AAᵀ`` (``2·rows²·p``) or the Gram (`gram_flops`), and the solve.
  """
  batch = 2.0 * rows * rows * p + _solve_flops(rows, out, mode)
  param = layer.gram_flops(x_shape) + _solve_flops(p, out, mode)
  return batch < param


def _spd_apply(matrix, rhs, lam):
  """``(M + λI)⁻¹ B``: triangular solves, or the explicit inverse for many columns."""
  n, k = rhs.shape
  if _inverse_is_cheaper(n, k):
    return solvers.spd_inverse(matrix, lam) @ rhs
  return solvers.spd_solve(matrix, rhs, lam)


def _direction(layer, cfg: _Prox, x, g, grad):
  """The parameter direction ``D`` (p, out) for input ``x``, output cotangent ``g``.

  ``grad`` is this device's plain gradient ``Aᵀg`` flattened to (p, out).
  """
  mode, lam, axis = cfg.mode, cfg.lam, cfg.axis_name
  if mode.is_gradient:
    return grad if axis is None else _reduce(lax.pmean, grad, axis, x)
  p, out = grad.shape
  devices = 1 if axis is None else _axis_size(axis)
  rows = (g.size // out) * devices
  if _use_batch_space(layer, (x.shape[0] * devices, *x.shape[1:]), rows, p, out, mode):
    invariant = False
    if axis is not None:  # every device solves with the rows of all devices
      # Already-summed Aᵀg (see _summed_by_autodiff): g carries the global scale.
      summed = _summed_by_autodiff(grad, axis, x)
      invariant = summed and _all_gather_invariant is not None
      gather = _all_gather_invariant if invariant else lax.all_gather
      x, g = gather(x, axis, axis=0, tiled=True), gather(g, axis, axis=0, tiled=True)
      g = g if summed else g / devices
    # A = [a, 1] is never materialised: AAᵀ = aaᵀ + 1 and Aᵀm = [aᵀm; 1ᵀm].
    a = dataclasses.replace(layer, use_bias=False).input_matrix(x)
    g = g.reshape(-1, out)
    kernel = a @ a.T + (1 if layer.use_bias else 0)
    n = kernel.shape[0]

    def transpose_times(m, rhs=None):  # Aᵀ m (rhs), multiplied in the cheaper order
      if rhs is not None and p < rhs.shape[1]:
        parts = [(a.T @ m) @ rhs] + [jnp.sum(m, 0, keepdims=True) @ rhs] * layer.use_bias
      else:
        m = m if rhs is None else m @ rhs
        parts = [a.T @ m] + [jnp.sum(m, 0, keepdims=True)] * layer.use_bias
      return jnp.concatenate(parts, axis=0) if layer.use_bias else parts[0]

    if mode.is_exact and _inverse_is_cheaper(n, out):
      d = transpose_times(solvers.spd_inverse(kernel, lam), g)
    elif mode.is_exact:
      d = transpose_times(solvers.spd_solve(kernel, g, lam))
    elif not _cg_in_eigenbasis(n, out, mode.cg_steps):
      d = transpose_times(solvers.kernel_cg(kernel, g, lam, mode.cg_steps))
    else:
      evals, evecs, keep = solvers.eigh_psd(kernel)
      w = solvers.eig_cg(evals, (evecs.T @ g) * keep[:, None], lam, mode.cg_steps, weights=evals)
      d = transpose_times(evecs, w)
    if axis is not None and summed and not invariant:  # same on every device: make invariant
      d = lax.psum(d, axis) / devices
    return d
  gram = layer.gram(x)
  if axis is not None:
    gram, grad = _reduce(lax.psum, gram, axis, x), _reduce(lax.pmean, grad, axis, x)
  if mode.is_exact:
    return _spd_apply(gram, grad, lam)
  if not _cg_in_eigenbasis(p, out, mode.cg_steps):
    return solvers.gram_cg(gram, grad, lam, mode.cg_steps)
  evals, evecs, keep = solvers.eigh_psd(gram)
  w = solvers.eig_cg(evals, (evecs.T @ grad) * keep[:, None], lam, mode.cg_steps)
  return evecs @ w


def _global_view(bwd: Callable) -> Callable:
  """Runs a backward rule ``bwd(static, static, residuals, g)`` with the Explicit mesh
  axes of its residuals made Auto.

  Under ``jit`` on a mesh with Explicit axes (``jax.make_mesh``'s default), the
  rule's products that contract the sharded batch dim (``AᵀA``, ``AAᵀ``, the
  patch reshapes) would need an ``out_sharding`` each; inside ``auto_axes`` XLA
  inserts the collectives itself, as on an Auto mesh. The cotangents come back
  sharded like the primal values (the residuals).
  """

  @functools.wraps(bwd)
  def wrapped(static, config, residuals, g):
    for leaf in jax.tree.leaves(residuals):
      mesh = jax.typeof(leaf).sharding.mesh
      explicit = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                       if kind == jax.sharding.AxisType.Explicit)
      if explicit:
        specs = jax.tree.map(lambda r: jax.typeof(r).sharding.spec, residuals)
        rule = lambda residuals, g: bwd(static, config, residuals, g)
        with jax.sharding.use_abstract_mesh(mesh):
          return jax.sharding.auto_axes(rule, axes=explicit, out_sharding=specs)(residuals, g)
    return bwd(static, config, residuals, g)

  return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _prox_layer(layer, cfg, x, kernel, bias):
  return layer.apply(x, kernel, bias)


def _prox_layer_fwd(layer, cfg, x, kernel, bias):
  return layer.apply(x, kernel, bias), (x, kernel, bias)


def _prox_layer_bwd(layer, cfg, residuals, g):
  x, kernel, bias = residuals
  _, input_vjp = jax.vjp(lambda x: layer.apply(x, kernel, bias), x)
  (dx,) = input_vjp(g)
  # The direction is computed in at least float32, returned in the parameter dtype.
  dtype = solvers.solve_dtype(x.dtype, kernel.dtype, g.dtype)
  xs, gs = x.astype(dtype), g.astype(dtype)
  ks = kernel.astype(dtype)
  bs = None if bias is None else bias.astype(dtype)
  _, param_vjp = jax.vjp(lambda k, b: layer.apply(xs, k, b), ks, bs)
  grad_k, grad_b = param_vjp(gs)
  out = kernel.shape[-1]
  grad = grad_k.reshape(-1, out)
  if bias is not None:
    grad = jnp.concatenate([grad, grad_b[None]], axis=0)
  d = _direction(layer, cfg, xs, gs, grad)
  dk = _vary_like(d[: grad_k.size // out].reshape(kernel.shape).astype(kernel.dtype), kernel)
  db = None if bias is None else _vary_like(d[-1].astype(bias.dtype), bias)
  return dx, dk, db


_prox_layer.defvjp(_prox_layer_fwd, _global_view(_prox_layer_bwd))


def _call(layer, cfg: _Prox, x, kernel, bias):
  if cfg.mode.is_gradient and cfg.axis_name is None:
    return layer.apply(x, kernel, bias)  # the plain layer: jax.grad's gradient at its cost
  return _prox_layer(layer, cfg, x, kernel, bias)


# ------------------------------------------------------------------------ public ops


def dense(x, kernel, bias=None, *, mode="prox_cg1", tau_prox=1.0, axis_name=None,
          precision=None):
  """A dense layer ``z = x @ kernel + bias`` with a ProxProp backward pass.

  Args:
    x: inputs of shape ``(..., in)``; all leading dims are rows of ``A``.
    kernel: ``(in, out)``.
    bias: ``(out,)`` or None.
    mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cgN"`` (N ≥ 1).
    tau_prox: the proximal step size ``τ > 0`` (``λ = 1/τ``).
    axis_name: the ``pmap``/``shard_map`` axis (or tuple of axes) the batch is
      split over; the direction is then the one of the global batch.
    precision: passed to ``lax.dot_general``.

  Returns:
    ``z`` of shape ``(..., out)``.
  """
  cfg = _config(mode, tau_prox, axis_name)
  if jnp.ndim(kernel) != 2 or jnp.ndim(x) < 1 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"pp.dense expects x (..., in) and kernel (in, out); got x {jnp.shape(x)} "
                     f"and kernel {jnp.shape(kernel)}.")
  if bias is not None and jnp.shape(bias) != (kernel.shape[1],):
    raise ValueError(f"pp.dense expects bias of shape ({kernel.shape[1]},) for kernel "
                     f"{kernel.shape}; got {jnp.shape(bias)}.")
  return _call(_DenseLayer(bias is not None, precision), cfg, x, kernel, bias)


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n or not all(isinstance(v, int) and v >= 1 for v in value):
    raise ValueError(f"{name} must be an int >= 1 or {n} of them; got {value!r}.")
  return value


def _pads(padding, in_spatial, window, strides, dilation):
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID', an int or (low, high) pairs; "
                       f"got {padding!r}.")
    dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    return tuple(lax.padtype_to_pads(in_spatial, dilated, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * len(window)
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != len(window) or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding needs one (low, high) pair per spatial dim ({len(window)}); "
                     f"got {padding!r}.")
  return pads


def conv(x, kernel, bias=None, *, strides=1, padding="SAME", rhs_dilation=1, mode="prox_cg1",
         tau_prox=1.0, axis_name=None, precision=None):
  """An N-d convolution (channels last) with a ProxProp backward pass.

  ``A(x)`` is the im2col patch matrix of ``x`` (rows = batch × output positions)
  with a ones column for the bias; see the module docstring for ``D``.

  Args:
    x: ``(N, *spatial, Cin)`` with 1, 2 or 3 spatial dims (more leading batch dims
      are flattened).
    kernel: ``(*window, Cin, Cout)``.
    bias: ``(Cout,)`` or None.
    strides, rhs_dilation: an int or one per spatial dim.
    padding: ``"SAME"``, ``"VALID"``, an int, or one ``(low, high)`` pair per dim.
    mode, tau_prox, axis_name, precision: as in `dense`.

  Returns:
    ``(N, *out_spatial, Cout)``.
  """
  cfg = _config(mode, tau_prox, axis_name)
  kernel_shape, x_shape = jnp.shape(kernel), jnp.shape(x)
  n = len(kernel_shape) - 2
  if not 1 <= n <= 3 or len(x_shape) < n + 2 or x_shape[-1] != kernel_shape[-2]:
    raise ValueError(f"pp.conv expects x (N, *spatial, Cin) and kernel (*window, Cin, Cout) "
                     f"with 1-3 spatial dims; got x {x_shape} and kernel {kernel_shape}.")
  if bias is not None and jnp.shape(bias) != (kernel_shape[-1],):
    raise ValueError(f"pp.conv expects bias of shape ({kernel_shape[-1]},) for kernel "
                     f"{kernel_shape}; got {jnp.shape(bias)}.")
  batch_shape = x_shape[: len(x_shape) - n - 1]
  x = x.reshape(-1, *x_shape[len(batch_shape):])
  window = tuple(kernel_shape[:n])
  strides = _tuple(strides, n, "strides")
  dilation = _tuple(rhs_dilation, n, "rhs_dilation")
  pads = _pads(padding, x.shape[1:-1], window, strides, dilation)
  layer = _ConvLayer(bias is not None, window, strides, pads, dilation, precision)
  z = _call(layer, cfg, x, kernel, bias)
  return z.reshape(*batch_shape, *z.shape[1:])


# -------------------------------------------------------------- any linear function


def proximal(fn: Callable, *, mode="prox_cg1", tau_prox=1.0, axis_name=None) -> Callable:
  """Gives ``fn(params, x)``, linear in the ``params`` pytree, a ProxProp backward.

  The returned function has ``fn``'s signature and forward pass; its cotangent for
  ``x`` is ordinary backprop, and for ``params`` the direction ``D`` of the whole
  flattened pytree ``θ``:

  * ``prox_cgN``: ``N`` steps of one CG on ``(JᵀJ + λI) D = Jᵀg``, matrix-free with
    ``v ↦ vjp(fn(v, x)) + λv`` (``fn`` is linear, so ``J v = fn(v, x)``);
  * ``prox_exact``: the Gram ``JᵀJ`` materialised through ``jax.jacfwd`` (at most
    `MAX_EXACT_PARAMS` parameters), then a Cholesky solve;
  * ``gradient``: ``Jᵀg``.

  Keyword arguments and closed-over values of ``fn`` are static: pass arrays in
  ``x`` (any pytree).
  """
  cfg = _config(mode, tau_prox, axis_name)

  @functools.wraps(fn)
  def wrapped(params, x):
    if cfg.mode.is_gradient and cfg.axis_name is None:
      return fn(params, x)
    count = sum(jnp.size(leaf) for leaf in jax.tree.leaves(params))
    if cfg.mode.is_exact and count > MAX_EXACT_PARAMS:
      raise ValueError(
          f"pp.proximal with mode='prox_exact' materialises the {count}x{count} Gram matrix; "
          f"it allows at most {MAX_EXACT_PARAMS} parameters. Use mode='prox_cgN' (matrix-free) "
          f"or 'gradient', or pp.dense / pp.conv, whose exact solves need no such limit.")
    return _proximal(fn, cfg, params, x)

  return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _proximal(fn, cfg, params, x):
  return fn(params, x)


def _proximal_fwd(fn, cfg, params, x):
  return fn(params, x), (params, x)


def _proximal_bwd(fn, cfg, residuals, g):
  params, x = residuals
  _, input_vjp = jax.vjp(lambda x: fn(params, x), x)
  (dx,) = input_vjp(g)
  dtype = solvers.solve_dtype(*(leaf.dtype for leaf in jax.tree.leaves((params, g))))
  cast = lambda t: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
  theta, unravel = ravel_pytree(cast(params))
  xs, gs = cast(x), ravel_pytree(cast(g))[0]

  def apply(theta):  # θ ↦ A(x) θ, flattened
    return ravel_pytree(fn(unravel(theta), xs))[0]

  _, apply_t = jax.vjp(apply, theta)  # u ↦ Aᵀu (apply is linear: any point will do)
  grad = apply_t(gs)[0]
  mode, lam, axis = cfg.mode, cfg.lam, cfg.axis_name
  psum = (lambda v: v) if axis is None else (lambda v: _reduce(lax.psum, v, axis, gs))
  if axis is not None:
    grad = _reduce(lax.pmean, grad, axis, gs)
  if mode.is_gradient:
    d = grad
  elif mode.is_exact:
    jac = jax.jacfwd(apply)(theta)  # (outputs, P)
    d = solvers.spd_solve(psum(jac.T @ jac), grad[:, None], lam)[:, 0]
  else:
    d = solvers.cg(lambda v: psum(apply_t(apply(v))[0]) + lam * v, grad, mode.cg_steps)
  dparams = jax.tree.map(lambda d, p: _vary_like(d.astype(p.dtype), p), unravel(d), params)
  return dparams, dx


_proximal.defvjp(_proximal_fwd, _global_view(_proximal_bwd))


__all__ = ["dense", "conv", "proximal", "MAX_EXACT_PARAMS"]
