"""experiments/train.py: what a run prints and writes, resume, refusals, divergence, devices.

Runs are tiny (200 digits, 2 steps per epoch): these tests check the plumbing and the files,
not the paper's numbers.
"""

import logging
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import cifar, data, train
from experiments import compile_cache
from experiments import config as config_lib
from tests import helpers

RESUME_FLAGS = helpers.DIGITS_FLAGS + ["--mode", "prox_cg3"]


def test_first_lines_say_what_runs_then_how_long_it_compiled(tmp_path, capsys):
  out = str(tmp_path / "run")
  cifar.main(RESUME_FLAGS + ["--model", "mlp", "--optimizer", "nesterov", "--lr", "0.5",
                             "--tau-prox", "0.05", "--epochs", "3", "--keep-checkpoints", "1",
                             "--out", out])
  lines = capsys.readouterr().out.splitlines()
  cache = os.path.abspath(os.path.expanduser(compile_cache.DEFAULT))
  assert lines[0] == ("mlp prox_cg3, tau 0.05, nesterov lr 0.5 | digits: 200 train / 250 val / "
                      f"250 test | 1 x cpu (cpu), parallel=none | {out} | compile cache {cache}")
  assert lines[1].startswith("compiling… ") and lines[1].endswith(" s")
  assert float(lines[1].split()[1]) > 0
  assert lines[2].startswith("epoch   1/3")
  # --keep-checkpoints 1: only the last epoch's checkpoint stays on disk.
  assert helpers.checkpoint_epochs(out) == [3]

  cifar.main(RESUME_FLAGS + ["--model", "mlp", "--optimizer", "nesterov", "--lr", "0.5",
                             "--tau-prox", "0.05", "--epochs", "3", "--out", out, "--resume"])
  said = capsys.readouterr().out
  assert said == (f"{out}: this run is finished (3 epochs); pass --epochs above 3 with "
                  f"--resume to train it longer\n")


@pytest.fixture
def own_compile_cache():
  """Puts this process's compilation cache back as it was after the test."""
  before = jax.config.jax_compilation_cache_dir
  yield
  compile_cache.use(before)


@pytest.mark.usefixtures("own_compile_cache")
def test_a_resumed_run_compiles_every_program_from_the_cache_the_first_run_wrote(tmp_path,
                                                                               capsys):
  cache, out = tmp_path / "cache", str(tmp_path / "run")
  flags = RESUME_FLAGS + ["--model", "mlp", "--out", out, "--compile-cache", str(cache)]
  jax.clear_caches()  # each run as in a new process: nothing compiled in memory before it
  cifar.main(flags + ["--epochs", "1"])
  assert capsys.readouterr().out.splitlines()[0].endswith(f"| {out} | compile cache {cache}")
  written = sorted(os.listdir(cache))
  assert any(name.startswith("jit_train_step") for name in written), written
  jax.clear_caches()
  cifar.main(flags + ["--epochs", "2", "--resume"])
  assert sorted(os.listdir(cache)) == written  # nothing compiled anew: all from the cache
  cifar.main(RESUME_FLAGS + ["--model", "mlp", "--out", str(tmp_path / "other"),
                             "--epochs", "1", "--no-compile-cache"])
  headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mlp ")]
  assert headers[-1].endswith(f"| {tmp_path / 'other'} | no compile cache")
  assert jax.config.jax_compilation_cache_dir is None


def test_an_out_without_a_run_is_refused_before_any_data_is_loaded(tmp_path):
  # Other files: with or without --resume; --resume where no run was started. Each refusal
  # says what the folder holds and the choice that works there.
  out, new = tmp_path / "run", tmp_path / "new"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  prepared = tmp_path / "tfds"
  prepared.mkdir()  # nothing prepared there: loading the data would fail
  refusals = [
      (out, [], f"{out} already holds files that are not a run (notes.txt): choose another --out"),
      (out, ["--resume"], f"--resume: {out} holds no run, only other files (notes.txt): choose "
                          f"another --out"),
      (new, ["--resume"], f"--resume: no run was started in {new} (it does not exist): leave out "
                          f"--resume to start one")]
  for folder, extra, said in refusals:
    with pytest.raises(SystemExit) as exit_info:
      cifar.main(["--data-dir", str(prepared), "--out", str(folder)] + extra)
    assert exit_info.value.code == f"error: {said}"  # Python prints it and exits with 1
  assert os.listdir(out) == ["notes.txt"] and not new.exists()


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch, capsys, caplog):
  whole, split, killed = (str(tmp_path / n) for n in ("whole", "split", "killed"))
  cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", whole])
  cifar.main(RESUME_FLAGS + ["--epochs", "1", "--out", split])
  # A finished run given more epochs is extended.
  cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", split, "--resume"])

  # A run stopped in the middle of epoch 2 loses only that epoch.
  real_order = data.epoch_order

  def order_then_crash_in_epoch_2(seed, epoch, n):
    if epoch == 2:
      raise KeyboardInterrupt
    return real_order(seed, epoch, n)

  monkeypatch.setattr(train.data_lib, "epoch_order", order_then_crash_in_epoch_2)
  with pytest.raises(SystemExit) as exit_info:
    cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", killed])
  assert exit_info.value.code == 130
  assert capsys.readouterr().err.startswith(
      f"\ninterrupted: epoch 1 is saved in {killed}; continue with: python -m experiments.cifar")
  monkeypatch.setattr(train.data_lib, "epoch_order", real_order)
  assert [m["epoch"] for m in helpers.read_metrics(killed)] == [1]
  assert not os.path.exists(os.path.join(killed, "summary.json"))
  with pytest.raises(SystemExit, match=re.escape(
      f"{killed} already holds an unfinished run (epoch 1 is saved): pass --resume to continue "
      f"it, or choose another --out")):
    cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", killed])
  # What a kill during the save of epoch 2 leaves: orbax's temporary folder, not renamed into
  # place. The resume removes it, says so, and no warning of orbax's shows.
  checkpoints = os.path.join(killed, "checkpoints")
  shutil.copytree(os.path.join(checkpoints, "1"),
                  os.path.join(checkpoints, "2.orbax-checkpoint-tmp"))
  capsys.readouterr()
  with caplog.at_level(logging.WARNING):
    cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", killed, "--resume"])
  assert ("removed the unfinished checkpoint of an interrupted save: "
          "checkpoints/2.orbax-checkpoint-tmp") in capsys.readouterr().out.splitlines()
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  assert sorted(os.listdir(checkpoints)) == ["1", "2"]

  _, expected, expected_summary = helpers.read_run(whole)
  for out in (split, killed):
    _, metrics, summary = helpers.read_run(out)
    assert helpers.without_times(metrics) == helpers.without_times(expected)
    assert (summary["test_loss"], summary["test_acc"]) == (expected_summary["test_loss"],
                                                           expected_summary["test_acc"])
    assert summary["epochs"] == 2


def test_resume_refuses_other_settings_and_rerun_refuses_to_overwrite(tmp_path):
  out = str(tmp_path / "run")
  cifar.main(RESUME_FLAGS + ["--epochs", "1", "--out", out, "--model", "convnet"])
  with pytest.raises(SystemExit, match=re.escape(
      f"{out} already holds a finished run (1 epoch): pass --resume with --epochs above 1 to "
      f"train it longer, or choose another --out")):
    cifar.main(RESUME_FLAGS + ["--epochs", "1", "--out", out])
  with pytest.raises(SystemExit, match="'lr': \\(0.001, 0.1\\)"):
    cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", out, "--lr", "0.1", "--resume"])
  assert len(helpers.read_metrics(out)) == 1


def test_a_diverging_run_stops_says_so_and_keeps_its_last_finite_checkpoint(tmp_path, capsys):
  out = str(tmp_path / "run")
  # Plain gradient steps at lr 3 on the MLP: the loss overflows within a few epochs.
  flags = helpers.DIGITS_FLAGS + ["--model", "mlp", "--mode", "gradient", "--optimizer",
                                  "nesterov", "--lr", "3", "--epochs", "8", "--out", out]
  with pytest.raises(SystemExit) as exit_info:
    cifar.main(flags)
  assert exit_info.value.code == 3
  summary = helpers.read_json(os.path.join(out, "summary.json"))
  k = summary["diverged_epoch"]
  assert summary["diverged"] is True and 2 <= k <= 8 and summary["epochs"] == k - 1
  assert summary["test_acc"] is None
  metrics = helpers.read_metrics(out)
  assert [m["epoch"] for m in metrics] == list(range(1, k))
  assert all(math.isfinite(v) for m in metrics for v in m.values())
  assert helpers.checkpoint_epochs(out)[-1] == k - 1
  model, meta = train.load_model(out, (8, 8, 1))
  assert meta["epoch"] == k - 1
  assert all(np.isfinite(np.asarray(layer.kernel[...])).all()
             for layer in [*model.hidden, model.head])
  last = capsys.readouterr().out.splitlines()[-1]
  assert last.startswith(f"diverged in epoch {k}: non-finite loss or parameters; the "
                         f"checkpoint of epoch {k - 1} is kept")

  with pytest.raises(SystemExit) as exit_info:
    cifar.main(flags + ["--resume"])
  assert exit_info.value.code == 3
  assert f"this run diverged in epoch {k}" in capsys.readouterr().out
  with pytest.raises(SystemExit, match=re.escape(
      f"{out} already holds a run that diverged in epoch {k}: choose another --out")):
    cifar.main(flags)
  assert helpers.checkpoint_epochs(out)[-1] == k - 1


def test_several_devices_train_like_one_device(tmp_path):
  """``--parallel auto`` (sharded jit) and ``pmap`` on 2 CPU devices match one device."""
  flags = helpers.DIGITS_FLAGS + ["--mode", "prox_cg3", "--epochs", "2"]
  kinds = ("none", "auto", "pmap")
  script = ("import sys\nfrom experiments import cifar\n"
            f"for kind in {kinds!r}:\n"
            f"  cifar.main({flags!r} + ['--parallel', kind, '--out', sys.argv[1] + '/' + kind])\n")
  env = helpers.subprocess_env(
      XLA_FLAGS=helpers.xla_flags("--xla_force_host_platform_device_count=2"))
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=helpers.REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = {kind: helpers.read_run(str(tmp_path / kind)) for kind in kinds}
  for kind, resolved in [("none", "none"), ("auto", "sharded"), ("pmap", "pmap")]:
    assert runs[kind][2]["device"].startswith("2 x")
    assert runs[kind][2]["device"].endswith(f"parallel={resolved}")
  _, expected, expected_summary = runs["none"]
  for kind in ("auto", "pmap"):
    _, metrics, summary = runs[kind]
    for m, e in zip(metrics, expected, strict=True):
      for key in helpers.METRIC_FIELDS - {"epoch_time_s"}:
        assert m[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (kind, key)
    assert summary["test_acc"] == pytest.approx(expected_summary["test_acc"], abs=1e-6)


@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_evaluation_leaves_the_training_graph_as_the_step_was_compiled(model):
  # Otherwise the step recompiles inside the next epoch (the ViT's attention flag did).
  config = config_lib.RunConfig(model=model, mode="prox_cg3", dataset="digits")
  trained, _ = train.build(config, (8, 8, 1))
  before = nnx.graphdef(trained)
  x, y = data.load("digits", seed=0)["val"]
  train.evaluate(trained, x[:20], y[:20], train.Devices("none"))
  assert nnx.graphdef(trained) == before
