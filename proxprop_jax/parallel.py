"""Data-parallel training of NNX models with ProxProp layers on several devices and hosts.

ProxProp's direction depends on the whole batch (its Gram ``AᵀA``), so every device
must solve the system of the *global* batch. Three styles give that:

* ``jit`` + sharding (`make_sharded_step`): the batch is a global array sharded over
  a mesh (`shard_batch`), the parameters are replicated (`replicate`), and the step
  is written for the global batch. The layers take no ``axis_name``; XLA inserts
  the collectives. Works on meshes with Explicit axes (`jax.make_mesh`'s default)
  and Auto axes (``jax.sharding.Mesh``), in one or several processes.
* ``pmap`` (`make_pmap_step`) and ``shard_map`` (`make_shard_map_step`): the step
  sees one device's shard, its loss is the mean over that shard, and it averages
  its gradients with ``lax.pmean(grads, axis_name)``. The ProxProp layers must be
  built with the same ``axis_name``: their backward pass then reduces the Gram and
  ``Aᵀg`` over it, so every device returns the global batch's direction, and the
  ``pmean`` makes the plain layers' gradients global too.

Sharded parameters (FSDP, tensor parallelism): annotate the parameters as flax does
(``nnx.with_partitioning``), build the model under ``jax.set_mesh(mesh)`` (or place it
with `place`), and shard the batch over the data axis only (``shard_batch(..., axes=
"data")``); `make_sharded_step` keeps every variable split as annotated, and each ProxProp
layer solves the columns it holds (`proxprop_jax.sharding`).

Several processes (hosts): call `initialize_distributed` first, then each process
passes *its* slice of every global batch to `shard_batch`.

Example (``jit`` + sharding)::

    mesh = parallel.make_mesh()
    parallel.replicate((model, optimizer), mesh)
    step = parallel.make_sharded_step(train_step, mesh)
    loss = step(model, optimizer, *parallel.shard_batch((x, y), mesh))
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from proxprop_jax import spmd
from proxprop_jax.flax_common import ProxLayer

#: The environment variables `initialize_distributed` reads when an argument is None.
DISTRIBUTED_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


# ----------------------------------------------------------------- processes, meshes


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins a multi-process JAX job (``jax.distributed.initialize``), if asked to.

  Must run before anything touches a device. An argument left None is read from
  its environment variable (`DISTRIBUTED_ENV`: ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). With none of the three given
  anywhere, this does nothing. On CPU the processes talk through gloo
  (``jax_cpu_collectives_implementation``).

  Args:
    coordinator_address: ``"host:port"`` of process 0's coordinator service.
    num_processes: the number of processes in the job.
    process_id: this process's index, in ``[0, num_processes)``.

  Returns:
    Whether the job is now distributed (False: a single process, nothing done).

  Raises:
    ValueError: if only some of the three are given, or they are inconsistent.
  """
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes,
               process_id=process_id)
  for key, env in DISTRIBUTED_ENV.items():
    if given[key] is None and os.environ.get(env, "") != "":
      given[key] = os.environ[env]
  if all(v is None for v in given.values()):
    return False
  missing = [f"{k} (or ${DISTRIBUTED_ENV[k]})" for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"initialize_distributed needs coordinator_address, num_processes and "
                     f"process_id together; missing: {', '.join(missing)}.")
  try:
    count, index = int(given["num_processes"]), int(given["process_id"])
  except ValueError:
    raise ValueError(f"num_processes and process_id must be integers; got "
                     f"{given['num_processes']!r} and {given['process_id']!r}.") from None
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"need num_processes >= 1 and 0 <= process_id < num_processes; got "
                     f"num_processes={count}, process_id={index}.")
  if jax.distributed.is_initialized():
    return True
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=str(given["coordinator_address"]),
                             num_processes=count, process_id=index)
  return True


def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = "data", *,
              axis_type: AxisType = AxisType.Explicit) -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices`` for data parallelism.

  Args:
    devices: the devices, default all of them (of every process).
    axis_name: the mesh axis the batch is split over.
    axis_type: ``AxisType.Explicit`` (`jax.make_mesh`'s default: shardings are part
      of the array types) or ``AxisType.Auto`` (XLA propagates them).
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (axis_name,), axis_types=(axis_type,), devices=devices)


# --------------------------------------------------------------------- placing data


def _batch_axes(mesh, axes=None):
  """The mesh axes the leading (batch) dim is split over: ``axes``, default all of them."""
  names = tuple(mesh.axis_names) if axes is None else (
      (axes,) if isinstance(axes, str) else tuple(axes))
  unknown = [a for a in names if a not in mesh.axis_names]
  if unknown or not names:
    raise ValueError(f"the batch axes must be axes of the mesh {tuple(mesh.axis_names)}; got "
                     f"{axes!r}.")
  return names[0] if len(names) == 1 else names


def shard_batch(batch: Any, mesh: jax.sharding.Mesh, axes=None) -> Any:
  """This process's slice of a global batch -> global arrays sharded over ``mesh``.

  With one process the slice is the whole batch. With several, process ``i``
  passes rows ``[i·n, (i+1)·n)`` of the global batch (``n`` rows each) and gets
  the same global arrays as every other process.

  Args:
    batch: a pytree of arrays (numpy or jax) with a common leading dim, this
      process's rows.
    mesh: the mesh (e.g. from `make_mesh`).
    axes: the mesh axes the leading dim is split over (a name or a tuple), default all
      of them; e.g. ``"data"`` on a ``("data", "model")`` mesh, whose ``model`` axis
      splits the parameters.

  Returns:
    The pytree of global ``jax.Array``s sharded along the leading dim.

  Raises:
    ValueError: if the global batch does not divide evenly over the mesh's
      devices (never a silent drop), or the leaves' leading dims differ.
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("shard_batch got an empty batch.")
  rows = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in rows or len(rows) != 1:
    raise ValueError(f"shard_batch needs arrays with one common leading (batch) dim; got "
                     f"shapes {[np.shape(leaf) for leaf in leaves]}.")
  (local_rows,) = rows
  axes = _batch_axes(mesh, axes)
  processes = jax.process_count()
  devices = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
  global_rows = local_rows * processes
  if global_rows % devices:
    raise ValueError(
        f"the global batch of {global_rows} rows ({processes} process(es) x {local_rows}) "
        f"does not divide evenly over the mesh's {devices} devices; use a batch size that is "
        f"a multiple of {devices}, or drop the last {global_rows % devices} rows yourself.")
  sharding = NamedSharding(mesh, P(axes))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, x, (global_rows, *np.shape(x)[1:])), batch)


def _placed(x, sharding):
  """``x`` (the same global value in every process) as a global array with ``sharding``."""
  if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool, complex)):
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    data = _placed(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places the state of NNX objects replicated on every device of ``mesh``, in place.

  Args:
    tree: an NNX object or a pytree of them, e.g. ``(model, optimizer)``. Every
      process must hold the same values (build them from the same seed).
    mesh: the mesh.

  Returns:
    ``tree`` itself, its state now replicated.
  """
  sharding = NamedSharding(mesh, P())
  state = nnx.state(tree)
  nnx.update(tree, jax.tree.map(lambda x: _placed(x, sharding), state))
  return tree


def place(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places the state of NNX objects on ``mesh`` as their sharding annotations say, in place.

  A variable with sharding metadata (``nnx.with_partitioning``, ``out_sharding=``; the
  optimizer state inherits its parameter's) is split by it (``nnx.get_named_sharding``),
  every other one is replicated: a model built under ``jax.set_mesh(mesh)`` is placed so
  already. Every process must hold the same values (build them from the same seed).

  Returns:
    ``tree`` itself.
  """
  state = nnx.state(tree)
  nnx.update(tree, jax.tree.map(_placed, state, nnx.get_named_sharding(state, mesh)))
  return tree


# ----------------------------------------------------------------- checking layers


def _check_layers(tree, axis_name) -> None:
  """Raises if a ProxProp layer's ``axis_name`` does not fit the step's style.

  Under ``pmap``/``shard_map`` a ProxProp layer without the axis would return its
  shard's direction instead of the global one: a silent wrong result.
  """
  want = spmd.axis_names(axis_name)
  for path, node in nnx.iter_graph(tree):
    if not isinstance(node, ProxLayer):
      continue
    have = spmd.axis_names(node.axis_name)
    # A gradient-mode layer without the axis is a plain layer: the pmean fixes it.
    if have == want or (want and not have and node.mode == "gradient"):
      continue
    where = f"{type(node).__name__} at {'/'.join(map(str, path)) or 'the root'}"
    if not want:
      raise ValueError(
          f"{where} has axis_name={node.axis_name!r}, but a jit + sharding step has no named "
          f"axis: build the model's ProxProp layers with axis_name=None (XLA reduces over the "
          f"sharded batch itself).")
    raise ValueError(
        f"{where} has axis_name={node.axis_name!r}, but the step maps over {axis_name!r}: "
        f"build the model's ProxProp layers with axis_name={axis_name!r}, or each device "
        f"would use the direction of its own shard instead of the global batch's.")


# ------------------------------------------------------------------------ the steps


def make_sharded_step(step_fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """A data-parallel step in the ``jit`` + sharding style (the global view).

  Args:
    step_fn: ``step_fn(model, optimizer, *batch) -> aux``, written for the whole
      (global) batch, as on one device: loss = mean over the batch, ``grads``,
      ``optimizer.update(model, grads)``. No ``pmean``; the model's ProxProp layers
      have ``axis_name=None``.
    mesh: the mesh the batch is sharded over.

  Returns:
    ``step(model, optimizer, *batch) -> aux``, the ``nnx.jit``-compiled step that
    updates ``model`` and ``optimizer`` in place. Pass it the output of
    `shard_batch` and a ``(model, optimizer)`` placed by `replicate` or `place`. The
    step runs under ``jax.set_mesh(mesh)``, and the state it writes back is split as
    its annotations say (replicated where none), as it came in.
  """
  auto = all(t == AxisType.Auto for t in mesh.axis_types)

  @nnx.jit
  def jitted(model, optimizer, *batch):
    aux = step_fn(model, optimizer, *batch)
    if auto:  # Explicit axes keep the shardings in the types; GSPMD must be told
      state = nnx.state((model, optimizer))
      nnx.update((model, optimizer), jax.lax.with_sharding_constraint(
          state, nnx.get_partition_spec(state)))
    return aux

  devices = set(mesh.devices.flat)

  def step(model, optimizer, *batch):
    _check_layers(model, None)
    for leaf in jax.tree.leaves(batch):
      if not isinstance(leaf, jax.Array) or leaf.sharding.device_set != devices:
        raise ValueError(f"make_sharded_step: pass the batch as global arrays over the mesh's "
                         f"{len(devices)} devices (parallel.shard_batch(batch, mesh)); got "
                         f"{type(leaf).__name__} of shape {np.shape(leaf)}"
                         + (f" on {leaf.sharding}." if isinstance(leaf, jax.Array) else "."))
    with jax.set_mesh(mesh):
      return jitted(model, optimizer, *batch)

  return step


def _mean_aux(aux, axis_name):
  """Averages floating ``aux`` leaves over the axis; other leaves keep device 0's value."""
  return jax.tree.map(
      lambda a: lax.pmean(a, axis_name) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
      else a, aux)


def make_shard_map_step(step_fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """A data-parallel step in the ``shard_map`` style, on global arrays.

  ``step_fn`` is the same function as for `make_pmap_step`: it sees one device's
  shard and ``lax.pmean``s its gradients over the mesh axis (for a mesh with
  several axes, their tuple); the model's ProxProp layers have that ``axis_name``.
  The ``shard_map`` runs with ``check_vma=False``, so that gradients mean what
  they mean under ``pmap`` (with ``check_vma=True``, JAX sums the replicated
  parameters' gradients over devices itself: differentiate ``lax.pmean(loss)``
  there instead of ``pmean``-ing the gradients).

  Returns:
    ``step(model, optimizer, *batch) -> aux``, jit-compiled, updating ``model``
    and ``optimizer`` in place; floating ``aux`` leaves are averaged over
    devices. Pass it the output of `shard_batch` and a replicated state.
  """
  axes = _batch_axes(mesh)

  @nnx.jit
  def jitted(model, optimizer, *batch):
    graphdef, state = nnx.split((model, optimizer))

    def per_device(state, *batch):
      model, optimizer = nnx.merge(graphdef, state)
      aux = _mean_aux(step_fn(model, optimizer, *batch), axes)
      return nnx.state((model, optimizer)), aux

    state, aux = jax.shard_map(per_device, mesh=mesh, in_specs=(P(),) + (P(axes),) * len(batch),
                               out_specs=P(), check_vma=False)(state, *batch)
    nnx.update((model, optimizer), state)
    return aux

  def step(model, optimizer, *batch):
    _check_layers(model, axes)
    return jitted(model, optimizer, *batch)

  return step


def make_pmap_step(step_fn: Callable, axis_name: str = "data",
                   devices: Sequence[jax.Device] | None = None) -> Callable:
  """A data-parallel step in the ``pmap`` style.

  Args:
    step_fn: ``step_fn(model, optimizer, *batch) -> aux`` for one device's shard:
      loss = mean over the shard, ``grads = lax.pmean(grads, axis_name)``, then
      ``optimizer.update(model, grads)``. The model's ProxProp layers must be
      built with ``axis_name=axis_name``.
    axis_name: the ``pmap`` axis.
    devices: the devices to map over, default all local devices.

  Returns:
    ``step(model, optimizer, *batch) -> aux``. ``batch`` holds this process's
    rows of the global batch (all of it with one process), split evenly over the
    devices. ``model`` and ``optimizer`` are updated in place; their state stays
    replicated on the devices between steps. Floating ``aux`` leaves are averaged
    over devices, others are device 0's.
  """

  def per_device(graphdef, state, *batch):
    model, optimizer = nnx.merge(graphdef, state)
    aux = _mean_aux(step_fn(model, optimizer, *batch), axis_name)
    return nnx.state((model, optimizer)), aux

  # The state goes in and comes out unmapped (replicated), so it stays on the devices.
  mapped = {}  # one pmap per number of batch arguments (in_axes lists each)

  def step(model, optimizer, *batch):
    _check_layers(model, axis_name)
    count = jax.local_device_count() if devices is None else len(devices)

    def split(x):
      x = x if isinstance(x, jax.Array) else np.asarray(x)
      if x.ndim == 0 or x.shape[0] % count:
        rows = f"{x.shape[0]} rows" if x.ndim else "a scalar"
        raise ValueError(f"make_pmap_step: a batch argument with {rows} does not divide evenly "
                         f"over {count} devices; use a batch size that is a multiple of "
                         f"{count}, or drop the remainder yourself.")
      return x.reshape(count, x.shape[0] // count, *x.shape[1:])

    if not batch:
      raise ValueError("make_pmap_step: the step needs a batch to split over the devices.")
    batch = jax.tree.map(split, batch)
    graphdef, state = nnx.split((model, optimizer))
    if len(batch) not in mapped:
      mapped[len(batch)] = jax.pmap(
          per_device, axis_name, in_axes=(None, None, *(0,) * len(batch)), out_axes=None,
          static_broadcasted_argnums=(0,), devices=None if devices is None else list(devices))
    state, aux = mapped[len(batch)](graphdef, state, *batch)
    nnx.update((model, optimizer), state)
    return aux

  return step


__all__ = ["DISTRIBUTED_ENV", "initialize_distributed", "make_mesh", "make_pmap_step",
           "make_shard_map_step", "make_sharded_step", "place", "replicate", "shard_batch"]
