"""Training loop of the paper's experiments: one jitted step, per-epoch metrics, checkpoints.

``run(config)`` trains one model and writes, in ``config["out"]``:

- ``config.json``: the run's settings;
- ``metrics.jsonl``: one JSON object per epoch (epoch, minibatch_avg_loss: the mean of the
  epoch's mini-batch losses, full_batch_loss, full_batch_acc, val_loss, val_acc, epoch_time_s);
- ``summary.json``: test_loss, test_acc, train_time_s, steps_per_s, device;
- ``checkpoints/``: orbax checkpoints of model, optimizer and metrics so far, every epoch.

Epoch times count training steps only: evaluation and checkpointing are excluded, and the step
is compiled before the first epoch's clock starts.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from experiments import data as data_lib
from experiments import models

EVAL_BATCH = 1000
# Settings that must match for --resume to continue a run (epochs may grow).
RESUME_KEYS = ("model", "mode", "optimizer", "lr", "tau_prox", "momentum", "batch_size",
               "train_samples", "dataset", "seed")


class RunDirError(Exception):
  """``--out`` holds a run that this one may not continue or overwrite."""


@functools.cache  # the optimizer keeps it as a static attribute; see `train_step`
def make_optimizer(name: str, lr: float, momentum: float) -> optax.GradientTransformation:
  """The paper's optimizers; optax's Nesterov SGD matches PyTorch's ``SGD(nesterov=True)``."""
  if name == "adam":
    return optax.adam(lr)
  if name == "nesterov":
    return optax.sgd(lr, momentum=momentum, nesterov=True)
  raise ValueError(f"unknown optimizer {name!r}; valid: adam, nesterov")


def make_train_step(axis_name: str | None = None):
  """One optimizer step on a mini-batch; the same function for every mode and optimizer.

  Args:
    axis_name: under ``pmap``, the axis to average gradients over (the ProxProp layers already
      return the global batch's direction; the mean makes the plain final layer's gradient
      global too).
  """

  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      return models.cross_entropy(model(images), labels)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
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


class Devices:
  """How batches reach the step: one device, ``pmap`` or a sharded ``jit`` over a mesh.

  With several processes every process holds the whole dataset, takes its slice of each global
  batch, and the parallel module assembles the global batch.
  """

  def __init__(self, kind: str):
    if kind == "auto":
      kind = "sharded" if jax.device_count() > 1 else "none"
    self.kind = kind
    self.count = 1 if kind == "none" else jax.device_count()
    self.axis_name = "data" if kind == "pmap" else None
    self.parallel = self.mesh = None
    if kind != "none":
      from proxprop_jax import parallel  # pylint: disable=import-outside-toplevel
      self.parallel = parallel
      self.mesh = parallel.make_mesh(axis_name="data") if kind == "sharded" else None

  def feed(self, arrays):
    """Host arrays of a global batch -> the train step's batch arguments."""
    if self.kind == "none":
      return arrays
    # This process's contiguous slice of the global batch (all of it with one process).
    n, p, i = len(arrays[0]), jax.process_count(), jax.process_index()
    local = tuple(a[i * n // p:(i + 1) * n // p] for a in arrays)
    if self.kind == "sharded":
      return tuple(self.parallel.shard_batch(local, self.mesh))
    return local  # pmap splits it over this process's devices

  def feed_eval(self, arrays):
    """Host arrays of a global batch -> arguments of the (plain ``jit``) evaluation."""
    # Sharded: the global view, as in the step. Otherwise every process evaluates the whole
    # batch itself with its (identical) model.
    return self.feed(arrays) if self.kind == "sharded" else arrays

  def place(self, model, optimizer):
    if self.kind == "sharded":
      self.parallel.replicate((model, optimizer), self.mesh)

  def train_step(self):
    """The compiled training step for these devices."""
    if self.kind == "sharded":
      return self.parallel.make_sharded_step(make_train_step(), self.mesh)
    if self.kind == "pmap":
      return self.parallel.make_pmap_step(make_train_step(self.axis_name),
                                          axis_name=self.axis_name)
    return train_step

  def describe(self) -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()} x {d.device_kind} ({d.platform}), parallel={self.kind}"


def evaluate(model, images, labels, devices: Devices) -> tuple[float, float]:
  """Full-batch mean loss and accuracy, in fixed-size padded chunks (one compiled shape)."""
  size = -(-EVAL_BATCH // devices.count) * devices.count
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


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def _write_metrics(path, metrics):
  with open(path, "w") as f:
    for m in metrics:
      f.write(json.dumps(m) + "\n")


def _checkpoint_manager(out: str) -> ocp.CheckpointManager:
  # Synchronous saves: an epoch's checkpoint is complete on disk before the next epoch starts,
  # and orbax writes each one to a temporary folder first, so a kill never leaves a broken one.
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")),
                               options=options)


def _restore(manager, model, optimizer) -> dict:
  """Restores the latest checkpoint into (model, optimizer); returns its metadata."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state((model, optimizer)))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  nnx.update((model, optimizer), restored["state"])
  return restored["meta"]


def build(config: dict, input_shape, axis_name: str | None = None):
  """The run's model and optimizer, freshly initialized from ``config["seed"]``."""
  model = models.build(config["model"], mode=config["mode"], input_shape=input_shape,
                       tau_prox=config["tau_prox"], axis_name=axis_name, seed=config["seed"])
  tx = make_optimizer(config["optimizer"], config["lr"], config["momentum"])
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def load_model(run_dir: str, input_shape) -> tuple[nnx.Module, dict]:
  """The model of a run's latest checkpoint, and that checkpoint's metadata (epoch, metrics).

  Args:
    run_dir: a run's ``--out`` folder.
    input_shape: one example's ``(height, width, channels)``.
  """
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  model, optimizer = build(config, input_shape)
  with _checkpoint_manager(run_dir) as manager:
    meta = _restore(manager, model, optimizer)
  return model, meta


def _warm_up(step, model, optimizer, batches):
  """Compiles the step for each batch shape on throwaway copies, so epoch times exclude it."""
  for batch in batches:
    jax.block_until_ready(step(*nnx.clone((model, optimizer)), *batch))


def run(config: dict) -> dict:
  """Trains one model as ``config`` says; returns the summary (also written to summary.json).

  ``config`` holds the CLI's settings: model, mode, optimizer, lr, tau_prox, momentum, epochs,
  batch_size, train_samples (None: all), dataset, data_dir, seed, out, parallel, resume, quiet.
  """
  out, is_writer = config["out"], jax.process_index() == 0
  devices = Devices(config["parallel"])
  splits = data_lib.load(config["dataset"], data_dir=config["data_dir"], seed=config["seed"])
  train_x, train_y = splits["train"]
  if config["train_samples"] is not None:
    train_x, train_y = train_x[:config["train_samples"]], train_y[:config["train_samples"]]

  model, optimizer = build(config, train_x.shape[1:], devices.axis_name)
  devices.place(model, optimizer)
  step = devices.train_step()

  manager = _checkpoint_manager(out)
  metrics, start_epoch = [], 1
  if manager.latest_step() is not None:
    if not config["resume"]:
      raise RunDirError(f"{out} already holds checkpoints of a run: pass --resume to "
                        f"continue it, or choose another --out")
    meta = _restore(manager, model, optimizer)
    changed = {k: (meta["config"].get(k), config[k]) for k in RESUME_KEYS
               if meta["config"].get(k) != config[k]}
    if changed:
      raise RunDirError(f"--resume with other settings than the run in {out} "
                        f"(setting: (checkpoint, now)): {changed}")
    metrics, start_epoch = meta["metrics"], meta["epoch"] + 1
  if is_writer:
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "config.json"), config)
    # Rewritten from the checkpoint: drops any epoch logged after the last checkpoint.
    _write_metrics(os.path.join(out, "metrics.jsonl"), metrics)

  batch_size = min(config["batch_size"], len(train_y))
  batch_sizes = [len(b) for b in data_lib.batches(np.arange(len(train_y)), batch_size,
                                                  devices.count)]
  if start_epoch <= config["epochs"]:
    _warm_up(step, model, optimizer,
             [devices.feed((train_x[:n], train_y[:n])) for n in sorted(set(batch_sizes))])

  show_bar = not config["quiet"] and sys.stdout.isatty() and is_writer
  for epoch in range(start_epoch, config["epochs"] + 1):
    order = data_lib.epoch_order(config["seed"], epoch, len(train_y))
    batches = data_lib.batches(order, batch_size, devices.count)
    losses = []
    bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{config['epochs']}", unit="step",
               leave=False, disable=not show_bar)
    start = time.perf_counter()
    for idx in batches:
      losses.append(step(model, optimizer, *devices.feed((train_x[idx], train_y[idx]))))
      if show_bar:  # reading the loss waits for the step; only worth it when someone watches
        bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
      bar.update()
    jax.block_until_ready(losses)
    epoch_time = time.perf_counter() - start
    bar.close()

    train_loss, train_acc = evaluate(model, train_x, train_y, devices)
    val_loss, val_acc = evaluate(model, *splits["val"], devices)
    metrics.append(dict(epoch=epoch, minibatch_avg_loss=float(np.mean(jax.device_get(losses))),
                        full_batch_loss=train_loss, full_batch_acc=train_acc,
                        val_loss=val_loss, val_acc=val_acc, epoch_time_s=epoch_time))
    manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.state((model, optimizer))),
        meta=ocp.args.JsonSave(dict(epoch=epoch, config=config, metrics=metrics))))
    if is_writer:
      with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics[-1]) + "\n")
      tqdm.write(f"epoch {epoch:3d}/{config['epochs']}"
                 f"  minibatch loss {metrics[-1]['minibatch_avg_loss']:.4f}"
                 f"  train loss {train_loss:.4f} acc {train_acc:.4f}"
                 f"  val loss {val_loss:.4f} acc {val_acc:.4f}"
                 f"  {epoch_time:.2f} s ({len(batches) / epoch_time:.1f} steps/s)", file=sys.stdout)
  manager.wait_until_finished()
  manager.close()

  test_loss, test_acc = evaluate(model, *splits["test"], devices)
  train_time = sum(m["epoch_time_s"] for m in metrics)
  summary = dict(test_loss=test_loss, test_acc=test_acc, train_time_s=train_time,
                 steps_per_s=len(batch_sizes) * len(metrics) / train_time if train_time else None,
                 device=devices.describe(), epochs=len(metrics))
  if is_writer:
    _write_json(os.path.join(out, "summary.json"), summary)
    print(f"test loss {test_loss:.4f} acc {test_acc:.4f}  train time {train_time:.1f} s"
          f"  -> {out}")
  return summary
