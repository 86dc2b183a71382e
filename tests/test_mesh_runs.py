"""``python -m experiments.cifar --mesh ...``: the MLP and the ViT with sharded parameters on 8
fake CPU devices.

One subprocess (the device count is fixed when JAX starts) runs both on digits with
``--mesh``, the MLP also with ``--parallel none`` (the same metrics: the ViT's layer kinds are
compared with one device in test_sharding.py), and prints where the mesh runs' kernels live.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import helpers

RUNS = {"mlp": ("data=4,model=2", ["--optimizer", "nesterov", "--lr", "1", "--tau-prox", "0.05"]),
        "vit": ("fsdp=2,model=4", [])}

SCRIPT = """
import json, sys
from experiments import cifar, config, train
out, runs = sys.argv[1], json.loads(sys.argv[2])
flags = ["--dataset", "digits", "--train-samples", "200", "--batch-size", "100", "--epochs", "1",
         "--mode", "prox_cg3", "--quiet", "--no-compile-cache"]
for model, (mesh, extra) in runs.items():
  common = flags + ["--model", model] + extra
  cifar.main(common + ["--mesh", mesh, "--out", f"{out}/{model}_mesh"])
  if model == "mlp":
    cifar.main(common + ["--parallel", "none", "--out", f"{out}/{model}_one"])
  devices = train.Devices("auto", mesh)
  with devices.context():
    net, _ = train.build(config.RunConfig(model=model, mode="prox_cg3"), (8, 8, 1), None,
                         devices.rules)
  kernel = net.hidden[1].kernel if model == "mlp" else net.blocks[0].attention.query.kernel
  print("SPEC", model, json.dumps(list(map(str, kernel.get_value().sharding.spec))))
"""


def test_mlp_and_vit_train_with_a_mesh(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.xla_flags(
      "--xla_force_host_platform_device_count=8"))
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(RUNS)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=helpers.REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  for model, (mesh, _) in RUNS.items():
    config, metrics, summary = helpers.read_run(str(tmp_path / f"{model}_mesh"))
    assert config["mesh"] == mesh and f"mesh {mesh}" in summary["device"]
    assert not summary["diverged"] and metrics[0]["full_batch_loss"] < 2.4  # about ln 10 or below
  one = helpers.read_run(str(tmp_path / "mlp_one"))
  assert "parallel=none" in one[2]["device"]
  mesh_metrics = helpers.without_times(helpers.read_run(str(tmp_path / "mlp_mesh"))[1])
  for got, want in zip(mesh_metrics, helpers.without_times(one[1]), strict=True):
    for key, value in want.items():
      assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got, want)
  specs = dict(line.split(" ", 2)[1:] for line in out.stdout.splitlines()
               if line.startswith("SPEC "))
  # The MLP's second layer is row-parallel (its input over model); the ViT's queries are
  # split by heads over model and FSDP over fsdp.
  assert json.loads(specs["mlp"]) == ["model", "None"], specs
  assert json.loads(specs["vit"]) == ["fsdp", "model", "None"], specs
