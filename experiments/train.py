"""Training loop of the paper's experiments: one jitted step, per-epoch metrics, checkpoints.

``run(config)`` trains one model as a `RunConfig` says and writes, in ``config.out``:

- ``config.json``: the run's settings and the versions of the software that ran it;
- ``metrics.jsonl``: one JSON object per epoch (epoch, minibatch_avg_loss: the mean of the
  epoch's mini-batch losses, full_batch_loss, full_batch_acc, val_loss, val_acc, epoch_time_s);
- ``summary.json``, once finished: test_loss, test_acc, train_time_s, steps_per_s, device,
  epochs, diverged (and diverged_epoch when it did);
  with ``--diagnostics`` each line also has ``diagnostics``: `diagnose`'s numbers per layer;
- ``checkpoints/``: orbax checkpoints of model, optimizer and metrics so far, after every epoch
  (the last ``keep_checkpoints`` are kept).

Epoch times count training steps only: evaluation and checkpointing are excluded, and the step
is compiled before the first epoch's clock starts. A run whose loss or parameters become
non-finite stops in that epoch (nothing of it is saved) and records that it diverged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import proxprop_jax as pp

from experiments import compile_cache
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models
from experiments import optimizers
from experiments import records

EVAL_BATCH = 1000


class RunDirError(Exception):
  """``--out`` holds something this run may not continue or overwrite."""


def batch_loss(model, images, labels):
  """The training loss: mean cross-entropy of the mini-batch."""
  return models.cross_entropy(model(images), labels)


def make_train_step(axis_name: str | None = None):
  """One optimizer step on a mini-batch; the same function for every mode and optimizer.

  Args:
    axis_name: under ``pmap``, the axis to average gradients over (the ProxProp layers already
      return the global batch's direction; the mean makes the plain final layer's gradient
      global too).
  """

  def train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(batch_loss)(model, images, labels)
    if axis_name is not None:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)
    optimizer.update(model, grads)
    return loss

  return train_step


# Module-level jitted functions: a second run of the same model in this process (a resumed run,
# a test) reuses their compiled code.
train_step = nnx.jit(make_train_step())


@nnx.jit
def eval_batch(model, images, labels, weights):
  """Summed loss and number of correct predictions over the examples with weight 1."""
  logits = model(images).astype(jnp.float32)
  losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(correct * weights)


@nnx.jit
def params_are_finite(model):
  """True when no parameter of ``model`` holds a NaN or an infinity."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in leaves]))


class Devices:
  """How batches reach the step: one device, ``pmap`` or a sharded ``jit`` over a mesh.

  With several processes every process holds the whole dataset, takes its slice of each global
  batch, and the parallel module assembles the global batch. With a ``mesh`` (``--mesh``) the
  parameters are split as the models' annotations say (`models.sharding_rules`) and the batch
  over the mesh's ``data`` and ``fsdp`` axes.
  """

  def __init__(self, kind: str, mesh: str | None = None):
    if kind == "auto":
      kind = "sharded" if jax.device_count() > 1 or mesh else "none"
    self.kind, self.spec = kind, mesh
    self.count = 1 if kind == "none" else jax.device_count()
    self.axis_name = "data" if kind == "pmap" else None
    self.parallel = self.mesh = self.rules = self.batch_axes = None
    if kind != "none":
      from proxprop_jax import parallel  # pylint: disable=import-outside-toplevel
      self.parallel = parallel
      self.mesh = parallel.make_mesh(axis_name="data") if kind == "sharded" else None
    if mesh is not None:
      axes = dict(config_lib.parse_mesh(mesh))
      self.batch_axes = tuple(a for a in axes if a in ("data", "fsdp"))
      if np.prod(list(axes.values())) != jax.device_count() or not self.batch_axes:
        raise config_lib.ConfigError(
            f"--mesh {mesh} must span all {jax.device_count()} devices and have a data or "
            f"fsdp axis to split the batch over (e.g. data={jax.device_count() // 2},model=2)")
      self.mesh = jax.make_mesh(tuple(axes.values()), tuple(axes),
                                axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
      self.count = int(np.prod([axes[a] for a in self.batch_axes]))
      self.rules = models.sharding_rules(tuple(axes))

  def context(self):
    """Where the model is built: on the mesh when its parameters are split (flax splits
    annotated parameters as it creates them)."""
    return jax.set_mesh(self.mesh) if self.rules is not None else contextlib.nullcontext()

  def feed(self, arrays):
    """Host arrays of a global batch -> the train step's batch arguments."""
    if self.kind == "none":
      return arrays
    # This process's contiguous slice of the global batch (all of it with one process).
    n, p, i = len(arrays[0]), jax.process_count(), jax.process_index()
    local = tuple(a[i * n // p:(i + 1) * n // p] for a in arrays)
    if self.kind == "sharded":
      return tuple(self.parallel.shard_batch(local, self.mesh, self.batch_axes))
    return local  # pmap splits it over this process's devices

  def feed_eval(self, arrays):
    """Host arrays of a global batch -> arguments of the (plain ``jit``) evaluation."""
    # Sharded: the global view, as in the step. Otherwise every process evaluates the whole
    # batch itself with its (identical) model.
    return self.feed(arrays) if self.kind == "sharded" else arrays

  def place(self, model, optimizer):
    """Puts the state where the step reads it: replicated over the mesh (sharded), or
    committed to the one device as a restored checkpoint is, so that a fresh run and its
    resumption compile the same programs (a compile-cache hit)."""
    if self.rules is not None:
      self.parallel.place((model, optimizer), self.mesh)
    elif self.kind == "sharded":
      self.parallel.replicate((model, optimizer), self.mesh)
    elif self.kind == "none":
      state = nnx.state((model, optimizer))
      nnx.update((model, optimizer), jax.device_put(state, jax.devices()[0]))

  def train_step(self):
    """The training step for these devices (compiled on its first call)."""
    if self.kind == "sharded":
      return self.parallel.make_sharded_step(make_train_step(), self.mesh)
    if self.kind == "pmap":
      return self.parallel.make_pmap_step(make_train_step(self.axis_name),
                                          axis_name=self.axis_name)
    return train_step

  def describe(self) -> str:
    d = jax.devices()[0]
    mesh = "" if self.spec is None else f", mesh {self.spec}"
    return f"{jax.device_count()} x {d.device_kind} ({d.platform}), parallel={self.kind}{mesh}"


def evaluate(model, images, labels, devices: Devices, chunk: int | None = None
             ) -> tuple[float, float]:
  """Full-batch mean loss and accuracy, in padded chunks of one size (one compiled shape).

  The model is evaluated in eval mode (BatchNorm's running averages, not updated) and left in
  train mode. ``chunk``: examples per call (rounded up to a multiple of the device count);
  None: ``min(EVAL_BATCH, len(labels))``.
  """
  model.eval()
  try:
    return _evaluate(model, images, labels, devices, chunk or min(EVAL_BATCH, len(labels)))
  finally:
    model.train()


def eval_chunk(splits) -> int:
  """The chunk size for every split of a run: one compiled shape, no more padding than the
  largest split needs (digits' 250 examples are not padded to `EVAL_BATCH`)."""
  return min(EVAL_BATCH, max(len(labels) for _, labels in splits.values()))


def _evaluate(model, images, labels, devices: Devices, chunk: int) -> tuple[float, float]:
  size = -(-chunk // devices.count) * devices.count
  loss_sum = correct = 0.0
  for start in range(0, len(labels), size):
    x, y = images[start:start + size], labels[start:start + size]
    pad = size - len(y)
    weights = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    l, c = eval_batch(model, *devices.feed_eval((x, y, weights)))
    loss_sum, correct = loss_sum + float(l), correct + float(c)
  return loss_sum / len(labels), correct / len(labels)


def checkpoint_manager(out: str, keep: int = 2) -> ocp.CheckpointManager:
  """The run's checkpoints: the latest ``keep`` are kept."""
  # Synchronous saves: an epoch's checkpoint is complete on disk before the next epoch starts,
  # and orbax writes each one to a temporary folder first, so a kill never leaves a broken one.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(out, records.CHECKPOINTS)),
                               options=options)


def _restore(manager, model, optimizer) -> dict:
  """Restores the latest checkpoint into (model, optimizer); returns its metadata."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state((model, optimizer)))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  nnx.update((model, optimizer), restored["state"])
  return restored["meta"]


def build(config, input_shape, axis_name: str | None = None, sharding_rules=None):
  """The run's model and optimizer, freshly initialized from ``config.seed``.

  Args:
    config: a `RunConfig`, or a run's ``config.json`` as a dict.
    input_shape: one example's shape.
    axis_name: the ``pmap`` axis of the ProxProp layers.
    sharding_rules: `models.sharding_rules` of the mesh the parameters are split over (build
      under ``Devices.context``), or None.
  """
  if isinstance(config, dict):
    config = config_lib.RunConfig(**{k: v for k, v in config.items()
                                     if k in config_lib.FIELDS})
  model = models.build(config.model, mode=config.mode, input_shape=input_shape,
                       tau_prox=config.tau_prox, axis_name=axis_name, seed=config.seed,
                       plain_head=config.plain_head, sharding_rules=sharding_rules)
  # Training mode with its flags set explicitly (e.g. attention's `deterministic`, None until
  # now): `evaluate` toggles eval()/train() after each epoch, and would otherwise leave a model
  # whose graph differs from the compiled step's, recompiling it inside epoch 2.
  model.train()
  tx = optimizers.make(config.optimizer, config.lr, momentum=config.momentum,
                       weight_decay=config.weight_decay)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def load_model(run_dir: str, input_shape) -> tuple[nnx.Module, dict]:
  """The model of a run's latest checkpoint, and that checkpoint's metadata (epoch, metrics).

  Args:
    run_dir: a run's ``--out`` folder.
    input_shape: one example's shape, e.g. ``(height, width, channels)``.
  """
  model, optimizer = build(records.read_json(os.path.join(run_dir, records.CONFIG)), input_shape)
  with checkpoint_manager(run_dir) as manager:
    meta = _restore(manager, model, optimizer)
  return model, meta


# ------------------------------------------------------------------------ the run, step by step


def saved_epochs(epochs: int) -> str:
  """``"epoch 1 is saved"``, ``"epochs 1-3 are saved"`` (``epochs`` ≥ 1)."""
  return "epoch 1 is saved" if epochs == 1 else f"epochs 1-{epochs} are saved"


def _listing(names, shown: int = 3) -> str:
  """``"a, b, c and 2 more"``: the first ``shown`` names."""
  more = f" and {len(names) - shown} more" if len(names) > shown else ""
  return ", ".join(names[:shown]) + more


def _refusal(out: str, state: records.RunState) -> str:
  """Why a run without ``--resume`` may not use ``out``, which holds a run, and what to do."""
  if state.status == "diverged":
    return (f"{out} already holds a run that diverged in epoch "
            f"{state.summary['diverged_epoch']}: choose another --out (resuming would repeat it)")
  if state.status == "finished":
    n = state.summary["epochs"]
    return (f"{out} already holds a finished run ({n} epoch{'s' if n != 1 else ''}): pass "
            f"--resume with --epochs above {n} to train it longer, or choose another --out")
  saved = saved_epochs(state.epochs) if state.epochs else "interrupted before its first epoch"
  return (f"{out} already holds an unfinished run ({saved}): pass --resume to continue it, or "
          f"choose another --out")


def check_run_dir(config) -> records.RunState:
  """Refuses an ``--out`` this run may not use, before anything slow happens.

  Without ``--resume`` the folder must not exist or be empty. ``--resume`` needs a run there
  (its ``config.json``, the first file a run writes: a run interrupted before its first epoch
  starts over) with the same settings (`RESUME_KEYS`; ``epochs`` may grow).

  Raises:
    RunDirError: saying what is there and what to do.
  """
  out, state = config.out, records.run_state(config.out)
  names = sorted(os.listdir(out)) if os.path.isdir(out) else []
  if state.status == "new" and config.resume:
    if names:
      raise RunDirError(f"--resume: {out} holds no run, only other files "
                        f"({_listing(names)}): choose another --out")
    where = "is empty" if os.path.isdir(out) else "does not exist"
    raise RunDirError(f"--resume: no run was started in {out} (it {where}): leave out "
                      f"--resume to start one")
  if not config.resume:
    if state.status != "new":
      raise RunDirError(_refusal(out, state))
    if names:
      raise RunDirError(f"{out} already holds files that are not a run "
                        f"({_listing(names)}): choose another --out")
    return state
  if state.config is not None:
    # A setting missing from an older config.json had its default then.
    saved = {**config_lib.DEFAULTS, **state.config}
    changed = records.settings_differ(saved, config, config_lib.RESUME_KEYS)
    if changed:
      raise RunDirError(f"--resume with other settings than the run in {out} "
                        f"(setting: (run, now)): {changed}")
  return state


def is_done(config, state: records.RunState) -> bool:
  """Whether the run in ``config.out`` has nothing left to do (finished or diverged)."""
  return state.status == "diverged" or (state.status == "finished"
                                        and state.summary["epochs"] >= config.epochs)


def load_data(config) -> dict:
  """The run's splits; ``train`` cut to ``config.train_samples`` when given."""
  splits = data_lib.load(config.dataset, data_dir=config.data_dir, seed=config.seed)
  if config.train_samples is not None:
    splits["train"] = tuple(a[:config.train_samples] for a in splits["train"])
  return splits


def describe(config, splits, devices: Devices) -> str:
  """The first line a run prints: what trains, on what, with what data, into which folder."""
  tau = "" if config.mode == "backprop" else f", tau {config.tau_prox:g}"
  sizes = " / ".join(f"{len(splits[s][1])} {s}" for s in ("train", "val", "test"))
  cache = ("no compile cache" if config.compile_cache is None else
           f"compile cache {os.path.abspath(os.path.expanduser(config.compile_cache))}")
  return (f"{config.model} {config.mode}{tau}, {config.optimizer} lr {config.lr:g} | "
          f"{config.dataset}: {sizes} | {devices.describe()} | {config.out} | {cache}")


def start_run_dir(config, log=print) -> None:
  """Writes ``config.json`` first (from then on the folder holds a run that ``--resume``
  continues) and removes checkpoints whose save was interrupted.

  orbax saves a checkpoint into a temporary folder (``N.orbax-checkpoint-tmp``) and renames it
  once complete; after a kill in between, that folder is left, and orbax would remove it with
  a warning of its own when it saves epoch N again.
  """
  os.makedirs(config.out, exist_ok=True)
  records.write_config(config.out, config)
  folder = os.path.join(config.out, records.CHECKPOINTS)
  unfinished = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                      if ocp.utils.is_tmp_checkpoint(os.path.join(folder, n)))
  for name in unfinished:
    shutil.rmtree(os.path.join(folder, name))
  if unfinished:
    log(f"removed the unfinished checkpoint of an interrupted save: "
        f"{', '.join(os.path.join(records.CHECKPOINTS, n) for n in unfinished)}")


def restore_or_start(manager, model, optimizer, config, is_writer: bool) -> list[dict]:
  """Restores the latest checkpoint (if any) and rewrites the run's metrics to match it.

  Returns:
    the metrics of the epochs done so far.
  """
  metrics = []
  if manager.latest_step() is not None:
    metrics = _restore(manager, model, optimizer)["metrics"]
  if is_writer:
    # From the checkpoint: drops an epoch logged after the last checkpoint, if any.
    records.write_jsonl(os.path.join(config.out, records.METRICS), metrics)
    if os.path.exists(os.path.join(config.out, records.SUMMARY)):
      # Extended: it is unfinished until the new last epoch.
      os.remove(os.path.join(config.out, records.SUMMARY))
  return metrics


def compile_step(devices: Devices, model, optimizer, batch_sizes, train_x, train_y,
                 log=print):
  """The step for these devices, compiled for every batch size of an epoch.

  Compiles on throwaway copies of the model and optimizer, so epoch times exclude it.
  """
  step = devices.train_step()
  log("compiling…", end=" ", flush=True)
  start = time.perf_counter()
  for n in sorted(set(batch_sizes)):
    batch = devices.feed((train_x[:n], train_y[:n]))
    jax.block_until_ready(step(*nnx.clone((model, optimizer)), *batch))
  log(f"{time.perf_counter() - start:.1f} s")
  return step


def train_epoch(step, model, optimizer, config, epoch: int, train_x, train_y,
                devices: Devices, show_bar: bool) -> tuple[float, float, int]:
  """One epoch of steps in the order of ``(seed, epoch)``.

  Returns:
    ``(mean mini-batch loss, seconds of training steps, number of steps)``.
  """
  order = data_lib.epoch_order(config.seed, epoch, len(train_y))
  batches = data_lib.batches(order, min(config.batch_size, len(train_y)), devices.count)
  losses = []
  with tqdm(total=len(batches), desc=f"epoch {epoch}/{config.epochs}", unit="step",
            leave=False, disable=not show_bar) as bar:
    start = time.perf_counter()
    for idx in batches:
      losses.append(step(model, optimizer, *devices.feed((train_x[idx], train_y[idx]))))
      if show_bar:  # reading the loss waits for the step; only worth it when someone watches
        bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
      bar.update()
    jax.block_until_ready(losses)
    seconds = time.perf_counter() - start
  return float(np.mean(jax.device_get(losses))), seconds, len(batches)


def evaluate_epoch(model, epoch: int, minibatch_loss: float, seconds: float, splits,
                   devices: Devices) -> dict:
  """The epoch's metrics line: full-batch training and validation loss and accuracy."""
  chunk = eval_chunk(splits)
  train_loss, train_acc = evaluate(model, *splits["train"], devices, chunk)
  val_loss, val_acc = evaluate(model, *splits["val"], devices, chunk)
  return dict(epoch=epoch, minibatch_avg_loss=minibatch_loss, full_batch_loss=train_loss,
              full_batch_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
              epoch_time_s=seconds)


def diagnose(model, config, train_x, train_y, devices: Devices) -> dict:
  """``pp.diagnostics`` of the training loss on the first mini-batch of the training set.

  Every epoch sees the same examples, so changes over epochs come from the model alone. The
  model is in training mode, as in the step (BatchNorm uses the batch's statistics) and is
  left unchanged.
  """
  n = min(config.batch_size, len(train_y))
  return pp.diagnostics(model, batch_loss, *devices.feed((train_x[:n], train_y[:n])))


def is_finite(row: dict, model) -> bool:
  """Whether the epoch's losses and the model's parameters are all finite."""
  losses = (row["minibatch_avg_loss"], row["full_batch_loss"], row["val_loss"])
  return all(np.isfinite(losses)) and bool(params_are_finite(model))


def save_and_log(manager, model, optimizer, config, metrics: list[dict], steps: int,
                 is_writer: bool) -> None:
  """Checkpoints the epoch just done, then appends its metrics line and prints it."""
  row = metrics[-1]
  manager.save(row["epoch"], args=ocp.args.Composite(
      state=ocp.args.StandardSave(nnx.state((model, optimizer))),
      meta=ocp.args.JsonSave(dict(epoch=row["epoch"], config=dataclasses.asdict(config),
                                  metrics=metrics))))
  if is_writer:
    records.append_jsonl(os.path.join(config.out, records.METRICS), row)
    tqdm.write(f"epoch {row['epoch']:3d}/{config.epochs}"
               f"  minibatch loss {row['minibatch_avg_loss']:.4f}"
               f"  train loss {row['full_batch_loss']:.4f} acc {row['full_batch_acc']:.4f}"
               f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
               f"  {row['epoch_time_s']:.2f} s ({steps / row['epoch_time_s']:.1f} steps/s)",
               file=sys.stdout)


def finish(model, config, metrics: list[dict], steps_per_epoch: int, splits, devices: Devices,
           is_writer: bool, diverged_epoch: int | None = None) -> dict:
  """Writes ``summary.json`` (test loss and accuracy unless the run diverged) and returns it."""
  train_time = sum(m["epoch_time_s"] for m in metrics)
  summary = dict(test_loss=None, test_acc=None, train_time_s=train_time,
                 steps_per_s=steps_per_epoch * len(metrics) / train_time if train_time else None,
                 device=devices.describe(), epochs=len(metrics),
                 diverged=diverged_epoch is not None)
  if diverged_epoch is None:
    summary["test_loss"], summary["test_acc"] = evaluate(model, *splits["test"], devices,
                                                         eval_chunk(splits))
  else:
    summary["diverged_epoch"] = diverged_epoch
  if is_writer:
    records.write_json(os.path.join(config.out, records.SUMMARY), summary)
    if diverged_epoch is None:
      print(f"test loss {summary['test_loss']:.4f} acc {summary['test_acc']:.4f}"
            f"  train time {train_time:.1f} s  -> {config.out}")
    else:
      kept = (f"the checkpoint of epoch {diverged_epoch - 1} is kept" if diverged_epoch > 1
              else "no epoch finished")
      print(f"diverged in epoch {diverged_epoch}: non-finite loss or parameters; {kept} "
            f"(try a smaller --lr)  -> {config.out}")
  return summary


def done_message(config, state: records.RunState) -> str:
  """What a run that has nothing left to do says instead of training."""
  if state.status == "diverged":
    return (f"{config.out}: this run diverged in epoch {state.summary['diverged_epoch']}; "
            f"resuming would repeat that (same data order): change --lr or the mode in a "
            f"new --out")
  return (f"{config.out}: this run is finished ({state.summary['epochs']} epochs); pass "
          f"--epochs above {state.summary['epochs']} with --resume to train it longer")


def run(config) -> dict:
  """Trains one model as ``config`` (a `RunConfig`) says; returns the summary.

  The summary is also written to ``summary.json``; ``summary["diverged"]`` says whether the
  run stopped on a non-finite loss or parameters.

  Raises:
    RunDirError: ``config.out`` holds something this run may not continue or overwrite.
    data.DataNotPreparedError: CIFAR-10 is not prepared (with instructions).
  """
  is_writer = jax.process_index() == 0
  log = print if is_writer else lambda *args, **kwargs: None
  state = check_run_dir(config)
  if is_done(config, state):
    log(done_message(config, state))
    return state.summary

  compile_cache.use(config.compile_cache)  # before the run's first compile
  devices = Devices(config.parallel, config.mesh)
  splits = load_data(config)
  train_x, train_y = splits["train"]
  log(describe(config, splits, devices))
  with devices.context():
    model, optimizer = build(config, train_x.shape[1:], devices.axis_name, devices.rules)
  devices.place(model, optimizer)
  batch_sizes = [len(b) for b in data_lib.batches(
      np.arange(len(train_y)), min(config.batch_size, len(train_y)), devices.count)]
  show_bar = not config.quiet and sys.stdout.isatty() and is_writer

  if is_writer:
    start_run_dir(config, log)
  with checkpoint_manager(config.out, config.keep_checkpoints) as manager:
    metrics = restore_or_start(manager, model, optimizer, config, is_writer)
    if metrics:
      log(f"resuming after epoch {len(metrics)}")
    if len(metrics) < config.epochs:
      step = compile_step(devices, model, optimizer, batch_sizes, train_x, train_y, log)
    for epoch in range(len(metrics) + 1, config.epochs + 1):
      loss, seconds, steps = train_epoch(step, model, optimizer, config, epoch, train_x,
                                         train_y, devices, show_bar)
      row = evaluate_epoch(model, epoch, loss, seconds, splits, devices)
      if not is_finite(row, model):
        return finish(model, config, metrics, len(batch_sizes), splits, devices, is_writer,
                      diverged_epoch=epoch)
      if config.diagnostics:
        row["diagnostics"] = diagnose(model, config, train_x, train_y, devices)
      metrics.append(row)
      save_and_log(manager, model, optimizer, config, metrics, steps, is_writer)
  return finish(model, config, metrics, len(batch_sizes), splits, devices, is_writer)
