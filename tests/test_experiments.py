"""Tests of the paper's experiments (``experiments/``): CLI, data, models, outputs, resume, grid.

Runs are tiny (a few hundred examples, 2 epochs): these tests check the plumbing and the
files, not the paper's numbers.
"""

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

import proxprop_jax as pp
from experiments import cifar, data, models, paper, plot, plots, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_FIELDS = {"epoch", "minibatch_avg_loss", "full_batch_loss", "full_batch_acc", "val_loss",
                 "val_acc", "epoch_time_s"}
SUMMARY_FIELDS = {"test_loss", "test_acc", "train_time_s", "steps_per_s", "device"}


def read_run(out):
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(out, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  return config, metrics, summary


def without_times(metrics):
  return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in metrics]


# ---------------------------------------------------------------------------- data


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
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.cifar", "--data-dir", str(empty), "--epochs", "1",
       "--out", str(tmp_path / "run")],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
  elapsed = time.perf_counter() - start
  assert proc.returncode != 0
  assert elapsed < 30, f"took {elapsed:.1f} s (interpreter and imports included)"
  for needed in ("not prepared", str(empty), "pip install -e '.[experiments,prepare]'",
                 "tfds.data_source('cifar10'", "--dataset digits"):
    assert needed in proc.stderr, (needed, proc.stderr)
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_unusable_prepared_cifar10_says_what_tfds_found(tmp_path):
  info = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
  info.parent.mkdir(parents=True)
  info.write_text("{}")
  with pytest.raises(data.DataNotPreparedError, match="tfds found .*dataset_info.json"):
    data.load("cifar10", data_dir=str(tmp_path))


# -------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_models_share_init_and_use_prox_layers_only_for_hidden_layers(name):
  shape = (8, 8, 1)
  plain = models.build(name, mode="backprop", input_shape=shape, seed=1)
  prox = models.build(name, mode="prox_cg3", input_shape=shape, tau_prox=0.5, seed=1)
  assert jax.tree.all(jax.tree.map(np.array_equal, nnx.state(plain, nnx.Param),
                                   nnx.state(prox, nnx.Param)))
  layers = [m for _, m in nnx.iter_graph(prox) if isinstance(m, (nnx.Linear, nnx.Conv))]
  head = prox.head
  hidden = [l for l in layers if l is not head]
  assert len(layers) == 4 and len(hidden) == 3
  assert all(isinstance(l, (pp.Linear, pp.Conv)) and l.mode == "prox_cg3" and l.tau_prox == 0.5
             for l in hidden)
  assert type(head) is nnx.Linear
  assert not any(isinstance(m, (pp.Linear, pp.Conv)) for _, m in nnx.iter_graph(plain))
  assert prox(jnp.zeros((2,) + shape)).shape == (2, 10)


def test_torch_default_init_bounds_for_kernel_and_bias():
  model = models.build("convnet", mode="backprop", input_shape=(32, 32, 3), seed=0)
  assert model.head.kernel.shape == (1280, 10)  # 8 * 8 * 20 for CIFAR-sized input
  for layer, fan_in in [(model.conv1, 5 * 5 * 3), (model.conv3, 5 * 5 * 20),
                        (model.head, 1280)]:
    bound = 1 / math.sqrt(fan_in)
    for p in (layer.kernel[...], layer.bias[...]):
      assert np.abs(p).max() <= bound
    # Uniform over the whole interval: the largest of many draws is close to the bound.
    assert np.abs(layer.kernel[...]).max() > 0.95 * bound
  assert np.abs(model.conv3.bias[...]).max() > 0.5 / math.sqrt(5 * 5 * 20)


# ------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("flags, valid", [
    (["--mode", "prox_cg0"], "prox_cgN (N >= 1)"),
    (["--mode", "exact"], "backprop, gradient, prox_exact"),
    (["--tau-prox", "0"], "> 0"),
    (["--tau-prox", "nan"], "> 0"),
    (["--model", "resnet"], "'convnet', 'mlp'"),
    (["--optimizer", "sgd"], "'adam', 'nesterov'"),
    (["--dataset", "mnist"], "'cifar10', 'digits'"),
    (["--parallel", "gpu"], "'auto', 'none', 'pmap', 'sharded'"),
    (["--epochs", "0"], "int > 0"),
    (["--batch-size", "-5"], "int > 0"),
])
def test_bad_flags_fail_at_once_naming_valid_values(flags, valid, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cifar.make_parser().parse_args(flags)
  assert exit_info.value.code == 2
  assert valid in capsys.readouterr().err


def test_defaults_are_the_reference_settings():
  args = cifar.make_parser().parse_args([])
  assert (args.model, args.mode, args.optimizer, args.lr, args.tau_prox, args.momentum,
          args.epochs, args.batch_size, args.dataset, args.parallel) == (
              "convnet", "prox_cg1", "adam", 1e-3, 1.0, 0.95, 50, 500, "cifar10", "auto")


def check_run_files(out, flags):
  config, metrics, summary = read_run(out)
  for flag, value in zip(flags[::2], flags[1::2]):
    assert str(config[flag.removeprefix("--").replace("-", "_")]) == value
  assert [m["epoch"] for m in metrics] == [1, 2]
  for m in metrics:
    assert set(m) == METRIC_FIELDS
    assert all(math.isfinite(v) for v in m.values())
    assert 0 <= m["full_batch_acc"] <= 1 and 0 <= m["val_acc"] <= 1 and m["epoch_time_s"] > 0
  assert metrics[0]["full_batch_loss"] != metrics[1]["full_batch_loss"]  # it trained
  assert SUMMARY_FIELDS <= set(summary) and 0 <= summary["test_acc"] <= 1
  assert summary["steps_per_s"] > 0 and "cpu" in summary["device"]
  assert summary["train_time_s"] == pytest.approx(sum(m["epoch_time_s"] for m in metrics))
  assert os.path.isdir(os.path.join(out, "checkpoints", "2"))
  return config, metrics, summary


@pytest.mark.parametrize("mode", ["backprop", "prox_exact", "prox_cg3"])
def test_cli_end_to_end_on_mock_cifar10(tmp_path, mode):
  out = str(tmp_path / mode)
  flags = ["--mode", mode, "--train-samples", "16", "--batch-size", "8", "--epochs", "2",
           "--dataset", "cifar10"]
  with tfds.testing.mock_data(num_examples=16):
    cifar.main(flags + ["--out", out, "--data-dir", str(tmp_path), "--quiet"])
  check_run_files(out, flags)


@pytest.mark.parametrize("model, mode", [("convnet", "backprop"), ("convnet", "prox_exact"),
                                         ("mlp", "prox_cg3")])
def test_cli_end_to_end_on_digits(tmp_path, model, mode):
  out = str(tmp_path / mode)
  flags = ["--model", model, "--mode", mode, "--optimizer", "nesterov", "--lr", "0.05",
           "--tau-prox", "0.5", "--train-samples", "250", "--batch-size", "100", "--epochs", "2",
           "--dataset", "digits"]
  cifar.main(flags + ["--out", out, "--quiet"])
  config, metrics, summary = check_run_files(out, flags)
  # The logged metrics are those of the checkpointed model: recompute them independently.
  trained, meta = train.load_model(out, (8, 8, 1))
  assert meta["epoch"] == 2 and without_times(meta["metrics"]) == without_times(metrics)
  splits = data.load("digits", seed=0)
  for split, key in [("val", "val"), ("test", "test")]:
    x, y = splits[split]
    logits = np.asarray(trained(jnp.asarray(x)), np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    loss, acc = -logp[np.arange(len(y)), y].mean(), (logits.argmax(1) == y).mean()
    logged = metrics[-1] if split == "val" else summary
    assert logged[f"{key}_loss"] == pytest.approx(loss, rel=1e-4)
    assert logged[f"{key}_acc"] == acc


# --------------------------------------------------------------------------- resume


RESUME_FLAGS = ["--dataset", "digits", "--mode", "prox_cg3", "--train-samples", "200",
                "--batch-size", "100", "--quiet"]


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
  whole, split, killed = (str(tmp_path / n) for n in ("whole", "split", "killed"))
  cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", whole])
  cifar.main(RESUME_FLAGS + ["--epochs", "1", "--out", split])
  cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", split, "--resume"])

  # A run killed in the middle of epoch 2 loses only that epoch.
  real_order = data.epoch_order

  def order_then_crash_in_epoch_2(seed, epoch, n):
    if epoch == 2:
      raise KeyboardInterrupt
    return real_order(seed, epoch, n)

  monkeypatch.setattr(train.data_lib, "epoch_order", order_then_crash_in_epoch_2)
  with pytest.raises(KeyboardInterrupt):
    cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", killed])
  monkeypatch.setattr(train.data_lib, "epoch_order", real_order)
  assert [m["epoch"] for m in read_metrics(killed)] == [1]
  cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", killed, "--resume"])

  _, expected, expected_summary = read_run(whole)
  for out in (split, killed):
    _, metrics, summary = read_run(out)
    assert without_times(metrics) == without_times(expected)
    assert (summary["test_loss"], summary["test_acc"]) == (expected_summary["test_loss"],
                                                           expected_summary["test_acc"])


def read_metrics(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_refuses_other_settings_and_rerun_refuses_to_overwrite(tmp_path, capsys):
  out = str(tmp_path / "run")
  cifar.main(RESUME_FLAGS + ["--epochs", "1", "--out", out, "--model", "convnet"])
  with pytest.raises(SystemExit, match="--resume to continue"):
    cifar.main(RESUME_FLAGS + ["--epochs", "1", "--out", out])
  with pytest.raises(SystemExit, match="'lr': \\(0.001, 0.1\\)"):
    cifar.main(RESUME_FLAGS + ["--epochs", "2", "--out", out, "--lr", "0.1", "--resume"])
  assert len(read_metrics(out)) == 1


# ----------------------------------------------------------------------- paper grid


@pytest.fixture(scope="module")
def paper_grid(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("paper"))
  figures = []
  real_figure = plots.paper_figure

  def spy(*args, **kwargs):
    figures.append(real_figure(*args, **kwargs))
    return figures[-1]

  plots.paper_figure = spy
  try:
    paper.main(["--out", out, "--dataset", "digits", "--epochs", "2", "--train-samples", "200",
                "--batch-size", "100", "--quiet"])
  finally:
    plots.paper_figure = real_figure
  return out, figures[0]


def test_paper_grid_writes_the_figure_and_results(paper_grid):
  out, fig = paper_grid
  with open(os.path.join(out, "figures.png"), "rb") as f:
    png = f.read()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
  assert os.path.getsize(os.path.join(out, "figures.pdf")) > 1000
  # The paper's panels: MLP 3 (loss vs epochs and time, val acc vs epochs), ConvNet 4.
  assert len(fig.axes) == 7
  lines = [len(ax.get_lines()) for ax in fig.axes]
  assert lines == [5, 5, 5, 3, 3, 3, 3]
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[0].startswith("MLP") and titles[3].startswith("ConvNet")
  assert sum("vs time" in t for t in titles) == 3
  # The PNG is the figure: 4 columns by 2 rows.
  import matplotlib.image
  height, width = matplotlib.image.imread(os.path.join(out, "figures.png")).shape[:2]
  assert width / height == pytest.approx(fig.get_figwidth() / fig.get_figheight(), rel=0.02)

  with open(os.path.join(out, "results.md")) as f:
    results = f.read()
  for name, label, model, *_ in paper.GRID:
    _, metrics, summary = read_run(os.path.join(out, name))
    row = [line for line in results.splitlines() if line.startswith(f"| {label} |")]
    expected = (f"| {label} | 2 | {metrics[-1]['full_batch_loss']:.4f} "
                f"| {max(m['val_acc'] for m in metrics):.4f} | {metrics[-1]['val_acc']:.4f} "
                f"| {summary['test_acc']:.4f} |")
    assert any(r.startswith(expected) for r in row), (expected, row)


def test_paper_grid_settings_are_the_papers(paper_grid):
  out, _ = paper_grid
  expected = {"mlp_backprop": ("nesterov", 0.05, None), "mlp_prox_exact": ("nesterov", 1, 0.05),
              "mlp_prox_cg10": ("nesterov", 1, 0.05), "convnet_backprop": ("adam", 1e-3, None),
              "convnet_prox_cg3": ("adam", 1e-3, 1.0)}
  for name, (optimizer, lr, tau) in expected.items():
    config, _, _ = read_run(os.path.join(out, name))
    assert (config["optimizer"], config["lr"]) == (optimizer, lr)
    assert config["mode"] == name.split("_", 1)[1] and config["model"] == name.split("_")[0]
    assert tau is None or config["tau_prox"] == tau
    assert config["momentum"] == 0.95 and config["epochs"] == 2


def test_paper_grid_skips_finished_runs(paper_grid, capsys):
  out, _ = paper_grid
  before = {n: os.path.getmtime(os.path.join(out, n, "metrics.jsonl")) for n, *_ in paper.GRID}
  paper.main(["--out", out, "--dataset", "digits", "--epochs", "2", "--train-samples", "200",
              "--batch-size", "100", "--only", "mlp", "--quiet"])
  assert capsys.readouterr().out.count("finished, skipped") == 5
  after = {n: os.path.getmtime(os.path.join(out, n, "metrics.jsonl")) for n, *_ in paper.GRID}
  assert before == after


def test_plot_cli_plots_any_runs(paper_grid, tmp_path, capsys):
  out, _ = paper_grid
  image = str(tmp_path / "two.png")
  plot.main([os.path.join(out, "mlp_backprop"), os.path.join(out, "convnet_prox_cg3"),
             "--out", image])
  table = capsys.readouterr().out
  assert "| mlp_backprop | 2 |" in table and "| convnet_prox_cg3 | 2 |" in table
  with open(image, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------- several devices


def test_several_devices_train_like_one_device(tmp_path):
  """``--parallel auto`` (sharded jit) and ``pmap`` on 2 CPU devices match one device."""
  flags = ["--dataset", "digits", "--mode", "prox_cg3", "--train-samples", "200",
           "--batch-size", "100", "--epochs", "2", "--quiet"]
  kinds = ("none", "auto", "pmap")
  script = ("import sys\nfrom experiments import cifar\n"
            f"for kind in {kinds!r}:\n"
            f"  cifar.main({flags!r} + ['--parallel', kind, '--out', sys.argv[1] + '/' + kind])\n")
  env = {**os.environ, "OPENBLAS_NUM_THREADS": "1",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = {kind: read_run(str(tmp_path / kind)) for kind in kinds}
  for kind, resolved in [("none", "none"), ("auto", "sharded"), ("pmap", "pmap")]:
    assert runs[kind][2]["device"].startswith("2 x")
    assert runs[kind][2]["device"].endswith(f"parallel={resolved}")
  _, expected, expected_summary = runs["none"]
  for kind in ("auto", "pmap"):
    _, metrics, summary = runs[kind]
    for m, e in zip(metrics, expected, strict=True):
      for key in METRIC_FIELDS - {"epoch_time_s"}:
        assert m[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (kind, key)
    assert summary["test_acc"] == pytest.approx(expected_summary["test_acc"], abs=1e-6)
