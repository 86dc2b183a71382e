"""ProxProp for any Flax NNX model: `convert` in place, `set_tau` while training.

`convert` walks the model's graph — attributes, ``nnx.List``/``nnx.Dict``,
``nnx.Sequential``, ``nnx.MultiHeadAttention``, plain lists/tuples/dicts held as
``nnx.data`` — and replaces every flax layer that has a ProxProp counterpart by
that counterpart, holding the very same ``nnx.Param`` variables (same arrays:
checkpoints still load, the forward pass is unchanged) and all other state.

Counterparts are found, not listed: the counterpart of a flax class is the
`ProxLayer` subclass defined at the top level of a ``proxprop_jax`` module that
directly subclasses it (``pp.Linear`` for ``nnx.Linear``, …). A counterpart may
define ``check_convertible(self)``, raising ``ValueError`` for flax options it
does not implement; `convert` then keeps that layer and says why in the `Report`.

A converted layer is a new object of the counterpart class (Python cannot switch
an NNX layer's class in place) put wherever the old one was referenced; the model
and its containers are changed in place. A module reachable by two paths (shared)
is converted once and stays shared.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from proxprop_jax import flax_common, ops
from proxprop_jax import nnx as pp_nnx
from proxprop_jax.flax_common import ProxLayer
from proxprop_jax.modes import check_tau

#: The flax layers `convert` reports even while they have no counterpart.
FLAX_LAYERS = tuple(getattr(nnx, name) for name in (
    "Linear", "Conv", "LinearGeneral", "Einsum", "Embed", "LayerNorm", "RMSNorm", "BatchNorm",
    "GroupNorm"))

#: ``include``/``exclude``: path patterns, or a predicate ``(path, module) -> bool``.
Selector = Sequence[str] | str | Callable[[str, Any], bool] | None


# ---------------------------------------------------------------------------- counterparts


def _subclasses(cls):
  for sub in cls.__subclasses__():
    yield sub
    yield from _subclasses(sub)


def counterparts() -> dict[type, type]:
  """``{flax NNX class: its ProxProp counterpart}`` for every counterpart defined so far."""
  found = {}
  for cls in _subclasses(ProxLayer):
    module = sys.modules.get(cls.__module__)
    if not (cls.__module__.startswith("proxprop_jax") and getattr(module, cls.__name__, None) is cls):
      continue  # generated (pp.prox_module) or user classes are not counterparts
    for base in cls.__bases__:
      if issubclass(base, nnx.Module) and not issubclass(base, ProxLayer):
        found[base] = cls
  return found


def flax_base(cls: type) -> type:
  """The plain flax class a ProxProp NNX class mirrors (its first non-ProxProp base)."""
  return next(b for b in cls.__mro__[1:]
              if issubclass(b, nnx.Module) and not issubclass(b, ProxLayer))


def class_name(cls: type) -> str:
  """``nnx.Linear``, ``pp.Linear`` or the class's own name."""
  if getattr(nnx, cls.__name__, None) is cls:
    return f"nnx.{cls.__name__}"
  if cls.__module__.startswith("proxprop_jax"):
    return f"pp.{cls.__name__}"
  return cls.__qualname__


# ------------------------------------------------------------------------------ the graph


@dataclasses.dataclass
class Node:
  """A module of the graph: every path that reaches it and every reference to it."""

  module: Any
  refs: list = dataclasses.field(default_factory=list)  # (parent object, jax key path)
  paths: list = dataclasses.field(default_factory=list)  # '/'-joined


def _key(key) -> str:
  return str(jax.tree_util.keystr((key,), simple=True, separator="/"))


def _children(node):
  """``(key path, child)`` of every graph node or variable ``node`` holds directly,
  through plain lists/tuples/dicts too; a node held twice is listed twice."""
  stop = lambda x: x is not node and isinstance(x, (nnx.Pytree, nnx.Variable))
  leaves = jax.tree_util.tree_flatten_with_path(node, is_leaf=stop)[0]
  if len(leaves) == 1 and leaves[0][1] is node:  # not a JAX pytree (pytree=False)
    return [((jax.tree_util.GetAttrKey(k) if isinstance(k, str) else jax.tree_util.SequenceKey(k),),
             child) for k, child in nnx.iter_children(node)]
  return [(keys, leaf) for keys, leaf in leaves if stop(leaf)]


def walk(model) -> tuple[list[Node], dict[int, list[str]]]:
  """The modules below ``model`` in first-visit order (each with all its paths), and
  ``{id(param): [paths of the modules holding it]}`` (two or more: a tied parameter)."""
  nodes: dict[int, Node] = {}
  owners: dict[int, list[int]] = {}

  def visit(parent):
    for keys, child in _children(parent):
      if isinstance(child, nnx.Param):
        owners.setdefault(id(child), []).append(id(parent))
      elif not isinstance(child, nnx.Variable) and child is not model:
        first = id(child) not in nodes
        node = nodes.setdefault(id(child), Node(child))
        node.refs.append((parent, keys))
        if first:
          visit(child)

  visit(model)
  done: dict[int, list[str]] = {id(model): [""]}

  def paths(node_id) -> list[str]:
    if node_id not in done:
      done[node_id] = []  # a cycle back to this node adds no path
      done[node_id] = [f"{p}/{sub}" if p else sub
                       for parent, keys in nodes[node_id].refs
                       for sub in ["/".join(_key(k) for k in keys)]
                       for p in paths(id(parent))]
    return done[node_id]

  for node_id, node in nodes.items():
    node.paths = paths(node_id)
  params = {k: [p for o in v for p in paths(o)] for k, v in owners.items()}
  return list(nodes.values()), params


def _set(container, keys, value):
  """``container`` with the item at ``keys`` set to ``value`` (tuples are rebuilt)."""
  key, rest = keys[0], keys[1:]
  if isinstance(key, jax.tree_util.GetAttrKey):
    if rest:
      value = _set(getattr(container, key.name), rest, value)
    setattr(container, key.name, value)
    return container
  index = key.idx if isinstance(key, jax.tree_util.SequenceKey) else key.key
  if rest:
    value = _set(container[index], rest, value)
  if isinstance(container, tuple):
    items = list(container)
    items[index] = value
    return type(container)(items)
  container[index] = value
  return container


def _patterns(selector) -> tuple[str, ...]:
  return (selector,) if isinstance(selector, str) else tuple(selector)


def _matches(selector, paths, module) -> bool:
  """A pattern matches a path or any of its prefixes (a container's path)."""
  if callable(selector):
    return any(bool(selector(path, module)) for path in paths)
  prefixes = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 2)}
  return any(fnmatch.fnmatchcase(prefix, pattern)
             for pattern in _patterns(selector) for prefix in prefixes)


def selected(include: Selector, exclude: Selector, paths, module) -> bool:
  """Whether a module at ``paths`` passes ``include`` (None: all) and ``exclude`` (None: none)."""
  return ((include is None or _matches(include, paths, module))
          and not (exclude is not None and _matches(exclude, paths, module)))


def check_selector(name: str, selector) -> None:
  if selector is None or callable(selector):
    return
  if isinstance(selector, str) or (isinstance(selector, (list, tuple))
                                   and all(isinstance(p, str) for p in selector)):
    return
  raise ValueError(f"{name} must be None, a path pattern, a sequence of path patterns (fnmatch "
                   f"on the '/'-joined path, e.g. ('head', 'blocks/*/mlp')) or a predicate "
                   f"(path, module) -> bool; got {selector!r}.")


# ---------------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class Row:
  """One candidate layer of a `Report`."""

  path: str
  layer: str  # the flax class, e.g. "nnx.Linear"
  params: int
  status: str  # "converted", "skipped" or "ProxProp" (was one already)
  note: str = ""  # why skipped; shared or tied
  mode: str | None = None
  tau_prox: float | None = None


_COLUMNS = ("path", "layer", "params", "status", "mode", "τ", "note")


@dataclasses.dataclass(frozen=True)
class Report:
  """What `convert` did, one `Row` per candidate layer (a flax layer, or a module that
  holds ``nnx.Param``\\ s directly). ``print(report)`` shows a table."""

  rows: tuple[Row, ...]

  @property
  def converted(self) -> tuple[Row, ...]:
    return tuple(r for r in self.rows if r.status == "converted")

  def summary(self) -> str:
    prox = [r for r in self.rows if r.status != "skipped"]
    total = sum(r.params for r in self.rows)
    return (f"ProxProp layers: {len(prox)} of {len(self.rows)} "
            f"({sum(r.params for r in prox):,} of {total:,} parameters); "
            f"converted now: {len(self.converted)}")

  def _cells(self):
    for r in self.rows:
      tau = "" if r.tau_prox is None else f"{r.tau_prox:g}"
      note = r.note.split(". ")[0]  # the first sentence of a long reason
      yield (r.path, r.layer, f"{r.params:,}", r.status, r.mode or "", tau, note)

  def __str__(self) -> str:
    rows = [_COLUMNS, *self._cells()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([line(rows[0]), line(["-" * w for w in widths]),
                      *map(line, rows[1:]), self.summary()])

  def to_markdown(self) -> str:
    line = lambda row: "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
    return "\n".join([line(_COLUMNS), "|" + "---|" * len(_COLUMNS),
                      *map(line, self._cells()), "", self.summary()])


# --------------------------------------------------------------------------------- convert


def _param_count(module) -> int:
  return sum(v.get_value().size for v in vars(module).values() if isinstance(v, nnx.Param))


def _owns_params(module) -> bool:
  return any(isinstance(v, nnx.Param) for v in vars(module).values())


def _counterpart_of(module, table) -> tuple[type | None, str]:
  """The counterpart to convert ``module`` to, or None and why not."""
  cls = type(module)
  if cls in table:
    return table[cls], ""
  base = next((b for b in cls.__mro__[1:] if b in table), None)
  if base is not None:
    return None, (f"{class_name(cls)} subclasses {class_name(base)}; converting would drop its "
                  f"own code")
  return None, "no ProxProp counterpart: plain gradient"


def _new_layer(module, counterpart, settings):
  """A ``counterpart`` object holding ``module``'s attributes (the same variables)."""
  layer = object.__new__(counterpart)
  for name, value in vars(module).items():
    object.__setattr__(layer, name, value)
  if "axis_name" in vars(module):
    # A flax norm layer's axis_name is its statistics' axis; in a ProxProp layer
    # axis_name is the batch axis of the solve, and the statistics' is stats_axis_name.
    object.__setattr__(layer, "stats_axis_name", module.axis_name)
  pp_nnx.init_prox(layer, settings.mode, settings.tau_prox, settings.axis_name,
                   settings.solve_precision, settings.distribute_solves)
  check = getattr(layer, "check_convertible", None)
  if check is not None:
    check()
  return layer


def _sharing_note(node: Node, params) -> str:
  notes = []
  if len(node.paths) > 1:
    notes.append("shared: also at " + ", ".join(node.paths[1:]))
  tied = sorted({p for v in vars(node.module).values() if isinstance(v, nnx.Param)
                 for p in params.get(id(v), ()) if p not in node.paths})
  if tied:
    notes.append("tied parameter with " + ", ".join(tied))
  return "; ".join(notes)


def convert(model, *, mode, tau_prox, axis_name=None, include: Selector = None,
            exclude: Selector = None, solve_precision=ops.SOLVE_PRECISION,
            distribute_solves: bool = False) -> Report:
  """Converts an NNX model's flax layers to their ProxProp counterparts, in place.

  Args:
    model: an ``nnx.Module`` (its layers are converted, not the model object itself).
    mode, tau_prox, axis_name, solve_precision, distribute_solves: the settings of every
      converted layer (as ``pp.Linear``'s).
    include: convert only layers whose path (``'/'``-joined, e.g. ``'blocks/0/mlp/layers/0'``)
      or a container's path matches one of these ``fnmatch`` patterns; or a predicate
      ``(path, module) -> bool``. None: every layer.
    exclude: keep layers that match (same forms), e.g. ``exclude=("head",)``.

  Returns:
    A `Report`: one row per candidate layer (path, flax class, parameter count,
    converted or skipped and why, mode, τ); layers that were ProxProp already are
    left as they are. A shared module (two paths) is converted once and its row
    names the other paths; a layer holding an ``nnx.Param`` that another layer
    holds too is flagged as tied (calling both in one step raises, see
    `proxprop_jax.reuse`).
  """
  settings = flax_common.prox_settings(mode, tau_prox, axis_name, solve_precision,
                                       distribute_solves)
  check_selector("include", include)
  check_selector("exclude", exclude)
  table = counterparts()
  if type(model) in table:
    raise ValueError(
        f"pp.convert converts the layers inside a model; got a bare {class_name(type(model))}. "
        f"Build {class_name(table[type(model)])}(...) instead, or put the layer in a module "
        f"(e.g. nnx.Sequential(layer)).")
  nodes, params = walk(model)
  if _owns_params(model):  # the model's own parameters keep their plain gradient
    nodes.insert(0, Node(model, paths=[""]))
  rows = []
  for node in nodes:
    module = node.module
    if not isinstance(module, nnx.Module) or not (
        _owns_params(module) or isinstance(module, (ProxLayer, *FLAX_LAYERS))
        or type(module) in table):
      continue
    note, path = _sharing_note(node, params), node.paths[0] or "(model)"
    row = dict(path=path, layer=class_name(type(module)), params=_param_count(module))
    if isinstance(module, ProxLayer):
      row.update(layer=class_name(flax_base(type(module))), status="ProxProp", mode=module.mode,
                 tau_prox=float(module.tau_prox.get_value()))
    elif module is model:
      row.update(status="skipped", note="the model's own parameters: plain gradient")
    elif not selected(include, exclude, node.paths, module):
      row.update(status="skipped", note="excluded" if include is None else "not included")
    else:
      counterpart, why = _counterpart_of(module, table)
      layer = None
      if counterpart is not None:
        try:
          layer = _new_layer(module, counterpart, settings)
        except ValueError as error:
          why = str(error)
      if layer is None:
        row.update(status="skipped", note=why)
      else:
        for parent, keys in node.refs:
          _set(parent, keys, layer)
        row.update(status="converted", mode=settings.mode, tau_prox=settings.tau_prox)
    row["note"] = "; ".join(n for n in (row.get("note", ""), note) if n)
    rows.append(Row(**row))
  return Report(tuple(rows))


# --------------------------------------------------------------------------------- set_tau


def prox_layers(model, include: Selector = None, exclude: Selector = None) -> dict[str, Any]:
  """``{path: layer}`` of the ProxProp NNX layers below ``model`` (first path of each)."""
  check_selector("include", include)
  check_selector("exclude", exclude)
  nodes = walk(model)[0]
  if isinstance(model, ProxLayer):
    nodes.insert(0, Node(model, paths=[""]))
  return {n.paths[0]: n.module for n in nodes
          if isinstance(n.module, ProxLayer) and selected(include, exclude, n.paths, n.module)}


def set_tau(model, tau_prox, include: Selector = None, exclude: Selector = None) -> list[str]:
  """Sets ``τ`` of the model's ProxProp layers (those passing ``include``/``exclude``).

  The new value keeps each `TauProx` variable's dtype, shape and weak type, so a
  jitted step (``nnx.jit``) does not retrace. ``tau_prox`` is a number or a scalar
  array: e.g. ``pp.set_tau(model, schedule(step))`` with an optax schedule between
  steps; inside a jitted step a traced value is written as it is (unchecked).

  Returns:
    The paths of the layers set.

  Raises:
    ValueError: for ``τ`` ≤ 0, nan or inf, or when no ProxProp layer matches.
  """
  if isinstance(tau_prox, jax.core.Tracer):
    if jnp.shape(tau_prox) != ():
      raise ValueError(f"tau_prox must be a scalar; got shape {jnp.shape(tau_prox)}.")
  else:
    tau_prox = check_tau(tau_prox)
  layers = prox_layers(model, include, exclude)
  if not layers:
    found = list(prox_layers(model))
    raise ValueError(f"pp.set_tau: no ProxProp layer matches include={include!r}, "
                     f"exclude={exclude!r}; the model's ProxProp layers are at {found} "
                     f"(convert a model with pp.convert first).")
  for layer in layers.values():
    pp_nnx.set_tau_value(layer, tau_prox)
  return list(layers)


__all__ = ["FLAX_LAYERS", "Report", "Row", "convert", "counterparts", "flax_base", "prox_layers",
           "selected", "set_tau", "walk"]
