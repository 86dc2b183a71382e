"""The README's quickstart runs as printed and trains."""

import pathlib
import re
import subprocess
import sys

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
