"""experiments/cli.py: exit statuses, the continue command, no traceback.

The real Ctrl-C (a SIGINT sent to a running command): tests/test_cifar.py.
"""

import shlex

import pytest

from experiments import cli
from experiments import data
from experiments import train


def test_command_quotes_arguments_and_adds_resume_once():
  argv = ["--out", "runs/my run", "--lr", "0.1"]
  line = cli.command("experiments.cifar", argv, "--resume")
  assert shlex.split(line) == ["python", "-m", "experiments.cifar", *argv, "--resume"]
  assert cli.command("experiments.cifar", argv + ["--resume"], "--resume").count("--resume") == 1


def test_run_returns_the_result_of_its_body():
  assert cli.run(lambda: {"test_acc": 0.5}, lambda: "unused") == {"test_acc": 0.5}


def _wrapped_by_jax():
  # What a jitted call does with a KeyboardInterrupt raised in a Python callback (e.g. the
  # pytree metadata's __eq__): a ValueError whose cause is the interrupt.
  try:
    raise KeyboardInterrupt
  except KeyboardInterrupt as interrupt:
    raise ValueError("Exception raised while checking equality of metadata fields") from interrupt


@pytest.mark.parametrize("raised", ["plain", "wrapped"])
def test_keyboard_interrupt_becomes_exit_130_and_one_line(capsys, raised):
  def body():
    if raised == "wrapped":
      _wrapped_by_jax()
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_info:
    cli.run(body, lambda: "interrupted: continue with: python -m x --resume")
  assert exit_info.value.code == cli.EXIT_INTERRUPTED == 130
  assert exit_info.value.__context__ is None or exit_info.value.__suppress_context__
  assert capsys.readouterr().err == "\ninterrupted: continue with: python -m x --resume\n"


@pytest.mark.parametrize("error", [train.RunDirError("runs/x already holds a run"),
                                   data.DataNotPreparedError("CIFAR-10 is not prepared")])
def test_expected_errors_become_one_error_line(error):
  def body():
    raise error

  with pytest.raises(SystemExit) as exit_info:
    cli.run(body, lambda: "unused")
  assert exit_info.value.code == f"error: {error}"  # Python prints it and exits with 1


def test_other_errors_are_not_hidden():
  def body():
    raise ZeroDivisionError

  with pytest.raises(ZeroDivisionError):
    cli.run(body, lambda: "unused")

  def exits():
    raise SystemExit(cli.EXIT_DIVERGED)

  with pytest.raises(SystemExit) as exit_info:
    cli.run(exits, lambda: "unused")
  assert exit_info.value.code == cli.EXIT_DIVERGED
