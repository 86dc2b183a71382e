"""experiments/plots.py and experiments/plot.py: panels, colours, labels, tables, odd folders."""

import os

import matplotlib
import pytest

from experiments import config as config_lib
from experiments import plot
from experiments import plots
from experiments import records


def fake_run(model, mode, accs, dataset="digits", label=None, summary=None):
  """A run dict as `plots.load_run` returns it, with validation accuracies ``accs``."""
  config = dict(model=model, mode=mode, dataset=dataset, batch_size=500, tau_prox=0.05,
                optimizer="nesterov", lr=1.0)
  metrics = [dict(epoch=i + 1, full_batch_loss=1.0 / (i + 1), val_acc=a, epoch_time_s=0.5)
             for i, a in enumerate(accs)]
  return dict(label=label or plots.method_label(mode), dir=f"/runs/{model}_{mode}",
              config=config, metrics=metrics,
              summary=summary or dict(test_acc=accs[-1] if accs else None, epochs=len(accs)))


def test_rows_share_panel_order_and_colours_per_method():
  fig = plots.paper_figure({
      "mlp": [fake_run("mlp", m, [0.9, 0.95]) for m in ("backprop", "prox_exact", "prox_cg3")],
      "convnet": [fake_run("convnet", m, [0.9, 0.95]) for m in ("prox_cg3", "backprop")]})
  assert len(fig.axes) == 8
  titles = [ax.get_title().split(": ", 1)[1] for ax in fig.axes]
  assert titles[:4] == titles[4:] == ["training loss vs epochs", "training loss vs time",
                                      "validation error vs epochs", "validation error vs time"]
  colours = {}
  for ax in fig.axes:
    for line in ax.get_lines():
      colours.setdefault(line.get_label(), set()).add(line.get_color())
  assert all(len(c) == 1 for c in colours.values()), colours
  assert len({c.pop() for c in colours.values()}) == 3


def test_validation_error_on_a_log_axis_separates_close_accuracies():
  fig = plots.runs_figure([fake_run("mlp", "backprop", [0.97, 0.975]),
                           fake_run("mlp", "prox_cg3", [0.98, 0.985])])
  error_panel = fig.axes[2]
  assert error_panel.get_yscale() == "log"
  lines = error_panel.get_lines()
  assert list(lines[0].get_ydata()) == pytest.approx([0.03, 0.025])
  assert list(lines[1].get_ydata()) == pytest.approx([0.02, 0.015])


def test_seed_runs_are_one_mean_curve_with_a_min_max_band_per_method():
  seeds = lambda mode, accs: [fake_run("vit", mode, a, label=mode) for a in accs]
  fig = plots.seeds_figure({"vit": {"backprop": seeds("backprop", [[0.9, 0.94], [0.8, 0.96]]),
                                    "prox_cg3": seeds("prox_cg3", [[0.9, 0.97, 0.99]])}})
  assert [ax.get_title() for ax in fig.axes] == [
      "ViT: training loss vs epochs", "ViT: training loss vs time",
      "ViT: validation error vs epochs", "ViT: validation error vs time"]
  error_panel = fig.axes[2]
  backprop, cg3 = error_panel.get_lines()
  assert backprop.get_label() == "backprop (2 seeds)" and cg3.get_label() == "prox_cg3"
  assert list(backprop.get_ydata()) == pytest.approx([0.15, 0.05])  # mean of the two seeds
  assert list(cg3.get_ydata()) == pytest.approx([0.1, 0.03, 0.01])
  # The band spans the seeds (min to max) for the method with several; one run has none.
  (band,) = error_panel.collections
  ys = band.get_paths()[0].vertices[:, 1]
  assert min(ys) == pytest.approx(0.04) and max(ys) == pytest.approx(0.2)
  assert band.get_facecolor()[0][:3] == pytest.approx(matplotlib.colors.to_rgb(
      backprop.get_color()))


def test_results_table_rows_for_finished_diverged_and_empty_runs():
  table = plots.results_table([
      fake_run("mlp", "backprop", [0.5, 0.75]),
      fake_run("mlp", "gradient", [0.2], summary=dict(diverged=True, diverged_epoch=2,
                                                      epochs=1, test_acc=None)),
      fake_run("mlp", "prox_cg3", [], summary=None)])
  rows = table.splitlines()[2:]
  assert rows[0] == "| BackProp | 2 | 0.5000 | 0.7500 | 0.7500 | 0.7500 | 0.500 |"
  assert rows[1] == ("| ProxProp (gradient) | 1 | 1.0000 | 0.2000 | 0.2000 "
                     "| diverged at epoch 2 | 0.500 |")
  assert rows[2] == "| ProxProp (cg3) | 0 | – | – | – | – | – |"


def test_title_states_only_what_the_runs_share():
  same = [fake_run("mlp", "backprop", [0.5, 0.6]), fake_run("mlp", "prox_cg3", [0.5, 0.7])]
  assert plots.describe_runs(same) == "digits, batch 500, 2 epochs"
  mixed = same + [fake_run("convnet", "backprop", [0.5, 0.6, 0.7], dataset="cifar10")]
  assert plots.describe_runs(mixed) == ("datasets cifar10, digits, batch 500, 2-3 epochs "
                                        "(per run: see the table)")
  assert plots.mixed_settings(same) == []
  warnings = plots.mixed_settings(mixed)
  assert len(warnings) == 2 and "convnet, mlp" in warnings[0] and "cifar10, digits" in warnings[1]


def test_run_labels_from_the_config():
  config = dict(model="mlp", mode="prox_cg3", tau_prox=0.05, optimizer="nesterov", lr=1.0)
  assert plots.run_label(config) == "mlp prox_cg3 τ=0.05 nesterov lr=1"
  assert plots.run_label(dict(config, mode="backprop", lr=0.05)) == "mlp backprop nesterov lr=0.05"


def test_plot_cli_plots_any_runs(paper_grid, tmp_path, capsys):
  image = str(tmp_path / "two.png")
  plot.main([os.path.join(paper_grid, "mlp_backprop"),
             os.path.join(paper_grid, "convnet_prox_cg3"), "--out", image])
  captured = capsys.readouterr()
  assert "| mlp backprop nesterov lr=0.05 | 2 |" in captured.out
  assert "| convnet prox_cg3 τ=1 adam lr=0.001 | 2 |" in captured.out
  assert "warning: these runs mix models (convnet, mlp)" in captured.err
  with open(image, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_cli_labels_and_title(paper_grid, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text stays text in SVG
  image = str(tmp_path / "two.svg")
  plot.main([os.path.join(paper_grid, "mlp_prox_cg3"),
             os.path.join(paper_grid, "mlp_prox_cg5"), "--labels", "three steps", "five steps",
             "--title", "CG steps", "--out", image])
  assert "| three steps | 2 |" in capsys.readouterr().out
  with open(image) as f:
    svg = f.read()
  for text in ("three steps", "five steps", "CG steps"):
    assert text in svg
  with pytest.raises(SystemExit):
    plot.main([os.path.join(paper_grid, "mlp_prox_cg3"), "--labels", "a", "b"])
  assert "--labels gives 2 labels for 1 runs" in capsys.readouterr().err


def test_plot_cli_handles_a_run_interrupted_before_its_first_epoch(tmp_path, capsys):
  run = tmp_path / "interrupted"
  run.mkdir()
  records.write_config(str(run), config_lib.RunConfig(model="mlp", mode="prox_cg3",
                                                      out=str(run)))
  records.write_jsonl(str(run / "metrics.jsonl"), [])  # what an interrupted run leaves
  image = str(tmp_path / "one.png")
  plot.main([str(run), "--out", image])
  captured = capsys.readouterr()
  assert "| mlp prox_cg3 τ=1 adam lr=0.001 | 0 | – | – | – | – | – |" in captured.out
  assert "has no finished epoch yet" in captured.err
  assert os.path.getsize(image) > 1000


def test_plot_cli_diagnostics_of_runs_without_them_is_an_error(paper_grid, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    plot.main([os.path.join(paper_grid, "mlp_prox_cg3"), "--out", str(tmp_path / "a.png"),
               "--diagnostics", str(tmp_path / "d.png")])
  assert exit_info.value.code == 2
  assert "none of these runs logged diagnostics" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "a.png")
