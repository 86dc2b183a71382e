"""The optimizers of the experiments, by name: ``adam``, ``adamw`` and ``nesterov``."""

from __future__ import annotations

import functools

import optax

OPTIMIZERS = ("adam", "adamw", "nesterov")


@functools.cache  # nnx.Optimizer keeps it as a static attribute: equal objects let two
# builds of a model share their compiled steps
def make(name: str, lr: float, *, momentum: float = 0.95,
         weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """One of `OPTIMIZERS`.

  Args:
    name: ``"adam"``, ``"adamw"`` (Adam with decoupled weight decay) or ``"nesterov"`` (SGD
      with Nesterov momentum; optax's matches PyTorch's ``SGD(nesterov=True)``).
    lr: learning rate.
    momentum: Nesterov momentum (``nesterov`` only).
    weight_decay: decoupled weight decay (``adamw`` only).
  """
  if name == "adam":
    return optax.adam(lr)
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay)
  if name == "nesterov":
    return optax.sgd(lr, momentum=momentum, nesterov=True)
  raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
