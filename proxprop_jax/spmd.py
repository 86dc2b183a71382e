"""The multi-device reductions of a ProxProp backward pass (public JAX APIs only).

Under ``pmap``/``shard_map`` each device's loss is the mean over its own shard, so
for the **global** batch

* ``Aᵀg`` is the ``pmean`` of the devices' ``Aᵀg`` (`reduce` with ``lax.pmean``);
* the Gram ``AᵀA`` is the ``psum`` of theirs (`reduce` with ``lax.psum``);
* a batch-space solve needs the rows of every device (`gather_rows`).

Under ``shard_map`` with ``check_vma=True`` autodiff may already have summed a
cotangent (`summed_by_autodiff`); then it is not reduced again. Under ``jit`` on
a mesh with Explicit axes, `global_view` runs a backward rule with those axes
made Auto, so XLA inserts the collectives of its batch contractions itself.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
from jax import lax

AxisName = Any  # a hashable axis name, a tuple of them, or None


def check_axis_name(axis_name) -> AxisName:
  """``axis_name`` as None, a hashable name, or a tuple of names."""
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)
  try:
    hash(axis_name)
  except TypeError:
    raise ValueError(f"axis_name must be None, a hashable axis name or a tuple of them; "
                     f"got {axis_name!r}.") from None
  return axis_name


def axis_names(axis_name) -> frozenset:
  """The set of axis names in ``axis_name`` (empty for None)."""
  if axis_name is None:
    return frozenset()
  return frozenset(axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,))


def axis_size(axis_name) -> int:
  """The number of devices along ``axis_name`` (1 for None)."""
  return math.prod(lax.axis_size(n) for n in axis_names(axis_name))


def _varying_axes(x) -> frozenset:
  """The manual axes ``x`` varies over (``shard_map`` with ``check_vma=True``), else {}."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()) if mat is not None else getattr(aval, "vma", ()))


def summed_by_autodiff(value, axis_name, data) -> bool:
  """Whether a per-device sum over ``axis_name`` is already in ``value``.

  Under ``shard_map`` with ``check_vma=True``, the ``data`` varies over the axis,
  and a replicated (invariant) parameter used with it gets an implicit ``pvary``
  whose transpose ``psum``s the parameter's cotangent: an autodiff result that
  does not vary is already the sum over devices (and the rows' cotangents then
  carry the scale of the global loss, ``lax.pmean`` of the devices' losses).
  Under ``pmap`` or ``check_vma=False`` nothing is summed for us.
  """
  names = axis_names(axis_name)
  return names <= _varying_axes(data) and not names & _varying_axes(value)


def reduce(reduction, value, axis_name, data):
  """``reduction(value, axis_name)`` (``lax.psum``/``lax.pmean``) unless already summed;
  the identity for ``axis_name=None``."""
  if axis_name is None or summed_by_autodiff(value, axis_name, data):
    return value
  return reduction(value, axis_name)


def gather_rows(x, g, grad, axis_name):
  """Every device's rows of ``x`` and ``g`` (axis 0), scaled for the global mean loss.

  ``g`` carries ``1/local batch``; the global loss is the mean of the devices'
  losses, so it is divided by the number of devices, unless autodiff already
  summed ``grad`` (then ``g`` has the global scale and the gather is made
  invariant, like the sum).
  """
  if axis_name is None:
    return x, g
  summed = summed_by_autodiff(grad, axis_name, x)
  gather = functools.partial(lax.all_gather, axis_name=axis_name, axis=0, tiled=True,
                             to="invarying" if summed else "varying")
  x, g = gather(x), gather(g)
  return x, (g if summed else g / axis_size(axis_name))


def vary_like(value, like):
  """Marks ``value`` varying over the manual axes ``like`` varies over (cotangent types)."""
  missing = tuple(sorted(_varying_axes(like) - _varying_axes(value), key=str))
  return lax.pcast(value, missing, to="varying") if missing else value


def global_view(bwd: Callable) -> Callable:
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
