"""experiments/architectures.py: the grid's runs, figure and table (kept short for CI)."""

import os

import numpy as np

from experiments import architectures
from tests import helpers


def test_grid_covers_every_model_method_and_seed():
  runs = architectures.grid(taus=(0.5, 2.0), seeds=2)
  assert len(runs) == 3 * (1 + 2 * 2) * 2
  assert len({r.name for r in runs}) == len(runs)
  assert {r.method for r in runs if r.model == "vit"} == {
      "backprop", "prox_exact τ=0.5", "prox_exact τ=2", "prox_cg3 τ=0.5", "prox_cg3 τ=2"}


# Two of the three models (each run compiles its model): the grid, figure and table do not
# depend on which; tests/test_cifar.py trains the resnet end to end.
FLAGS = ["--models", "vit", "convnet", "--epochs", "1", "--seeds", "1", "--taus", "1",
         "--train-samples", "200", "--batch-size", "100"]


def test_one_epoch_one_seed_on_digits_writes_the_figure_and_table(tmp_path):
  out = str(tmp_path)
  found = architectures.main(["--out", out] + FLAGS)
  assert set(found) == {"vit", "convnet"}
  for ext in ("png", "pdf"):
    assert os.path.getsize(os.path.join(out, f"figures.{ext}")) > 10_000
  table = open(os.path.join(out, "results.md")).read()
  for model, by_method in found.items():
    assert f"### {model}" in table
    assert set(by_method) == {"backprop", "prox_exact τ=1", "prox_cg3 τ=1"}
    for method, (run,) in by_method.items():
      helpers.read_run(run["dir"])  # every file of a finished run
      acc = run["summary"]["test_acc"]
      assert f"| {method} | 1 | 1 | " in table and f"{acc:.4f} ± 0.0000" in table
      assert np.isfinite(run["metrics"][-1]["full_batch_loss"])
  # A second call trains nothing: every run is finished and kept.
  mtime = os.path.getmtime(os.path.join(out, "vit_backprop_seed0", "summary.json"))
  architectures.main(["--out", out] + FLAGS)
  assert os.path.getmtime(os.path.join(out, "vit_backprop_seed0", "summary.json")) == mtime
