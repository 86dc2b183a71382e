"""ProxProp with sharded parameters (FSDP, tensor parallelism) and solves spread over devices.

Under ``jit`` the backward rule computes the direction of global arrays and GSPMD
partitions it. A layer's systems are arrays ``(B, p, k)`` (`layers`): ``B`` blocks, ``p``
parameters per output column, ``k`` output columns, and every column (and block) is an
independent problem with the same matrix. So the rule constrains the solve's
right-hand sides and results to be split over the blocks and columns the device holds
and replicated over ``p`` (`Layout`), and XLA partitions the solve accordingly:

* a **column-parallel** layer (output features split over ``model``) solves only its own
  columns: its ``g`` is split the same way and the Gram (parameter space) or ``AAᵀ`` (batch
  space) comes from the replicated input rows, with no extra communication;
* a **row-parallel** layer (input features split) needs the ``psum`` of ``AAᵀ = Σ A_s A_sᵀ``
  over its shards (batch space) and computes its own rows of ``D = Aᵀ(AAᵀ + λI)⁻¹g``; in
  parameter space its ``p × p`` Gram is formed from the gathered inputs and replicated, and
  ``Aᵀg`` is resplit from rows to columns for the solve (`solve_layout`);
* **FSDP** (parameters split over the data axis) is column- or row-parallel over that axis.

The sharding of each parameter is the user's own: the ``out_sharding`` metadata of its flax
variable (``nnx.with_partitioning``, `specs_of`), or, on a mesh with Explicit axes, the
array's type. ``distribute_solves`` (`Layout.spread`) also splits the blocks or columns over
the mesh axes the parameter is not split over, so that each device solves a share of every
layer and the directions are all-gathered afterwards.

`collectives` lists the collectives of a compiled program (to check what a step
communicates).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

Axes = tuple[str, ...]  # the mesh axes one array dim is split over, in order


def _entry_axes(entry) -> Axes:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def dims(spec, ndim: int) -> tuple[Axes, ...]:
  """The mesh axes of each of ``ndim`` dims under ``spec`` (a PartitionSpec, tuple or None)."""
  entries = tuple(spec or ())
  if len(entries) > ndim:
    raise ValueError(f"a PartitionSpec of {len(entries)} entries {spec} for an array of "
                     f"{ndim} dims.")
  return tuple(_entry_axes(e) for e in entries) + ((),) * (ndim - len(entries))


def flattened(group: tuple[Axes, ...]) -> Axes:
  """The axes of dims flattened into one (C order), where a split survives the reshape.

  A flattened dim is split into contiguous blocks only when its first dim is the only one
  split; any other split (an inner dim split) is dropped: those dims are then solved whole
  on each device and sliced afterwards (right, with redundant work).
  """
  if not group or any(group[1:]):
    return ()
  return group[0]


def union(group: tuple[Axes, ...]) -> Axes:
  """Every axis that splits one of the dims of ``group``, in order."""
  return tuple(dict.fromkeys(a for axes in group for a in axes))


def is_split(specs) -> bool:
  """Whether any of the PartitionSpecs ``specs`` splits a dim."""
  return any(any(_entry_axes(e)) for spec in specs or () if spec is not None for e in spec)


# --------------------------------------------------------------------- where specs come from


def specs_of(*variables) -> tuple | None:
  """The PartitionSpecs of flax variables from their sharding metadata, or None if none has
  one (``nnx.with_partitioning``, ``out_sharding=``, logical axis rules as flax applies them).

  A missing variable (a layer without bias) gives None in its place.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  specs = tuple(None if v is None else nnx.get_partition_spec(v).get_value() for v in variables)
  return specs if is_split(specs) else None


def specs_of_types(*arrays) -> tuple | None:
  """The PartitionSpecs in the types of ``arrays`` on a mesh with Explicit axes, or None."""
  specs = []
  for a in arrays:
    sharding = None if a is None else getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    explicit = mesh is not None and not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    specs.append(sharding.spec if explicit else None)
  return tuple(specs) if is_split(specs) else None


def check_specs(specs) -> tuple | None:
  """``specs`` as a tuple of PartitionSpecs (or None entries); a clear error otherwise."""
  if specs is None:
    return None
  try:
    specs = tuple(s if s is None or isinstance(s, P) else P(*s) for s in specs)
    hash(specs)
  except TypeError:
    raise ValueError(f"param_specs must be None or one PartitionSpec (or None) per "
                     f"parameter; got {specs!r}.") from None
  return specs


# ----------------------------------------------------------------------------- the layout


def _mesh():
  """The mesh of the trace (``jax.set_mesh``, or the global view of a backward rule)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _devices(axes: Axes) -> int:
  """The number of devices along ``axes`` of the trace's mesh."""
  mesh = _mesh()
  return math.prod(mesh.shape[a] for a in axes) if mesh is not None else 1


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which mesh axes split the blocks ``B`` and the columns ``k`` of one solve.

  Attributes:
    blocks, columns: the mesh axes of dims ``B`` and ``k`` of the systems ``(B, p, k)``.
  """

  blocks: Axes = ()
  columns: Axes = ()

  @property
  def is_trivial(self) -> bool:
    return not (self.blocks or self.columns)

  def spread(self, blocks: int) -> "Layout":
    """The layout with the mesh's other axes added, for `distribute_solves`: on the
    ``blocks`` when there are at least as many as devices to share them, else on the
    columns."""
    mesh = _mesh()
    if mesh is None:  # one device, or a step run outside `jax.set_mesh`
      return self
    used = set(self.blocks + self.columns)
    free = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                 if a not in used and t != jax.sharding.AxisType.Manual)
    count = math.prod(mesh.shape[a] for a in free)
    if count == 1:
      return self
    if blocks // _devices(self.blocks) >= count:
      return Layout(self.blocks + free, self.columns)
    return Layout(self.blocks, self.columns + free)

  def constrain(self, systems):
    """``systems`` (B, n, k) split as this layout says, replicated over ``n``."""
    if self.is_trivial:
      return systems
    return constrain(systems, P(self.blocks or None, None, self.columns or None))

  def constrain_matrix(self, matrix):
    """A system matrix (B, n, n): split over the blocks only."""
    return matrix if not self.blocks else constrain(matrix, P(self.blocks, None, None))

  def constrain_parameter(self, value, groups):
    """A parameter-shaped array split as this layout's systems, so that reshaping it into
    the systems ``(B, p, k)`` (`layers`) moves no data: blocks and columns on the first dim
    of their groups, the ``p`` dims whole. Unchanged where that dim cannot be split so
    (XLA then reshards the systems themselves)."""
    if self.is_trivial:
      return value
    entries = [None] * value.ndim
    for axes, group in ((self.blocks, groups[0]), (self.columns, groups[2])):
      if axes:
        if not group or value.shape[group[0]] % _devices(axes):
          return value
        entries[group[0]] = axes
    return constrain(value, P(*entries))


def constrain(x, spec):
  """``jax.lax.with_sharding_constraint`` on the mesh of the trace; the identity without
  one (one device, or outside ``jax.set_mesh``: sharding annotations are then only
  metadata, as in flax) and for None."""
  if x is None or spec is None or _mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def solve_layout(groups, spec, shape, parameter_space: bool, distribute: bool,
                 blocks: int) -> Layout:
  """The `Layout` of a solve of ``blocks`` blocks of independent columns.

  Args:
    groups: the parameter's dims that index the blocks, rows ``p`` and columns of the
      systems (a layer kind's ``dim_groups``).
    spec, shape: the PartitionSpec of the parameter (None: unsplit) and its shape.
    parameter_space: the solve is in parameter space: it needs whole columns of ``Aᵀg``, so
      a split of ``p`` (row-parallel, FSDP) moves to the columns where their first dim
      divides evenly (an all-to-all of the device's share instead of an all-gather of the
      right-hand side over those axes). In batch space ``D = Aᵀ(AAᵀ + λI)⁻¹g`` keeps the
      split of ``p``: one ``psum`` of ``AAᵀ``.
    distribute: share the blocks or columns among the remaining axes (`Layout.spread`).
    blocks: the number of blocks.
  """
  split = dims(spec, len(shape))
  block_dims, param_dims, column_dims = groups
  block_axes = flattened(tuple(split[d] for d in block_dims))
  param_axes = union(tuple(split[d] for d in param_dims))
  column_axes = flattened(tuple(split[d] for d in column_dims))
  moved = column_axes + tuple(a for a in param_axes if a not in block_axes + column_axes)
  if parameter_space and column_dims and shape[column_dims[0]] % _devices(moved) == 0:
    column_axes = moved
  layout = Layout(block_axes, column_axes)
  return layout.spread(blocks) if distribute else layout


# ------------------------------------------------------------------- compiled collectives


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program (per device).

  Attributes:
    op: ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all`` or
      ``collective-permute``.
    shapes: the shapes of its results (several for a combined collective).
    group: the devices in each of its replica groups (0 where HLO names none).
  """

  op: str
  shapes: tuple[tuple[int, ...], ...]
  group: int


_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) "
                         r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
_GROUPS = re.compile(r"replica_groups=(\S+(?: \{[^}]*\})?)")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _group_size(groups: str | None) -> int:
  """Devices per replica group, from HLO's three spellings of ``replica_groups``."""
  if not groups:
    return 0
  if groups.startswith("{{"):  # explicit: {{0,1},{2,3},...}
    return groups[2:].split("}")[0].count(",") + 1
  if groups.startswith("["):  # iota: [groups,size]<=[...]
    return int(groups[1:].split("]")[0].split(",")[-1])
  sizes = dict(re.findall(r"'([^']+)'=(\d+)", groups))  # mesh['a'=4,'b'=2] {'a'}
  return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", groups.split("{")[-1]))


def collectives(compiled: Any) -> list[Collective]:
  """The collectives of a compiled program (``jax.jit(f).lower(...).compile()``), from its
  optimized HLO; a combined (tuple-shaped) collective lists every shape it moves."""
  found = []
  for line in compiled.as_text().splitlines():
    match = _COLLECTIVE.match(line)
    if match:
      shapes = tuple(tuple(int(n) for n in dims.split(",") if n)
                     for dims in _SHAPE.findall(match.group(1)))
      groups = _GROUPS.search(line)
      found.append(Collective(match.group(2), shapes, _group_size(groups and groups.group(1))))
  return found


__all__ = ["Collective", "Layout", "collectives", "constrain", "dims", "flattened", "is_split",
           "solve_layout", "specs_of", "specs_of_types", "union"]
