"""What the command-line entry points share: exit statuses and what they say when a run stops.

Exit statuses: 0 done, 1 an error with a message (``error: ...``), 2 bad flags (argparse), 3 a
run diverged, 130 interrupted (Ctrl-C). An interrupted command prints one line with the exact
command that continues it, and no traceback.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Callable

from experiments import data as data_lib
from experiments import train

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


def command(module: str, argv, *extra: str) -> str:
  """The shell command ``python -m module argv... extra...`` (``extra`` only if not in argv)."""
  args = list(argv) + [e for e in extra if e not in argv]
  return shlex.join(["python", "-m", module] + args)


def run(body: Callable[[], object], interrupted: Callable[[], str]):
  """Runs ``body()``; turns Ctrl-C and the runs' expected errors into one line and an exit.

  Args:
    body: the command's work.
    interrupted: the line to print on Ctrl-C (what is saved, how to continue); called then.

  Raises:
    SystemExit: 130 on Ctrl-C; 1 with ``error: ...`` for unprepared data or an unusable
      ``--out``.
  """
  try:
    return body()
  except (data_lib.DataNotPreparedError, train.RunDirError) as e:
    raise SystemExit(f"error: {e}") from None
  except BaseException as e:
    if not _caused_by_ctrl_c(e):
      raise
    print(f"\n{interrupted()}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED) from None


def _caused_by_ctrl_c(error: BaseException) -> bool:
  """Whether ``error`` is a Ctrl-C: a `KeyboardInterrupt`, or one that JAX's C++ code turned
  into another exception (raised inside a Python callback of a jitted call, e.g. flax's
  ``__eq__`` on the pytree metadata, it comes back as a ``ValueError`` caused by it)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, KeyboardInterrupt):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


def main(entry: Callable[[], object]) -> None:
  """Runs a command's ``main`` as the program (its ``__main__`` block).

  An interrupted program leaves at once with status 130 (`os._exit`), after `run` printed its
  line: by then every file is closed (metrics lines and checkpoints are written whole, the
  checkpoint manager is closed), while the interpreter's normal shutdown, reached mid-compile,
  crashed (SIGSEGV) or hung in XLA's teardown. In-process callers of ``main`` (tests,
  notebooks) get the `SystemExit` of `run` instead and keep their own Ctrl-C handling.
  """
  try:
    entry()
  except SystemExit as e:
    if e.code == EXIT_INTERRUPTED:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(EXIT_INTERRUPTED)
    raise
