"""experiments/paper.py: the grid's runs, re-runs with other flags, divergence, figures, table."""

import os

import shlex

import matplotlib.image
import pytest

from experiments import config as config_lib
from experiments import data
from experiments import paper
from experiments import plots
from experiments import records
from tests import helpers

GRID_FLAGS = ["--dataset", "digits", "--train-samples", "200", "--batch-size", "100", "--quiet"]


def results_rows(out):
  with open(os.path.join(out, "results.md")) as f:
    return [line for line in f.read().splitlines() if line.startswith("| ")]


def test_paper_grid_writes_the_figure_and_results(paper_grid):
  out = paper_grid
  with open(os.path.join(out, "figures.png"), "rb") as f:
    png = f.read()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
  assert os.path.getsize(os.path.join(out, "figures.pdf")) > 1000
  fig = paper.write_results(out, paper.finished_runs(out, config_lib.PAPER_GRID))
  # Both rows: loss vs epochs, loss vs time, validation error vs epochs, vs time; no empty slot.
  assert len(fig.axes) == 8
  assert [len(ax.get_lines()) for ax in fig.axes] == [5, 5, 5, 5, 3, 3, 3, 3]
  titles = [ax.get_title() for ax in fig.axes]
  assert [t.split(": ", 1)[1] for t in titles[:4]] == [t.split(": ", 1)[1] for t in titles[4:]]
  assert titles[0].startswith("MLP") and titles[4].startswith("ConvNet")
  assert sum("vs time" in t for t in titles) == 4
  assert [ax.get_yscale() for ax in fig.axes] == ["log"] * 8
  # One colour per method in both rows (BackProp, cg3 and cg10 are in both).
  colour = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes]
  for label in ("BackProp", "ProxProp (cg3)", "ProxProp (cg10)"):
    assert len({c[label] for c in colour}) == 1, label
  assert len(set(colour[0].values())) == 5
  assert fig.get_suptitle() == "ProxProp paper grid: digits, batch 100, 2 epochs"
  # The PNG is the figure: 4 columns by 2 rows.
  height, width = matplotlib.image.imread(os.path.join(out, "figures.png")).shape[:2]
  assert width / height == pytest.approx(fig.get_figwidth() / fig.get_figheight(), rel=0.02)

  rows = results_rows(out)
  for run in config_lib.PAPER_GRID:
    _, metrics, summary = helpers.read_run(os.path.join(out, run.name))
    label = plots.method_label(run.mode)
    expected = (f"| {label} | 2 | {metrics[-1]['full_batch_loss']:.4f} "
                f"| {max(m['val_acc'] for m in metrics):.4f} | {metrics[-1]['val_acc']:.4f} "
                f"| {summary['test_acc']:.4f} |")
    assert any(r.startswith(expected) for r in rows), (expected, rows)


def test_paper_grid_settings_are_the_papers(paper_grid):
  expected = {"mlp_backprop": ("nesterov", 0.05, None), "mlp_prox_exact": ("nesterov", 1, 0.05),
              "mlp_prox_cg10": ("nesterov", 1, 0.05), "convnet_backprop": ("adam", 1e-3, None),
              "convnet_prox_cg3": ("adam", 1e-3, 1.0)}
  for name, (optimizer, lr, tau) in expected.items():
    config, _, _ = helpers.read_run(os.path.join(paper_grid, name))
    assert (config["optimizer"], config["lr"]) == (optimizer, lr)
    assert config["mode"] == name.split("_", 1)[1] and config["model"] == name.split("_")[0]
    assert tau is None or config["tau_prox"] == tau
    assert config["momentum"] == 0.95 and config["epochs"] == 2


def mtimes(out):
  return {r.name: os.path.getmtime(os.path.join(out, r.name, "metrics.jsonl"))
          for r in config_lib.PAPER_GRID}


def test_paper_grid_keeps_finished_runs(paper_grid, capsys):
  before = mtimes(paper_grid)
  paper.main(["--out", paper_grid, "--epochs", "2", "--only", "mlp"] + GRID_FLAGS)
  assert capsys.readouterr().out.count("finished, kept") == 5
  assert mtimes(paper_grid) == before


def test_fewer_epochs_and_half_the_grid_neither_reuse_nor_hide_the_runs(paper_grid, capsys):
  before, rows_before = mtimes(paper_grid), results_rows(paper_grid)
  paper.main(["--out", paper_grid, "--epochs", "1", "--only", "convnet"] + GRID_FLAGS)
  said = capsys.readouterr().out
  assert said.count("finished with 2 epochs, more than --epochs 1; not shortened") == 3
  assert mtimes(paper_grid) == before
  # results.md still describes all 8 runs, each with its real 2 epochs.
  assert results_rows(paper_grid) == rows_before
  assert sum(r.split(" | ")[1] == "2" for r in results_rows(paper_grid)) == 8
  assert "2 epochs" in said and "1 epochs" not in said


def test_extends_reports_other_settings_and_records_divergence(tmp_path, capsys):
  out = str(tmp_path)
  # A ProxProp-gradient MLP at lr 3 diverges within a few epochs; the grid goes on after it.
  grid = [config_lib.PaperRun("mlp_diverges", "mlp", "gradient", "nesterov", 3.0, 1.0),
          config_lib.PaperRun("convnet_backprop", "convnet", "backprop", "adam", 1e-3, 1.0)]
  paper.main(["--out", out, "--epochs", "8"] + GRID_FLAGS, grid=grid)
  diverged = helpers.read_json(os.path.join(out, "mlp_diverges", "summary.json"))
  assert diverged["diverged"] is True and 2 <= diverged["diverged_epoch"] <= 8
  k = diverged["diverged_epoch"]
  assert "diverged: mlp_diverges" in capsys.readouterr().out
  helpers.check_run_files(os.path.join(out, "convnet_backprop"), [], epochs=8)
  assert any(f"| ProxProp (gradient) | {k - 1} |" in r and f"diverged at epoch {k}" in r
             for r in results_rows(out))

  # More epochs for half the grid: the finished run is extended, the diverged one kept.
  paper.main(["--out", out, "--epochs", "10"] + GRID_FLAGS, grid=grid)
  said = capsys.readouterr().out
  assert "finished with 8 epochs; extending to 10" in said
  assert f"diverged at epoch {k} before; recorded as such" in said
  helpers.check_run_files(os.path.join(out, "convnet_backprop"), [], epochs=10)
  rows = results_rows(out)
  assert any(r.startswith("| BackProp | 10 |") for r in rows)
  assert any(f"diverged at epoch {k}" in r for r in rows)

  # Other settings: reported, not reused, not retrained, still described.
  before = os.path.getmtime(os.path.join(out, "convnet_backprop", "metrics.jsonl"))
  paper.main(["--out", out, "--epochs", "10", "--only", "convnet", "--seed", "1"] + GRID_FLAGS,
             grid=grid)
  said = capsys.readouterr().out
  assert "holds a run with other settings" in said and "'seed': (0, 1)" in said
  assert os.path.getmtime(os.path.join(out, "convnet_backprop", "metrics.jsonl")) == before
  assert results_rows(out) == rows
  # Epochs differ between the runs: the figure's title does not claim one count.
  assert f"{k - 1}-10 epochs" in said


def test_plan_starts_new_folders_resumes_runs_and_leaves_other_files_alone(tmp_path):
  config = paper.run_config(config_lib.RunConfig(dataset="digits"), str(tmp_path),
                            config_lib.PAPER_GRID[0])
  assert paper.plan(config) == (config, "starting") and not config.resume
  os.makedirs(config.out)
  with open(os.path.join(config.out, "notes.txt"), "w") as f:
    f.write("mine")
  assert paper.plan(config) == (
      None, "holds other files but no run; not used, left as it is (move them away)")
  os.remove(os.path.join(config.out, "notes.txt"))
  records.write_config(config.out, config)  # a run stopped before its first epoch
  todo, what = paper.plan(config)
  assert todo.resume and what == "resuming after epoch 0"


def test_interrupted_grid_says_how_to_continue_and_continues(tmp_path, capsys, monkeypatch):
  out = str(tmp_path)
  grid = [config_lib.PaperRun("convnet_backprop", "convnet", "backprop", "adam", 1e-3, 1.0)]
  argv = ["--out", out, "--epochs", "3"] + GRID_FLAGS
  real_order = data.epoch_order

  def crash_in_epoch_3(seed, epoch, n):  # as Ctrl-C would, in the middle of epoch 3
    if epoch == 3:
      raise KeyboardInterrupt
    return real_order(seed, epoch, n)

  monkeypatch.setattr(data, "epoch_order", crash_in_epoch_3)
  with pytest.raises(SystemExit) as exit_info:
    paper.main(argv, grid=grid)
  assert exit_info.value.code == 130
  line = capsys.readouterr().err.strip()
  assert line.startswith(f"interrupted: finished runs and epochs are saved in {out}")
  assert shlex.split(line.split("continue with: ")[1]) == (["python", "-m", "experiments.paper"]
                                                          + argv)
  assert len(helpers.read_metrics(os.path.join(out, "convnet_backprop"))) == 2
  monkeypatch.setattr(data, "epoch_order", real_order)
  paper.main(argv, grid=grid)
  assert "resuming after epoch 2" in capsys.readouterr().out
  helpers.check_run_files(os.path.join(out, "convnet_backprop"), [], epochs=3)
