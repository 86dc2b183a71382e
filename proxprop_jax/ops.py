"""ProxProp layers as ``jax.custom_vjp`` transforms: `dense`, `conv` and `proximal`.

A ProxProp layer is linear in its parameters, ``z = A(x) θ`` with ``θ = [W; b]``
and ``A = [x, 1]`` (dense) or ``A = [patches(x), 1]`` (conv). Its forward pass and
its input cotangent are the plain layer's. Its parameter cotangent, given
``g = ∂L/∂z`` and ``λ = 1/τ``, is the proximal direction

    D = θₖ − argmin_θ ½‖Aθ − (z − g)‖² + (λ/2)‖θ − θₖ‖²  =  (AᵀA + λI)⁻¹ Aᵀ g,

exactly (``prox_exact``), by ``N`` CG steps per output column (``prox_cgN``), or
the plain gradient ``Aᵀ g`` (``gradient``); see ``docs/math.md``.

One backward pass: the layer kind (`layers`) states the problem's sizes,
`planner.plan` decides how to solve it, `direction` solves it, `spmd` reduces
over devices. ``τ`` may be a traced value (a live, scheduled step size).
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

from proxprop_jax import contraction, direction, geometry, layers, planner, sharding, solvers
from proxprop_jax import spmd
from proxprop_jax._recorder import Recorder
from proxprop_jax.modes import Mode, check_tau, parse_mode

#: `proximal` materialises the Gram for ``prox_exact`` up to this many parameters.
MAX_EXACT_PARAMS = 4096

#: The default precision of every product that computes a direction.
SOLVE_PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Config:
  """The static settings of one ProxProp layer call.

  Attributes:
    mode: the parsed mode.
    axis_name: the ``pmap``/``shard_map`` batch axis (or tuple), or None.
    precision: the layer's own products (forward pass, input cotangent).
    solve_precision: every product that computes the direction.
    plan: a forced `planner.Plan`, or None to let `planner.plan` decide.
    param_specs: the PartitionSpecs of the layer's parameters under ``jit`` on a mesh (kernel
      and bias; table; scale and bias), None where not split (`sharding`).
    distribute_solves: under ``jit`` on a mesh, share the solve's blocks or columns among
      the devices the parameters are not split over, then all-gather the direction.
  """

  mode: Mode
  axis_name: Any = None
  precision: Any = None
  solve_precision: Any = SOLVE_PRECISION
  plan: planner.Plan | None = None
  param_specs: tuple | None = None
  distribute_solves: bool = False


def config(mode, axis_name=None, precision=None, solve_precision=SOLVE_PRECISION,
           plan=None, param_specs=None, distribute_solves=False) -> Config:
  """A validated `Config`."""
  mode = parse_mode(mode)
  if plan is not None:
    if not isinstance(plan, planner.Plan):
      raise ValueError(f"plan must be a proxprop_jax.Plan or None; got {plan!r}.")
    plan.check(mode)
  if not isinstance(distribute_solves, bool):
    raise ValueError(f"distribute_solves must be True or False; got {distribute_solves!r}.")
  axis_name = spmd.check_axis_name(axis_name)
  if distribute_solves and axis_name is not None:
    raise ValueError(f"distribute_solves=True shares the solves among the devices of a jit + "
                     f"sharding step; under pmap/shard_map (axis_name={axis_name!r}) every "
                     f"device computes its own copy of the direction. Use axis_name=None with "
                     f"parallel.make_sharded_step, or distribute_solves=False.")
  return Config(mode, axis_name, _precision(precision), _precision(solve_precision), plan,
                sharding.check_specs(param_specs), distribute_solves)


_BY_NAME = {**{a.name.lower(): a for a in lax.DotAlgorithmPreset},
            **{p.name.lower(): p for p in lax.Precision}}  # "default": lax.Precision's

#: The names a precision may be given by: `lax.Precision`'s and `lax.DotAlgorithmPreset`'s.
PRECISION_NAMES = tuple(_BY_NAME)


def _precision(precision):
  """``precision`` as None, a `lax.Precision` or a `lax.DotAlgorithmPreset` (e.g.
  ``"bf16_bf16_f32_x3"``: three bfloat16 passes, near-float32 accuracy at tensor-core
  speed on GPUs); a name is matched without regard to case."""
  if precision is None or isinstance(precision, (lax.Precision, lax.DotAlgorithmPreset)):
    return precision
  if isinstance(precision, str) and precision.lower() in _BY_NAME:
    return _BY_NAME[precision.lower()]
  raise ValueError(f"precision must be None, a jax.lax.Precision, a jax.lax.DotAlgorithmPreset "
                   f"or one of their names {PRECISION_NAMES}; got {precision!r}.")


def damping(tau_prox):
  """``λ = 1/τ``; a concrete ``τ`` is validated, a traced one is used as it is."""
  if isinstance(tau_prox, jax.core.Tracer):
    return 1.0 / tau_prox
  return 1.0 / check_tau(tau_prox)


def _layout(kind, cfg: Config, problem, plan, shape) -> sharding.Layout:
  """How the solve is split over the mesh: as the parameters (`sharding`), and over the
  other devices too with ``distribute_solves``; never under pmap/shard_map."""
  if cfg.axis_name is not None:
    return sharding.Layout()
  spec = None if cfg.param_specs is None else next(
      (s for s in cfg.param_specs if s is not None), None)
  return sharding.solve_layout(kind.dim_groups(len(shape)), spec, shape,
                               plan.system == "parameter", cfg.distribute_solves, problem.blocks)


def _direction(plan, kind, cfg: Config, x, g, grad, lam, layout: sharding.Layout):
  """The direction ``D`` in the columns of `layers` (B, p, k), for the global batch, split
  over the mesh as ``layout`` says."""
  axis, steps, precision = cfg.axis_name, cfg.mode.cg_steps, cfg.solve_precision
  if plan.system == "gradient":
    return spmd.reduce(lax.pmean, grad, axis, x)
  if plan.system == "batch":
    x, g = spmd.gather_rows(x, g, grad, axis)
    return layout.constrain(direction.batch_space(
        plan, kind.matrix(x), layout.constrain(kind.cotangent_rows(g)), kind.use_bias, lam,
        steps, precision))
  gram = layout.constrain_matrix(spmd.reduce(lax.psum, kind.gram(x, precision), axis, x))
  grad = layout.constrain(spmd.reduce(lax.pmean, grad, axis, x))
  return layout.constrain(direction.parameter_space(plan, gram, grad, lam, steps, precision))


def _like_params(cfg: Config, layout: sharding.Layout, values):
  """The directions split like their parameters (an all-gather after a spread solve)."""
  if cfg.param_specs is None and layout.is_trivial:
    return values
  specs = cfg.param_specs or (None,) * len(values)
  return tuple(sharding.constrain(v, s or sharding.P()) for v, s in zip(values, specs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _prox_layer(kind, cfg, x, kernel, bias, lam):
  return kind.apply(x, kernel, bias, cfg.precision)


def _prox_layer_fwd(kind, cfg, x, kernel, bias, lam):
  return kind.apply(x, kernel, bias, cfg.precision), (x, kernel, bias, lam)


def _prox_layer_bwd(kind, cfg, residuals, g):
  x, kernel, bias, lam = residuals
  # The layer is linear in x (without the bias) and in (kernel, bias): both cotangents
  # are transposes, with no forward pass to recompute.
  (dx,) = jax.linear_transpose(lambda x: kind.apply(x, kernel, None, cfg.precision), x)(
      g.astype(jnp.result_type(x, kernel)))
  # The direction is computed in at least float32, returned in the parameter dtype.
  dtype = solvers.solve_dtype(x.dtype, kernel.dtype, g.dtype)
  xs, gs, ks = x.astype(dtype), g.astype(dtype), kernel.astype(dtype)
  bs = None if bias is None else bias.astype(dtype)
  problem = kind.problem(x.shape, kernel.shape, spmd.axis_size(cfg.axis_name))
  plan = cfg.plan or planner.plan(problem, cfg.mode)
  layout = _layout(kind, cfg, problem, plan, kernel.shape)
  if layout.columns and cfg.plan is None:
    plan = planner.with_columns_split(plan)
  planner.record(problem, plan)
  param_transpose = jax.linear_transpose(
      lambda k, b: kind.apply(xs, k, b, cfg.solve_precision), ks, bs)
  groups = kind.dim_groups(kernel.ndim)
  gk, gb = param_transpose(gs)
  # Between the kernel and its columns (B, p, k) the arrays are split as the solve is (the
  # batch sum reduced into each device's share; an all-to-all back to the kernel's split),
  # so that no reshape gathers the whole kernel.
  grad = kind.to_columns(layout.constrain_parameter(gk, groups), gb)
  d = _direction(plan, kind, cfg, xs, gs, grad, jnp.asarray(lam, dtype), layout)
  dk, db = kind.from_columns(d, kernel.shape)
  dk, db = _like_params(cfg, layout, (layout.constrain_parameter(dk, groups), db))
  dk = spmd.vary_like(dk.astype(kernel.dtype), kernel)
  db = None if bias is None else spmd.vary_like(db.astype(bias.dtype), bias)
  return dx, dk, db, jnp.zeros_like(lam)


_prox_layer.defvjp(_prox_layer_fwd, spmd.global_view(_prox_layer_bwd))


def apply(kind, cfg: Config, x, kernel, bias, tau_prox):
  """Applies a layer ``kind`` with a ProxProp backward pass (the plain layer for
  ``gradient`` mode on one device: ``jax.grad``'s gradient at its cost)."""
  lam = damping(tau_prox)
  cfg = _with_type_specs(cfg, kernel, bias)
  observe(kind, cfg, x, kernel, bias, lam)
  if cfg.mode.is_gradient and cfg.axis_name is None and cfg.plan is None:
    return kind.apply(x, kernel, bias, cfg.precision)
  return _prox_layer(kind, cfg, x, kernel, bias, lam)


def _with_type_specs(cfg: Config, *params) -> Config:
  """``cfg`` with the parameters' PartitionSpecs from their types (a mesh with Explicit
  axes) when none were given."""
  if cfg.param_specs is not None:
    return cfg
  return dataclasses.replace(cfg, param_specs=sharding.specs_of_types(*params))


# ------------------------------------------------------------------------ public ops


def dense(x, kernel, bias=None, *, mode="prox_cg1", tau_prox=1.0, axis_name=None,
          precision=None, solve_precision=SOLVE_PRECISION, plan=None, param_specs=None,
          distribute_solves=False):
  """A dense layer ``z = x @ kernel + bias`` with a ProxProp backward pass.

  Args:
    x: inputs of shape ``(..., in)``; all leading dims are rows of ``A``.
    kernel: ``(in, out)``.
    bias: ``(out,)`` or None.
    mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cgN"`` (N ≥ 1).
    tau_prox: the proximal step size ``τ > 0`` (``λ = 1/τ``): a number, or a scalar
      array (it may be traced, e.g. a scheduled value inside a jitted step).
    axis_name: the ``pmap``/``shard_map`` axis (or tuple of axes) the batch is
      split over; the direction is then the one of the global batch.
    precision: the ``lax.Precision`` of the forward pass and the input cotangent.
    solve_precision: the precision of every product that computes the direction
      (default ``HIGHEST``: float32 products are otherwise TF32/bfloat16 on GPUs/TPUs).
    plan: a `planner.Plan` that forces how the direction is computed (None: the
      cheapest by `planner.plan`).
    param_specs: under ``jit`` on a mesh, the PartitionSpecs ``(kernel, bias)`` the
      parameters are split by (None: unsplit, or on a mesh with Explicit axes their types';
      the NNX layers pass their variables' sharding metadata). Each device then solves the
      columns it holds (see `proxprop_jax.sharding`).
    distribute_solves: under ``jit`` on a mesh, also share the solve's columns (or blocks)
      among the devices the parameters are not split over, and all-gather the direction.

  Returns:
    ``z`` of shape ``(..., out)``.
  """
  cfg = config(mode, axis_name, precision, solve_precision, plan, param_specs,
               distribute_solves)
  if jnp.ndim(kernel) != 2 or jnp.ndim(x) < 1 or jnp.shape(x)[-1] != kernel.shape[0]:
    raise ValueError(f"pp.dense expects x (..., in) and kernel (in, out); got x {jnp.shape(x)} "
                     f"and kernel {jnp.shape(kernel)}.")
  if bias is not None and jnp.shape(bias) != (kernel.shape[1],):
    raise ValueError(f"pp.dense expects bias of shape ({kernel.shape[1]},) for kernel "
                     f"{kernel.shape}; got {jnp.shape(bias)}.")
  return apply(layers.Dense(bias is not None), cfg, x, kernel, bias, tau_prox)


def conv(x, kernel, bias=None, *, strides=1, padding="SAME", rhs_dilation=1,
         feature_group_count=1, mode="prox_cg1", tau_prox=1.0, axis_name=None,
         precision=None, solve_precision=SOLVE_PRECISION, plan=None, param_specs=None,
         distribute_solves=False):
  """An N-d convolution (channels last) with a ProxProp backward pass.

  ``A(x)`` is the im2col patch matrix of ``x`` (rows = batch × output positions)
  with a ones column for the bias; see the module docstring for ``D``. With
  ``feature_group_count = G`` the system is block-diagonal, one block per group.

  Args:
    x: ``(N, *spatial, Cin)`` with 1, 2 or 3 spatial dims (more leading batch dims
      are flattened).
    kernel: ``(*window, Cin/G, Cout)``.
    bias: ``(Cout,)`` or None.
    strides, rhs_dilation: an int or one per spatial dim.
    padding: ``"SAME"``, ``"VALID"``, an int, or one ``(low, high)`` pair per dim.
    feature_group_count: the number of groups ``G`` (divides Cin and Cout).
    mode, tau_prox, axis_name, precision, solve_precision, plan, param_specs,
    distribute_solves: as in `dense`.

  Returns:
    ``(N, *out_spatial, Cout)``.
  """
  cfg = config(mode, axis_name, precision, solve_precision, plan, param_specs,
               distribute_solves)
  kernel_shape, x_shape = jnp.shape(kernel), jnp.shape(x)
  n = len(kernel_shape) - 2
  groups = feature_group_count
  if not (isinstance(groups, int) and groups >= 1):
    raise ValueError(f"feature_group_count must be an integer >= 1; got {groups!r}.")
  if (not 1 <= n <= 3 or len(x_shape) < n + 2 or x_shape[-1] != kernel_shape[-2] * groups
      or kernel_shape[-1] % groups):
    raise ValueError(f"pp.conv expects x (N, *spatial, Cin) and kernel (*window, Cin/G, Cout) "
                     f"with 1-3 spatial dims and G = feature_group_count = {groups} dividing "
                     f"Cout; got x {x_shape} and kernel {kernel_shape}.")
  if bias is not None and jnp.shape(bias) != (kernel_shape[-1],):
    raise ValueError(f"pp.conv expects bias of shape ({kernel_shape[-1]},) for kernel "
                     f"{kernel_shape}; got {jnp.shape(bias)}.")
  batch_shape = x_shape[: len(x_shape) - n - 1]
  x = x.reshape(-1, *x_shape[len(batch_shape):])
  window = tuple(kernel_shape[:n])
  strides = geometry.int_tuple(strides, n, "strides")
  dilation = geometry.int_tuple(rhs_dilation, n, "rhs_dilation")
  pads = geometry.explicit_pads(padding, x.shape[1:-1], window, strides, dilation)
  kind = layers.Conv(bias is not None, window, strides, pads, dilation, groups)
  z = apply(kind, cfg, x, kernel, bias, tau_prox)
  return z.reshape(*batch_shape, *z.shape[1:])


# -------------------------------------------------------------- any linear function


def proximal(fn: Callable, *, mode="prox_cg1", tau_prox=1.0, axis_name=None,
             solve_precision=SOLVE_PRECISION) -> Callable:
  """Gives ``fn(params, x)``, linear in the ``params`` pytree, a ProxProp backward.

  The returned function has ``fn``'s signature and forward pass; its cotangent for
  ``x`` is ordinary backprop, and for ``params`` the direction ``D`` of the whole
  flattened pytree ``θ``:

  * ``prox_cgN``: ``N`` steps of one CG on ``(JᵀJ + λI) D = Jᵀg``, matrix-free with
    ``v ↦ vjp(fn(v, x)) + λv`` (``fn`` is linear, so ``J v = fn(v, x)``);
  * ``prox_exact``: the Gram ``JᵀJ`` materialised through ``jax.jacfwd`` (at most
    `MAX_EXACT_PARAMS` parameters), then a Cholesky solve;
  * ``gradient``: ``Jᵀg``.

  ``fn``'s products that compute the direction run at ``solve_precision`` (through
  ``jax.default_matmul_precision``, so a product with an explicit precision inside
  ``fn`` keeps it). Keyword arguments and closed-over values of ``fn`` are static:
  pass arrays in ``x`` (any pytree).
  """
  cfg = config(mode, axis_name, solve_precision=solve_precision)
  lam = damping(tau_prox)

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
    return _proximal(fn, cfg, params, x, lam)

  return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _proximal(fn, cfg, params, x, lam):
  return fn(params, x)


def _proximal_fwd(fn, cfg, params, x, lam):
  return fn(params, x), (params, x, lam)


def _precision_name(precision) -> str:
  return "highest" if precision is None else (
      precision.name.lower() if isinstance(precision, lax.Precision) else str(precision))


def _proximal_bwd(fn, cfg, residuals, g):
  params, x, lam = residuals
  _, input_vjp = jax.vjp(lambda x: fn(params, x), x)
  (dx,) = input_vjp(g)
  with jax.default_matmul_precision(_precision_name(cfg.solve_precision)):
    d = _proximal_direction(fn, cfg, params, x, g, lam)
  dparams = jax.tree.map(lambda d, p: spmd.vary_like(d.astype(p.dtype), p), d, params)
  return dparams, dx, jnp.zeros_like(lam)


def _proximal_direction(fn, cfg: Config, params, x, g, lam):
  """The direction of the flattened parameter pytree, as a pytree like ``params``."""
  dtype = solvers.solve_dtype(*(leaf.dtype for leaf in jax.tree.leaves((params, g))))
  cast = lambda t: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
  theta, unravel = ravel_pytree(cast(params))
  xs, gs = cast(x), ravel_pytree(cast(g))[0]
  lam = jnp.asarray(lam, dtype)

  def apply_a(theta):  # θ ↦ A(x) θ, flattened
    return ravel_pytree(fn(unravel(theta), xs))[0]

  _, apply_a_transpose = jax.vjp(apply_a, theta)  # u ↦ Aᵀu (linear: any point will do)
  mode, axis = cfg.mode, cfg.axis_name
  psum = lambda v: spmd.reduce(lax.psum, v, axis, gs)
  grad = spmd.reduce(lax.pmean, apply_a_transpose(gs)[0], axis, gs)
  if mode.is_gradient:
    d = grad
  elif mode.is_exact:
    jac = jax.jacfwd(apply_a)(theta)  # (outputs, P)
    d = solvers.spd_solve(psum(jac.T @ jac), grad[:, None], lam)[:, 0]
  else:
    d = solvers.cg(lambda v: psum(apply_a_transpose(apply_a(v))[0]) + lam * v, grad,
                   mode.cg_steps)
  return unravel(d)


_proximal.defvjp(_proximal_fwd, spmd.global_view(_proximal_bwd))


# ------------------------------------------------- norm layers' affine part, embeddings


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _prox_norm_affine(kind, cfg, x, scale, bias, lam):
  return kind.apply(x, scale, bias)


def _prox_norm_affine_fwd(kind, cfg, x, scale, bias, lam):
  return kind.apply(x, scale, bias), (x, scale, bias, lam)


def _prox_norm_affine_bwd(kind, cfg, residuals, g):
  x, scale, bias, lam = residuals
  # x ↦ x ⊙ scale is diagonal, hence its own transpose.
  dx = kind.apply(g, scale, None).astype(x.dtype)
  params = [v for v in (scale, bias) if v is not None]
  dtype = solvers.solve_dtype(x.dtype, g.dtype, *(v.dtype for v in params))
  xs, gs = x.astype(dtype), g.astype(dtype)
  problem = kind.problem(x.shape, spmd.axis_size(cfg.axis_name))
  plan = cfg.plan or planner.plan(problem, cfg.mode)
  planner.record(problem, plan)
  cast = lambda v: None if v is None else v.astype(dtype)
  grad = kind.gradient(xs, gs, cast(scale), cast(bias))
  layout = _layout(kind, cfg, problem, plan, (problem.blocks,))
  d = _direction(plan, kind, cfg, xs, gs, grad, jnp.asarray(lam, dtype), layout)
  back = lambda d, p: None if p is None else spmd.vary_like(d.astype(p.dtype), p)
  dscale, dbias = _like_params(cfg, layout, kind.from_columns(d))
  return dx, back(dscale, scale), back(dbias, bias), jnp.zeros_like(lam)


_prox_norm_affine.defvjp(_prox_norm_affine_fwd, spmd.global_view(_prox_norm_affine_bwd))


def norm_affine(x, scale=None, bias=None, *, feature_axes=-1, mode="prox_cg1", tau_prox=1.0,
                axis_name=None, solve_precision=SOLVE_PRECISION, plan=None, param_specs=None,
                distribute_solves=False):
  """The affine part of a normalisation layer, ``z = x ⊙ scale + bias`` per feature,
  with a ProxProp backward pass.

  ``x`` is the normalised input ``x̂`` (LayerNorm, RMSNorm, BatchNorm, GroupNorm
  compute it; its cotangent is ordinary backprop). Feature ``f`` has its own
  system with ``A_f = [x̂[:, f], 1]`` over every row (all positions of ``x`` that
  share feature ``f``): a 2×2 system per feature (1×1 with only one of ``scale``,
  ``bias``), whose CG is one CG per feature.

  Args:
    x: the normalised input, any shape.
    scale, bias: ``(F,)`` or None, ``F`` the product of ``x``'s sizes at
      ``feature_axes`` (flattened in C order, as flax reshapes them).
    feature_axes: an axis or a tuple of axes of ``x``.
    mode, tau_prox, axis_name, solve_precision, plan: as in `dense` (the planner
      picks the parameter space except for fewer rows than parameters).
    param_specs, distribute_solves: as in `dense`, ``param_specs`` for ``(scale, bias)``;
      a split of the features splits the per-feature systems.

  Returns:
    ``z``, shaped like ``x``.
  """
  cfg = config(mode, axis_name, solve_precision=solve_precision, plan=plan,
               param_specs=param_specs, distribute_solves=distribute_solves)
  if cfg.plan is not None and cfg.plan.solver == "diagonal":
    raise ValueError(f"pp.norm_affine solves 2x2 systems: a plan with solver 'diagonal' "
                     f"(embeddings) does not apply; got {cfg.plan}.")
  ndim = jnp.ndim(x)
  axes = (feature_axes,) if isinstance(feature_axes, int) else tuple(feature_axes)
  if not axes or any(not isinstance(a, int) or not -ndim <= a < ndim for a in axes) or len(
      {a % ndim for a in axes}) != len(axes):
    raise ValueError(f"pp.norm_affine expects feature_axes: distinct axes of x (shape "
                     f"{jnp.shape(x)}), an int or a tuple of ints; got {feature_axes!r}.")
  axes = tuple(sorted(a % ndim for a in axes))
  features = math.prod(jnp.shape(x)[a] for a in axes)
  for name, value in (("scale", scale), ("bias", bias)):
    if value is not None and jnp.shape(value) != (features,):
      raise ValueError(f"pp.norm_affine expects {name} of shape ({features},) for x "
                       f"{jnp.shape(x)} with feature_axes {feature_axes!r}; got "
                       f"{jnp.shape(value)}.")
  kind = layers.NormAffine(axes, scale is not None, bias is not None)
  cfg = _with_type_specs(cfg, scale, bias)
  if (scale is None and bias is None) or (
      cfg.mode.is_gradient and cfg.axis_name is None and cfg.plan is None):
    return kind.apply(x, scale, bias)
  return _prox_norm_affine(kind, cfg, x, scale, bias, damping(tau_prox))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _prox_embed(kind, cfg, ids, table, lam):
  return kind.apply(ids, table)


def _prox_embed_fwd(kind, cfg, ids, table, lam):
  return kind.apply(ids, table), (ids, table, lam)


def _prox_embed_bwd(kind, cfg, residuals, g):
  ids, table, lam = residuals
  dtype = solvers.solve_dtype(table.dtype, g.dtype)
  g = g.astype(dtype)
  problem = kind.problem(ids.shape, table.shape, spmd.axis_size(cfg.axis_name))
  plan = cfg.plan or planner.Plan(*(("gradient", "none") if cfg.mode.is_gradient else
                                    ("parameter", "diagonal")))
  planner.record(problem, plan)
  d = spmd.reduce(lax.pmean, kind.gradient(ids, g), cfg.axis_name, g)
  layout = sharding.Layout()
  if plan.system != "gradient":
    counts = spmd.reduce(lax.psum, kind.counts(ids, dtype), cfg.axis_name, ids)
    layout = _layout(kind, cfg, problem, plan, table.shape)  # d columns, one diagonal system
    d = direction.diagonal(counts, layout.constrain(d[None])[0], jnp.asarray(lam, dtype),
                           cfg.mode.cg_steps)
  (d,) = _like_params(cfg, layout, (d,))
  # Integer ids have no cotangent (None: a symbolic zero).
  return None, spmd.vary_like(d.astype(table.dtype), table), jnp.zeros_like(lam)


_prox_embed.defvjp(_prox_embed_fwd, _prox_embed_bwd)


def embed(ids, table, *, mode="prox_cg1", tau_prox=1.0, axis_name=None,
          solve_precision=SOLVE_PRECISION, plan=None, param_specs=None, distribute_solves=False):
  """An embedding lookup ``z = table[ids]`` with a ProxProp backward pass.

  ``z = onehot(ids) θ``: ``AᵀA = diag(counts)`` (how often each token occurs over
  every id of the batch) and ``Aᵀg`` the rows of ``g`` summed per token, so
  ``prox_exact`` is ``D = Aᵀg / (counts + λ)`` row-wise and ``prox_cgN`` is
  textbook CG on that diagonal system per column of ``θ``. No one-hot matrix is
  formed. Tokens absent from the batch get ``D = 0``.

  Args:
    ids: integer array, any shape; every id is a row of ``A``.
    table: ``(V, d)``. With ``V = 1`` the row is broadcast (as ``nnx.Embed``).
    mode, tau_prox, axis_name, plan: as in `dense`; ``plan`` may only be
      ``Plan("parameter", "diagonal")`` (the default) or ``Plan("gradient", "none")``.
    solve_precision: accepted for a uniform signature; this direction has no
      matrix products.
    param_specs, distribute_solves: as in `dense`, ``param_specs`` for ``(table,)``.

  Returns:
    ``z`` of shape ``(*ids.shape, d)``.
  """
  cfg = config(mode, axis_name, solve_precision=solve_precision, plan=plan,
               param_specs=param_specs, distribute_solves=distribute_solves)
  if cfg.plan is not None and cfg.plan.solver not in ("none", "diagonal"):
    raise ValueError(f"pp.embed's AᵀA is diagonal: plan must be Plan('parameter', 'diagonal') "
                     f"or Plan('gradient', 'none') (or None); got {cfg.plan}.")
  if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
    raise ValueError(f"pp.embed expects integer ids; got dtype {jnp.result_type(ids)}.")
  if jnp.ndim(table) != 2:
    raise ValueError(f"pp.embed expects a table of shape (num_embeddings, features); got "
                     f"{jnp.shape(table)}.")
  kind = layers.Embed(jnp.shape(table)[0])
  cfg = _with_type_specs(cfg, table)
  if cfg.mode.is_gradient and cfg.axis_name is None and cfg.plan is None:
    return kind.apply(ids, table)
  return _prox_embed(kind, cfg, ids, table, damping(tau_prox))


# ------------------------------------------------------------- general contractions


def _contract(name, spec: contraction.Contraction, cfg: Config, x, kernel, bias, tau_prox):
  """Applies a `contraction.Contraction` as a `layers.DenseGeneral` ProxProp layer."""
  spec.check(name, jnp.shape(x), jnp.shape(kernel), None if bias is None else jnp.shape(bias))
  kind = layers.DenseGeneral(bias is not None, len(spec.x_blocks), len(spec.x_contracted),
                             len(spec.kernel_features))
  if cfg.param_specs is not None and cfg.param_specs[0] is not None:
    # The kernel's split in the layer's order (*blocks, *contracted, *features); the bias
    # (*blocks, *features) follows the kernel's.
    split = sharding.dims(cfg.param_specs[0], jnp.ndim(kernel))
    order = lambda axes: sharding.P(*(split[a] or None for a in axes))
    cfg = dataclasses.replace(cfg, param_specs=(
        order(spec.kernel_blocks + spec.kernel_contracted + spec.kernel_features),
        order(spec.kernel_blocks + spec.kernel_features)))
  z = apply(kind, cfg, spec.inputs(x), spec.kernel(kernel),
            None if bias is None else spec.bias(bias, jnp.shape(kernel)), tau_prox)
  return spec.outputs(z)


def dense_general(x, kernel, bias=None, *, axis=-1, batch_dims=(), mode="prox_cg1",
                  tau_prox=1.0, axis_name=None, precision=None, solve_precision=SOLVE_PRECISION,
                  plan=None, param_specs=None, distribute_solves=False):
  """A dense layer over several axes (flax's ``LinearGeneral``) with a ProxProp backward.

  ``z = lax.dot_general(x, kernel, ((axis, contracted), (batch_dims, leading))) + bias``:
  ``A`` has one row per index of ``x``'s other axes and one column per index of the
  contracted ``axis`` (flattened), plus the ones column. Each index of the
  ``batch_dims`` (axes ``x`` shares with the kernel's leading axes) has its own
  weights: the system is block-diagonal, one block per index.

  Args:
    x: the input.
    kernel: ``(*batch, *contracted, *features)``, the sizes of ``x``'s ``batch_dims``,
      then of its ``axis``, then the output features.
    bias: ``(*batch, *features)`` or None.
    axis: the contracted axes of ``x`` (an int or a tuple).
    batch_dims: the axes of ``x`` shared with the kernel's leading axes.
    mode, tau_prox, axis_name, precision, solve_precision, plan, param_specs,
    distribute_solves: as in `dense` (``param_specs`` in the kernel's own axis order).

  Returns:
    ``(*batch, *other axes of x, *features)``.
  """
  cfg = config(mode, axis_name, precision, solve_precision, plan, param_specs,
               distribute_solves)
  spec = contraction.from_axes(jnp.ndim(x), jnp.ndim(kernel),
                               axis if isinstance(axis, int) else tuple(axis),
                               batch_dims if isinstance(batch_dims, int) else tuple(batch_dims))
  if bias is not None and jnp.shape(bias) != tuple(kernel.shape[a] for a in spec.bias_axes):
    raise ValueError(f"pp.dense_general expects bias of shape (*batch, *features) = "
                     f"{tuple(kernel.shape[a] for a in spec.bias_axes)}; got {jnp.shape(bias)}.")
  return _contract("pp.dense_general", spec, cfg, x, kernel, bias, tau_prox)


def einsum(equation: str, x, kernel, bias=None, *, mode="prox_cg1", tau_prox=1.0,
           axis_name=None, precision=None, solve_precision=SOLVE_PRECISION, plan=None,
           param_specs=None, distribute_solves=False):
  """``jnp.einsum(equation, x, kernel) + bias`` (flax's ``Einsum``) with a ProxProp backward.

  Supported are the equations of `contraction.SUPPORTED_EQUATIONS` (e.g. the attention
  projections ``'btd,dnh->btnh'``, ``'btnh,nhd->btd'`` and per-head weights
  ``'btnh,nhk->btnk'``): ``A`` has the input's row indices as rows and its
  contracted indices as columns; indices shared by input, kernel and output give
  one block per index. Others raise a ValueError that points at
  ``pp.prox_module(nnx.Einsum)``.

  Args:
    equation: ``'x,kernel->out'``.
    bias: as ``nnx.Einsum``'s: one value per index of the kernel's indices in ``out``
      (reshaped to them, in ``out``'s order), or None.
    mode, tau_prox, axis_name, precision, solve_precision, plan, param_specs,
    distribute_solves: as in `dense` (``param_specs`` in the kernel's own axis order).
  """
  cfg = config(mode, axis_name, precision, solve_precision, plan, param_specs,
               distribute_solves)
  if not isinstance(equation, str):
    raise ValueError(f"equation must be a string 'x,kernel->out'; got {equation!r}.")
  spec = contraction.from_equation(equation, jnp.ndim(x), jnp.ndim(kernel))
  return _contract("pp.einsum", spec, cfg, x, kernel, bias, tau_prox)


# ---------------------------------------------------------------------- observing calls


@dataclasses.dataclass(frozen=True)
class Call:
  """One ProxProp layer call as `apply` received it (`observing`)."""

  kind: Any
  cfg: Config
  x: Any
  kernel: Any
  bias: Any
  lam: Any


_OBSERVER = Recorder()


def observing():
  """Collects the `Call` of every ProxProp op applied inside (``pp.diagnostics`` forms each
  layer's system from it). Its arrays belong to the trace the op ran in."""
  return _OBSERVER.collecting()


def observe(kind, cfg: Config, x, kernel, bias, lam) -> None:
  """Adds one call to every active `observing` (every op with a layer kind calls it)."""
  _OBSERVER.add(Call(kind, cfg, x, kernel, bias, lam))


__all__ = ["Call", "Config", "MAX_EXACT_PARAMS", "SOLVE_PRECISION", "apply", "config", "conv",
           "dense", "dense_general", "einsum", "embed", "norm_affine", "observing", "proximal"]
