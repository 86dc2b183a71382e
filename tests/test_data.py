"""experiments/data.py: the digits split, CIFAR-10 through tfds, epoch order and batches."""

import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import data
from tests import helpers


def test_digits_split_is_real_disjoint_and_seeded():
  splits = data.load("digits", seed=3)
  assert [len(splits[s][1]) for s in ("train", "val", "test")] == list(data.DIGITS_SPLIT)
  x, y = splits["train"]
  assert x.shape[1:] == (8, 8, 1) and x.dtype == np.float32 and y.dtype == np.int32
  assert x.min() == 0.0 and x.max() == 1.0  # sklearn's pixels are 0..16, divided by 16
  assert set(np.unique(y)) == set(range(10))
  # Disjoint: no image appears in two splits (the 1797 digits have few exact duplicates).
  rows = {s: {im.tobytes() for im in splits[s][0]} for s in splits}
  assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"]
  again, other = data.load("digits", seed=3), data.load("digits", seed=4)
  assert np.array_equal(again["val"][0], splits["val"][0])
  assert not np.array_equal(other["val"][0], splits["val"][0])


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  a = data.epoch_order(0, 5, 100)
  assert np.array_equal(a, data.epoch_order(0, 5, 100))
  assert sorted(a) == list(range(100))
  assert not np.array_equal(a, data.epoch_order(0, 6, 100))
  assert not np.array_equal(a, data.epoch_order(1, 5, 100))


def test_batches_keep_the_remainder_trimmed_to_the_device_count():
  order = np.arange(23)
  assert [len(b) for b in data.batches(order, 10)] == [10, 10, 3]
  assert [len(b) for b in data.batches(order, 10, multiple_of=2)] == [10, 10, 2]
  assert [len(b) for b in data.batches(order[:21], 10, multiple_of=4)] == [8, 8]
  assert np.array_equal(np.concatenate(data.batches(order, 10)), order)


def test_cifar10_loads_through_tfds_data_source(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    splits = data.load("cifar10", data_dir=str(tmp_path))
  for name in ("train", "val", "test"):
    x, y = splits[name]
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5  # uint8 / 255
    assert y.dtype == np.int32 and np.all((0 <= y) & (y < 10))


def test_offline_cifar10_without_prepared_data_fails_fast_with_instructions(tmp_path):
  empty = tmp_path / "tfds"
  empty.mkdir()  # exists, holds nothing (a folder that does not exist: tests/test_config.py)
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.cifar", "--data-dir", str(empty), "--epochs", "1",
       "--out", str(tmp_path / "run")],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=120, env=helpers.subprocess_env())
  elapsed = time.perf_counter() - start
  assert proc.returncode == 1
  assert elapsed < 30, f"took {elapsed:.1f} s (interpreter and imports included)"
  for needed in ("not prepared", str(empty), "pip install -e '.[experiments,prepare]'",
                 "tfds.data_source('cifar10'", "--dataset digits"):
    assert needed in proc.stderr, (needed, proc.stderr)
  assert "Traceback" not in proc.stderr
  # tfds' warning about the missing cifar10/<version> folder says nothing ours does not.
  assert "has no dataset_info.json" not in proc.stderr, proc.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_warning_about_a_missing_variant_folder_is_not_shown(tmp_path, caplog):
  with caplog.at_level(logging.WARNING), pytest.raises(data.DataNotPreparedError):
    data.load("cifar10", data_dir=str(tmp_path))
  assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]


def test_warning_about_an_existing_empty_variant_folder_is_kept(tmp_path, caplog):
  (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # something is there: worth a word
  with caplog.at_level(logging.WARNING), pytest.raises(data.DataNotPreparedError):
    data.load("cifar10", data_dir=str(tmp_path))
  assert [r for r in caplog.records if "has no dataset_info.json" in r.getMessage()]


def test_unusable_prepared_cifar10_says_what_tfds_found(tmp_path):
  info = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
  info.parent.mkdir(parents=True)
  info.write_text("{}")
  with pytest.raises(data.DataNotPreparedError, match="tfds found .*dataset_info.json"):
    data.load("cifar10", data_dir=str(tmp_path))
