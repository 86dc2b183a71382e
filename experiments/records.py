"""The files of a run folder, written so that a kill at any moment leaves them whole.

A run folder (``--out``) holds ``config.json`` (the settings and the software versions),
``metrics.jsonl`` (one line per finished epoch), ``summary.json`` (once the run is finished
or has diverged) and orbax ``checkpoints/``. JSON files are written to a temporary file and
renamed over the old one (a rename is atomic), a metrics line is appended with one ``write``
of the whole line, so a reader sees either the old or the new file, never half of one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
CHECKPOINTS = "checkpoints"
PACKAGES = ("proxprop_jax", "jax", "jaxlib", "flax", "optax")


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically."""
  write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str, rows) -> None:
  """Writes one JSON object per line to ``path`` atomically."""
  write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: str, row) -> None:
  """Appends one JSON line with a single ``write`` (O_APPEND), flushed to disk."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, (json.dumps(row) + "\n").encode())
    os.fsync(fd)
  finally:
    os.close(fd)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to a temporary file next to ``path``, then renames it to ``path``."""
  tmp = f"{path}.{os.getpid()}.tmp"  # one writer per process; the umask sets its mode
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_json(path: str):
  """The JSON object in ``path``, or None if there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_jsonl(path: str) -> list:
  """The JSON lines of ``path`` ([] if there is no such file or it is empty)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def versions() -> dict:
  """Installed versions of the packages a run's numbers depend on, and the git commit."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  out["git_commit"] = git_commit()
  return out


def git_commit() -> str | None:
  """The commit of the checkout this code runs from (``+dirty`` with local changes), or None."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None  # not a checkout, or no git
  return commit + ("+dirty" if dirty else "")


def write_config(run_dir: str, config) -> None:
  """``config.json``: the run's settings (a `RunConfig`) and the software versions."""
  write_json(os.path.join(run_dir, CONFIG), {**dataclasses.asdict(config),
                                             "versions": versions()})


@dataclasses.dataclass(frozen=True)
class RunState:
  """What a run folder holds.

  status: ``"new"`` (no run there yet), ``"started"`` (config written, unfinished),
    ``"finished"`` or ``"diverged"``.
  config: its ``config.json`` (None if none).
  summary: its ``summary.json`` (None unless finished or diverged).
  epochs: epochs with metrics written.
  """

  status: str
  config: dict | None
  summary: dict | None
  epochs: int


def run_state(run_dir: str) -> RunState:
  """Reads what `RunState` describes from ``run_dir`` (which need not exist)."""
  config = read_json(os.path.join(run_dir, CONFIG))
  summary = read_json(os.path.join(run_dir, SUMMARY))
  epochs = len(read_jsonl(os.path.join(run_dir, METRICS)))
  if summary is not None:
    status = "diverged" if summary.get("diverged") else "finished"
  else:
    status = "new" if config is None else "started"
  return RunState(status, config, summary, epochs)


def settings_differ(saved: dict, config, keys) -> dict:
  """``{key: (saved, now)}`` for the ``keys`` whose values differ between a saved config dict
  and a `RunConfig` (a key the saved run predates counts as its default)."""
  default = type(config)()
  saved = {k: saved.get(k, getattr(default, k)) for k in keys}
  return {k: (saved[k], getattr(config, k)) for k in keys if saved[k] != getattr(config, k)}
