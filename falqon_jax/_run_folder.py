"""A fine-tuning run's folder: checked before any work, locked while in use, one true record.

:class:`RunFolder` is what ``falqon-jax finetune`` writes through:

* ``open()`` makes the folder (or finds it) and checks that it can be written, so a bad
  ``--output_dir`` fails in one line before minutes of work; then it takes an exclusive
  lock (``.lock``, ``fcntl.flock``), so a second run on the same folder is refused
  instead of interleaving its records with the first one's.
* ``metrics.jsonl`` rows are appended as the run goes; on resume, rows past the restored
  checkpoint (written before a crash) are dropped, so each step appears once.
* ``config.yaml`` holds the settings the run continues with; ``config_history.jsonl``
  one line per start (``start_step``, the full config), so a resume with other settings
  never loses the record of the earlier part.
* JSON is strict: a non-finite float is written as ``null``.

Example:
  >>> import tempfile
  >>> with RunFolder(tempfile.mkdtemp()) as folder:
  ...   folder.append_metrics({"step": 1, "loss": float("nan")})
  ...   folder.read_metrics()
  [{'step': 1, 'loss': None}]
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Optional

from falqon_jax.errors import UserInputError

try:
  import fcntl
except ImportError:  # not POSIX: no lock, the rest works
  fcntl = None

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
CONFIG_HISTORY = "config_history.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"


class RunFolderError(UserInputError):
  """The output folder cannot be used: not creatable, not writable, or in use."""


def json_safe(value: Any) -> Any:
  """``value`` with every non-finite float replaced by None (JSON has no NaN).

  >>> json_safe({"a": [1.0, float("inf")], "b": float("nan")})
  {'a': [1.0, None], 'b': None}
  """
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


def dumps(value: Any, **kwargs) -> str:
  return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temp file and a rename: never half-written."""
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


class RunFolder:
  """The run folder at ``path``; ``writer=False`` (other hosts) only reads and never locks."""

  def __init__(self, path: str, *, writer: bool = True):
    self.path = os.path.abspath(path)
    self.writer = writer
    self._lock = None
    self._created = False

  def __enter__(self) -> "RunFolder":
    return self.open()

  def __exit__(self, *exc) -> None:
    self.close()

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def open(self) -> "RunFolder":
    """Creates the folder if needed, checks it is writable and locks it."""
    if not self.writer:
      return self
    where = f"output_dir {self.path}"
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise RunFolderError(f"{where} is a file; choose a folder path for --output_dir")
    self._created = not os.path.exists(self.path)
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise RunFolderError(f"{where} cannot be created ({e.strerror}); choose another"
                           " --output_dir") from None
    try:
      with tempfile.TemporaryFile(dir=self.path):
        pass
      self._lock = open(self.file(LOCK), "a+")
    except OSError as e:
      self._remove_if_created()
      raise RunFolderError(f"{where} is not writable ({e.strerror}); choose another"
                           " --output_dir") from None
    if fcntl is not None:
      try:
        fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        self._lock.seek(0)
        holder = self._lock.read().strip() or "unknown"
        self._lock.close()
        self._lock = None
        raise RunFolderError(f"{where} is in use by another run (pid {holder}); wait for it"
                             " to finish or choose another --output_dir") from None
    self._lock.seek(0)
    self._lock.truncate()
    self._lock.write(f"{os.getpid()}\n")
    self._lock.flush()
    return self

  def close(self) -> None:
    """Releases the lock; a folder this run created and left empty is removed."""
    if self._lock is not None:
      self._lock.close()  # closing the file releases the flock
      self._lock = None
      self._remove_if_created()

  def _remove_if_created(self) -> None:
    if self._created and set(os.listdir(self.path)) <= {LOCK}:
      for name in os.listdir(self.path):
        os.unlink(self.file(name))
      os.rmdir(self.path)

  # ------------------------------------------------------------------------ records

  def holds_run(self) -> bool:
    """Whether an earlier run wrote its records here."""
    return any(os.path.exists(self.file(n)) for n in (CONFIG, METRICS, SUMMARY))

  def read_metrics(self) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    if not os.path.exists(self.file(METRICS)):
      return []
    rows = []
    with open(self.file(METRICS)) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break
    return rows

  def append_metrics(self, row: dict) -> None:
    if self.writer:
      with open(self.file(METRICS), "a") as f:
        f.write(dumps(row) + "\n")

  def truncate_metrics(self, step: int) -> list[dict]:
    """Keeps the rows up to ``step`` (the restored checkpoint); returns them."""
    rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
    if self.writer and os.path.exists(self.file(METRICS)):
      write_atomic(self.file(METRICS), "".join(dumps(r) + "\n" for r in rows))
    return rows

  def write_json(self, name: str, value: Any) -> None:
    if self.writer:
      write_atomic(self.file(name), dumps(value, indent=2) + "\n")

  def record_config(self, config: dict, start_step: int, saved: Optional[dict]) -> dict:
    """Writes ``config.yaml`` and a ``config_history.jsonl`` line; returns what changed
    from ``saved`` (``{key: (old, new)}``), the config of the part before a resume."""
    import yaml

    ignore = ("resume", "progress", "output_dir")
    changed = {k: (saved.get(k), v) for k, v in config.items()
               if saved is not None and k not in ignore and saved.get(k) != v}
    if self.writer:
      write_atomic(self.file(CONFIG), yaml.safe_dump(config, sort_keys=False))
      with open(self.file(CONFIG_HISTORY), "a") as f:
        f.write(dumps({"start_step": int(start_step), "config": config}) + "\n")
    return changed
