"""The README's quickstart and "Any Flax model" examples run as printed, and its test command
is CI's."""

import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).parents[1]
README = REPO / "README.md"


def test_quickstart_runs_as_printed_and_lowers_the_loss(tmp_path):
  quickstart, printed = re.search(r"## Quickstart.*?```python\n(.*?)```.*?```text\n(.*?)```",
                                  README.read_text(), re.S).groups()
  assert quickstart.count("\n") <= 20
  script = tmp_path / "quickstart.py"
  script.write_text(quickstart)
  # On the CPU, where the README's printout comes from (a GPU's TF32 products, the default
  # precision there, can change its last digit).
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       check=True, env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
  assert out == printed
  losses = [float(line.split()[1]) for line in out.strip().splitlines()]
  assert len(losses) == 5 and losses[-1] < losses[0]


def _any_model_blocks():
  section = re.search(r"\n## Any Flax model\n(.*?)\n## ", README.read_text(), re.S).group(1)
  code = [textwrap.dedent(block) for _, block in
          re.findall(r"^( *)```python\n(.*?)^\1```", section, re.S | re.M)]
  printed = [textwrap.dedent(block) for _, block in
             re.findall(r"^( *)```text\n(.*?)^\1```", section, re.S | re.M)]
  return code, printed


def test_any_flax_model_examples_run_as_printed(tmp_path):
  code, printed = _any_model_blocks()
  transformer, _, resnet = code[:3]
  assert transformer.count("\n") <= 15 and resnet.count("\n") <= 15
  script = tmp_path / "any_model.py"
  script.write_text("".join(code))  # the blocks continue one another
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600,  # on the CPU, as the quickstart
                       env=dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  report, training, resnet_report = printed
  # Everything is printed exactly as the README shows it (rerun the section's code and paste
  # its output when a counterpart is added): the reports, the losses and the diagnostics.
  assert out.stdout == report + training + resnet_report + "ReusedParameterError\n"
  losses = [float(line.split()[1]) for line in lines if re.fullmatch(r"\d \S+", line)]
  assert len(losses) == 5 and losses[-1] < losses[0]


def _pytest_command(text: str) -> list:
  """The arguments of the ``python -m pytest`` command in ``text``."""
  line = re.search(r"python -m pytest .*", text).group(0)
  return shlex.split(line)


def test_the_readme_test_command_is_cis_and_pytest_runs_without_xdist():
  ci = _pytest_command((REPO / ".ci" / "run").read_text())
  assert _pytest_command(README.read_text()) == ci
  assert {"-n", "--dist", "-W"} <= set(ci) and "error::FutureWarning" in ci
  # Without pytest-xdist (or its options) the tests run in one process.
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
  proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-q",
                         "tests/test_cli.py"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert re.search(r"\b\d+ passed in\b", proc.stdout), proc.stdout[-3000:]
