"""Thread-local collectors: what was traced inside a ``with`` block (plans, op calls)."""

from __future__ import annotations

import contextlib
import threading


class Recorder:
  """Items added while one or more `collecting` blocks are open go to each of them."""

  def __init__(self):
    self._local = threading.local()

  @contextlib.contextmanager
  def collecting(self):
    stack = self._local.__dict__.setdefault("stack", [])
    items = []
    stack.append(items)
    try:
      yield items
    finally:
      stack.remove(items)

  def add(self, item) -> None:
    for items in getattr(self._local, "stack", ()):
      items.append(item)
