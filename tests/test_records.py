"""experiments/records.py: whole files after any failure, versions, what a run folder holds."""

import importlib.metadata
import os
import subprocess

import pytest

from experiments import config as config_lib
from experiments import records
from tests import helpers


def test_json_write_that_fails_leaves_the_old_file_whole(tmp_path):
  path = str(tmp_path / "summary.json")
  records.write_json(path, {"epochs": 1})
  with pytest.raises(TypeError):  # fails half-way: the object cannot be serialised
    records.write_json(path, {"epochs": 2, "bad": object()})
  assert helpers.read_json(path) == {"epochs": 1}
  assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left behind


def test_jsonl_rewrite_is_whole_and_append_adds_exactly_one_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  records.write_jsonl(path, [{"epoch": 1}, {"epoch": 2}])
  with pytest.raises(TypeError):
    records.write_jsonl(path, [{"epoch": 1}, {"epoch": object()}])
  records.append_jsonl(path, {"epoch": 3, "loss": 0.5})
  with open(path) as f:
    text = f.read()
  assert text == '{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "loss": 0.5}\n'
  assert records.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3, "loss": 0.5}]
  assert records.read_jsonl(str(tmp_path / "none.jsonl")) == []


def test_written_files_are_readable_by_others(tmp_path):
  # Written through a temporary file: it must still get the usual mode, not mkstemp's 0600.
  path = str(tmp_path / "config.json")
  records.write_json(path, {})
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_versions_name_the_installed_packages_and_the_commit():
  versions = records.versions()
  for name in ("proxprop_jax", "jax", "jaxlib", "flax", "optax"):
    assert versions[name] == importlib.metadata.version(name)
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=helpers.REPO, capture_output=True,
                        text=True)
  if head.returncode == 0:  # a checkout (CI's clone is one)
    assert versions["git_commit"].removesuffix("+dirty") == head.stdout.strip()
  else:
    assert versions["git_commit"] is None


def test_config_json_holds_the_settings_and_the_versions(tmp_path):
  config = config_lib.RunConfig(out=str(tmp_path), lr=0.5)
  records.write_config(str(tmp_path), config)
  saved = helpers.read_json(str(tmp_path / "config.json"))
  assert config_lib.RunConfig(**{k: v for k, v in saved.items() if k != "versions"}) == config
  assert saved["versions"] == records.versions()


def test_run_state_of_each_kind_of_folder(tmp_path):
  run = str(tmp_path / "run")
  assert records.run_state(run) == records.RunState("new", None, None, 0)
  os.makedirs(run)
  records.write_json(os.path.join(run, "config.json"), {"epochs": 3})
  records.write_jsonl(os.path.join(run, "metrics.jsonl"), [])
  assert records.run_state(run).status == "started" and records.run_state(run).epochs == 0
  records.append_jsonl(os.path.join(run, "metrics.jsonl"), {"epoch": 1})
  records.write_json(os.path.join(run, "summary.json"), {"epochs": 1, "diverged": False})
  assert records.run_state(run) == records.RunState(
      "finished", {"epochs": 3}, {"epochs": 1, "diverged": False}, 1)
  records.write_json(os.path.join(run, "summary.json"),
                     {"epochs": 1, "diverged": True, "diverged_epoch": 2})
  assert records.run_state(run).status == "diverged"
  assert records.run_state(run).summary["diverged_epoch"] == 2


def test_settings_differ_lists_only_the_changed_keys():
  config = config_lib.RunConfig(lr=0.1, epochs=9)
  saved = {**config_lib.DEFAULTS, "lr": 0.2}
  assert records.settings_differ(saved, config, config_lib.RESUME_KEYS) == {"lr": (0.2, 0.1)}
