"""Datasets for the paper's experiments, as in-memory NumPy arrays.

Both datasets return the same thing: a dict ``{"train", "val", "test"}`` of ``(images, labels)``
pairs, images float32 NHWC in [0, 1], labels int32. They are small enough (CIFAR-10: 180 MB as
float32) to keep in host memory, which makes the data order a pure function of (seed, epoch).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import re

import numpy as np

CIFAR10_TRAIN = 45000  # the paper's split: train[:45000] / train[45000:] as validation / test
DIGITS_SPLIT = (1297, 250, 250)  # sklearn's 1797 digits: train / validation / test

PREPARE_HELP = """\
CIFAR-10 is not prepared in {data_dir}.
Training never downloads it. Prepare it once, on a machine with internet access:

    pip install -e '.[experiments,prepare]'
    python -c "import tensorflow_datasets as tfds; tfds.data_source('cifar10', data_dir='{data_dir}')"

then pass --data-dir {data_dir} (or copy that folder to this machine).
To try everything offline now, use --dataset digits (real 8x8 digit images, no download).{detail}"""


class DataNotPreparedError(RuntimeError):
  """The dataset is not prepared locally; the message says how to prepare it."""


def load(dataset: str, *, data_dir: str | None = None, seed: int = 0) -> dict:
  """Loads one of the experiment datasets.

  Args:
    dataset: ``"cifar10"`` or ``"digits"``.
    data_dir: where tfds keeps prepared data (CIFAR-10 only; tfds' default when None).
    seed: seeds the digits split (CIFAR-10's split is fixed).

  Returns:
    ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` of NumPy arrays.
  """
  if dataset == "cifar10":
    return load_cifar10(data_dir)
  if dataset == "digits":
    return load_digits(seed)
  raise ValueError(f"unknown dataset {dataset!r}; valid: cifar10, digits")


@functools.cache  # decoding 60k PNGs takes a while; the paper's grid loads it once per process
def load_cifar10(data_dir: str | None = None) -> dict:
  """Loads prepared CIFAR-10 through ``tfds.data_source``, never downloading.

  Raises:
    DataNotPreparedError: the data is not prepared in ``data_dir``, with instructions to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  splits = {"train": f"train[:{CIFAR10_TRAIN}]", "val": f"train[{CIFAR10_TRAIN}:]",
            "test": "test"}
  try:
    # download=False: without prepared data tfds would otherwise retry downloads for minutes.
    with _quiet_about_missing_folders():
      sources = tfds.data_source("cifar10", split=splits, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises various types here; all mean "not usable as prepared"
    shown_dir = data_dir or tfds.core.constants.DATA_DIR
    # Something is there but unusable (e.g. prepared by tfds.load as TFRecord): say what.
    found = glob.glob(os.path.join(shown_dir, "cifar10", "*", "dataset_info.json"))
    detail = f"\n(tfds found {found[0]} but said: {type(e).__name__}: {e})" if found else ""
    raise DataNotPreparedError(PREPARE_HELP.format(data_dir=shown_dir, detail=detail)) from e
  return {name: _to_arrays(source, f"decoding CIFAR-10 {name}")
          for name, source in sources.items()}


class _MissingFolderFilter(logging.Filter):
  """Drops tfds' "Variant folder X has no dataset_info.json" warning when X does not exist.

  Without prepared data that warning comes before our own message and says nothing more; for
  a folder that exists (something unusable is there) it is kept.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    found = re.match(r"Variant folder (.+) has no dataset_info\.json", record.getMessage())
    return not (found and not os.path.isdir(found.group(1)))


@contextlib.contextmanager
def _quiet_about_missing_folders():
  logger, log_filter = logging.getLogger("absl"), _MissingFolderFilter()
  logger.addFilter(log_filter)
  try:
    yield
  finally:
    logger.removeFilter(log_filter)


def _to_arrays(source, desc: str) -> tuple[np.ndarray, np.ndarray]:
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  # A progress bar on a terminal only (disable=None): decoding 60k PNGs takes a while.
  examples = [source[i] for i in tqdm(range(len(source)), desc, leave=False, disable=None)]
  images = np.stack([ex["image"] for ex in examples]).astype(np.float32) / 255.0
  labels = np.asarray([ex["label"] for ex in examples], dtype=np.int32)
  return images, labels


def load_digits(seed: int = 0) -> dict:
  """sklearn's 1797 real 8x8 digit images (pixel values 0..16, scaled to [0, 1]), offline.

  The split 1297 / 250 / 250 is a seeded permutation, the same for every run with this seed.
  """
  from sklearn import datasets  # pylint: disable=import-outside-toplevel

  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC, one channel
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_train, n_val, _ = DIGITS_SPLIT
  parts = np.split(order, [n_train, n_train + n_val])
  return {name: (images[idx], labels[idx]) for name, idx in zip(("train", "val", "test"), parts)}


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The shuffled example order of one epoch: a pure function of (seed, epoch).

  Resuming needs no saved RNG state: epoch ``e`` sees the same order whether or not the run
  was interrupted before it.
  """
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(order: np.ndarray, batch_size: int, multiple_of: int = 1) -> list[np.ndarray]:
  """Splits an epoch's order into mini-batches of indices.

  The last, smaller batch is kept (as the PyTorch reference's DataLoader does), trimmed to a
  multiple of ``multiple_of`` (the device count) so it can be split across devices; a batch
  trimmed to nothing is dropped.
  """
  out = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    idx = idx[:len(idx) - len(idx) % multiple_of]
    if len(idx):
      out.append(idx)
  return out
