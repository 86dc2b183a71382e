"""experiments/cifar.py, the one-run command: end to end, exit statuses, Ctrl-C.

Flag parsing and its messages: tests/test_config.py.
"""

import os
import shlex
import signal
import time

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import proxprop_jax as pp
from experiments import cifar, data, plot, records, train
from experiments import config as config_lib
from tests import helpers


@pytest.mark.parametrize("mode", ["backprop", "prox_exact", "prox_cg3"])
def test_cli_end_to_end_on_mock_cifar10(tmp_path, mode):
  out = str(tmp_path / mode)
  flags = ["--mode", mode, "--train-samples", "16", "--batch-size", "8", "--epochs", "2",
           "--dataset", "cifar10"]
  with tfds.testing.mock_data(num_examples=16):
    cifar.main(flags + ["--out", out, "--data-dir", str(tmp_path), "--quiet"])
  config, _, _ = helpers.check_run_files(out, flags)
  assert config["data_dir"] == str(tmp_path)
  assert set(config["versions"]) == {"proxprop_jax", "jax", "jaxlib", "flax", "optax",
                                     "git_commit"}
  assert config["versions"]["jax"] and config["versions"]["proxprop_jax"]


@pytest.mark.parametrize("model, mode", [("convnet", "backprop"), ("convnet", "prox_exact"),
                                         ("mlp", "prox_cg3")])
def test_cli_end_to_end_on_digits(tmp_path, model, mode):
  out = str(tmp_path / mode)
  flags = ["--model", model, "--mode", mode, "--optimizer", "nesterov", "--lr", "0.05",
           "--tau-prox", "0.5", "--train-samples", "250", "--batch-size", "100", "--epochs", "2",
           "--dataset", "digits"]
  summary = cifar.main(flags + ["--out", out, "--quiet"])
  config, metrics, saved = helpers.check_run_files(out, flags)
  assert summary == saved
  # The logged metrics are those of the checkpointed model: recompute them independently.
  trained, meta = train.load_model(out, (8, 8, 1))
  assert meta["epoch"] == 2 and helpers.without_times(meta["metrics"]) == helpers.without_times(
      metrics)
  splits = data.load("digits", seed=0)
  for split, key in [("val", "val"), ("test", "test")]:
    x, y = splits[split]
    logits = np.asarray(trained(jnp.asarray(x)), np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    loss, acc = -logp[np.arange(len(y)), y].mean(), (logits.argmax(1) == y).mean()
    logged = metrics[-1] if split == "val" else saved
    assert logged[f"{key}_loss"] == pytest.approx(loss, rel=1e-4)
    assert logged[f"{key}_acc"] == acc


def read_until(proc, text, timeout=240):
  """Reads the process's stdout until it contains ``text`` (mid-line too); returns it."""
  seen, deadline = "", time.monotonic() + timeout
  while time.monotonic() < deadline:
    char = proc.stdout.read(1)
    if not char:
      break
    seen += char
    if seen.endswith(text):
      return seen
  proc.kill()
  pytest.fail(f"no {text!r} in {seen!r}; stderr: {proc.stderr.read()[-2000:]}")


def test_ctrl_c_exits_130_with_the_resume_command_and_a_resumable_folder(tmp_path, capsys):
  # Two runs at once: one is stopped before its first epoch ends (while compiling), the other
  # after epoch 1.
  flags = helpers.DIGITS_FLAGS + ["--train-samples", "300", "--mode", "prox_cg3",
                                  "--epochs", "1000"]
  early, late = str(tmp_path / "early"), str(tmp_path / "late")
  procs = {early: helpers.start_command("experiments.cifar", flags + ["--out", early]),
           late: helpers.start_command("experiments.cifar", flags + ["--out", late])}
  read_until(procs[early], "compiling…")
  procs[early].send_signal(signal.SIGINT)
  read_until(procs[late], "epoch   1/1000")
  procs[late].send_signal(signal.SIGINT)
  said = {}
  for out, proc in procs.items():
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    said[out] = stderr.strip().splitlines()
    assert len(said[out]) == 1, stderr  # one line, nothing else
    # The command resumes exactly this run.
    command = said[out][0].split("continue with: ")[1]
    assert shlex.split(command) == (["python", "-m", "experiments.cifar"] + flags
                                    + ["--out", out, "--resume"])

  assert said[early][0].startswith(f"interrupted: no epoch had finished; {early}")
  assert helpers.read_metrics(early) == [] and helpers.checkpoint_epochs(early) == []
  done = len(helpers.read_metrics(late))
  assert done >= 1 and helpers.checkpoint_epochs(late)[-1] == done
  saved = "epoch 1 is saved" if done == 1 else f"epochs 1-{done} are saved"
  assert said[late][0].startswith(f"interrupted: {saved} in {late}")
  assert not os.path.exists(os.path.join(late, "summary.json"))

  # Both folders: plotted as they are, then resumed with the printed command (fewer epochs).
  plot.main([early, late, "--out", str(tmp_path / "both.png")])
  assert "| 0 | – | – | – | – | – |" in capsys.readouterr().out
  for out, epochs in ((early, 2), (late, done + 1)):
    argv = shlex.split(said[out][0].split("continue with: ")[1])[3:]
    cifar.main(argv + ["--epochs", str(epochs)])
    helpers.check_run_files(out, [], epochs=epochs)


def test_the_interrupted_line_says_what_is_saved_and_the_command_that_goes_on(tmp_path):
  out = str(tmp_path / "run")
  argv = ["--dataset", "digits", "--out", out]
  config = config_lib.RunConfig(dataset="digits", out=out)
  command = shlex.join(["python", "-m", "experiments.cifar"] + argv)
  # Stopped before the run wrote anything: the same command starts it (--resume would not).
  assert cifar.interrupted_message(config, argv) == (
      f"interrupted before the run started: nothing is saved in {out}; start it again with: "
      f"{command}")
  os.makedirs(out)
  records.write_config(out, config)  # the first file a run writes
  assert cifar.interrupted_message(config, argv) == (
      f"interrupted: no epoch had finished; {out} is ready to start over; continue with: "
      f"{command} --resume")
  for epochs, saved in ((1, "epoch 1 is saved"), (3, "epochs 1-3 are saved")):
    records.write_jsonl(os.path.join(out, "metrics.jsonl"),
                        [{"epoch": e} for e in range(1, epochs + 1)])
    assert cifar.interrupted_message(config, argv) == (
        f"interrupted: {saved} in {out}; continue with: {command} --resume")


@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_converted_models_end_to_end_on_digits_and_mock_cifar10(tmp_path, model):
  # Digits (8x8x1) and mock CIFAR-10 (32x32x3): every file with every field; the run's
  # checkpoint, evaluated independently in eval mode, gives the logged validation accuracy.
  flags = ["--model", model, "--mode", "prox_cg3", "--tau-prox", "0.5", "--train-samples",
           "200", "--batch-size", "100", "--epochs", "2", "--dataset", "digits"]
  out = str(tmp_path / "digits")
  cifar.main(flags + ["--out", out, "--quiet"])
  _, metrics, _ = helpers.check_run_files(out, flags)
  trained, _ = train.load_model(out, (8, 8, 1))
  trained.eval()
  x, y = data.load("digits", seed=0)["val"]
  acc = (np.asarray(trained(jnp.asarray(x))).argmax(1) == y).mean()
  assert metrics[-1]["val_acc"] == acc
  flags = ["--model", model, "--mode", "prox_exact", "--train-samples", "16", "--batch-size",
           "8", "--epochs", "2", "--dataset", "cifar10"]
  out = str(tmp_path / "cifar10")
  with tfds.testing.mock_data(num_examples=16):
    cifar.main(flags + ["--out", out, "--data-dir", str(tmp_path), "--quiet"])
  helpers.check_run_files(out, flags)


def test_diagnostics_flag_logs_every_prox_layer_per_epoch_and_plots_them(tmp_path, capsys):
  out = str(tmp_path / "run")
  flags = ["--model", "mlp", "--mode", "prox_exact", "--tau-prox", "0.5", "--train-samples",
           "200", "--batch-size", "100", "--epochs", "2", "--dataset", "digits"]
  cifar.main(flags + ["--out", out, "--quiet", "--diagnostics"])
  metrics = helpers.read_metrics(out)
  layers = set(pp.conversion.prox_layers(train.load_model(out, (8, 8, 1))[0]))
  assert len(layers) == 3  # the MLP's three hidden layers; its head is plain
  for m in metrics:
    assert set(m["diagnostics"]) == layers
    for numbers in m["diagnostics"].values():
      assert numbers["relative_residual"] < 1e-3  # exact: float32 rounding only
      assert 0 < numbers["cosine_to_gradient"] <= 1 + 1e-6
      assert numbers["system"] in ("batch", "parameter") and numbers["fallback"] is False
  # The logged numbers are those of the checkpointed model on the first mini-batch.
  trained, _ = train.load_model(out, (8, 8, 1))
  x, y = data.load("digits", seed=0)["train"]
  again = pp.diagnostics(trained, train.batch_loss, jnp.asarray(x[:100]), jnp.asarray(y[:100]))
  for path, numbers in again.items():
    assert numbers["gradient_norm"] == pytest.approx(
        metrics[-1]["diagnostics"][path]["gradient_norm"], rel=1e-5)
  image = str(tmp_path / "diagnostics.png")
  plot.main([out, "--out", str(tmp_path / "runs.png"), "--diagnostics", image])
  assert f"wrote {image}" in capsys.readouterr().out
  with open(image, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_diagnostics_needs_prox_layers_and_the_global_batch(tmp_path, capsys):
  for flags, message in ((["--mode", "backprop"], "mode backprop has none"),
                         (["--parallel", "pmap"], "use --parallel sharded")):
    with pytest.raises(SystemExit) as exit_info:
      cifar.main(flags + ["--diagnostics", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
