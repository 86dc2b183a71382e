"""The README's "Several devices" examples run as printed on fake CPU devices."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from tests import helpers

README = pathlib.Path(__file__).parents[1] / "README.md"


def _section() -> str:
  return re.search(r"\n## Several devices\n(.*?)\n## ", README.read_text(), re.S).group(1)


def test_several_devices_examples_run_as_printed_and_agree(tmp_path):
  section = _section()
  flags = re.search(r"```bash\nexport XLA_FLAGS=(\S+)\n```", section).group(1)
  examples = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(examples) == 2 and all(e.count("\n") <= 20 for e in examples)
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(flags), JAX_PLATFORMS="cpu")
  losses = []
  for i, example in enumerate(examples):
    script = tmp_path / f"example{i}.py"
    script.write_text(example)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    losses.append([float(line.split()[1]) for line in out.stdout.strip().splitlines()])
  jit_losses, pmap_losses = losses
  assert len(jit_losses) == 5 and jit_losses[-1] < jit_losses[0]
  np.testing.assert_allclose(pmap_losses, jit_losses, rtol=1e-5)  # as the README says


def test_several_devices_names_the_multi_host_flags_and_variables():
  section = _section()
  for name in ("--coordinator-address", "--num-processes", "--process-id",
               "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "gloo"):
    assert name in section, name
  from experiments import cifar  # the flags exist
  args = cifar.make_parser().parse_args(
      ["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "0",
       "--parallel", "sharded", "--model", "mlp", "--mode", "prox_cg3"])
  assert (args.coordinator_address, args.num_processes, args.process_id) == ("h:1", 2, 0)


def test_sharded_parameters_example_runs_as_printed_and_equals_replicated(tmp_path):
  section = re.search(r"\n## Sharded parameters\n(.*?)\n## ", README.read_text(), re.S).group(1)
  (example,) = re.findall(r"```python\n(.*?)```", section, re.S)
  assert example.count("\n") <= 25
  # The same model with its annotations dropped: replicated parameters, data parallel.
  replicated = re.sub(r"kernel_init=split\([^)]*\),\s*", "", example)
  assert "kernel_init=split" in example and "kernel_init=split" not in replicated
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  lines = []
  for i, code in enumerate((example, replicated)):
    script = tmp_path / f"sharded{i}.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines.append(out.stdout.strip().splitlines())
  (*sharded, specs), (*plain, plain_specs) = lines
  assert specs == "P(None, 'model') P('model',)" and plain_specs == "P() P()"
  losses = [[float(line.split()[1]) for line in run] for run in (sharded, plain)]
  assert len(losses[0]) == 5 and losses[0][-1] < losses[0][0]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
