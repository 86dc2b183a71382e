"""The README's quickstart and "Any Flax model" examples run as printed."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_quickstart_runs_as_printed_and_lowers_the_loss(tmp_path):
  quickstart = re.search(r"## Quickstart.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
  assert quickstart.count("\n") <= 20
  script = tmp_path / "quickstart.py"
  script.write_text(quickstart)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       check=True).stdout
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
                       timeout=600, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  report, training, resnet_report = printed
  # The reports are printed exactly as the README shows them (rerun the section's code and
  # paste its output when a counterpart is added).
  assert "\n".join(lines[:report.count("\n")]) + "\n" == report
  losses = [float(line.split()[1]) for line in lines if re.fullmatch(r"\d \S+", line)]
  assert len(losses) == 5 and losses[-1] < losses[0]
  diagnosed = [line.split()[0] for line in lines if "'relative_residual'" in line]
  assert diagnosed == [line.split()[0] for line in training.splitlines() if "{" in line]
  assert "\n".join(lines).find(resnet_report.strip()) >= 0
  assert lines[-1] == "ReusedParameterError"
