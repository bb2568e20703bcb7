"""Writing benchmark results: one JSON file, replaced atomically.

The benchmarks call :func:`save_json` after every measured row, so a run cut short (a
device call's time limit, a crash) keeps what it measured and never leaves a
half-written file.
"""

from __future__ import annotations

import json
import os


def save_json(result, path) -> None:
  """Writes ``result`` to ``path`` through a temporary file and ``os.replace``."""
  if not path:
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)
