"""An in-place row write for XLA CPU, as an XLA FFI custom call built on first use.

Why: XLA CPU keeps no fp8 scatter in place. It upcasts the whole array to f32 around it,
and the uint8 view that avoids the upcast still costs two full-size copies, because CPU XLA
materializes ``bitcast_convert``. At 4096 x 4096 that write is 4x the cost of the k-row
merge math. The custom call in ``row_write.cc`` aliases its output to the target buffer
(``input_output_aliases={0: 0}``), so with donated buffers it copies k rows and nothing else.

The extension is compiled once per (source, jaxlib, platform) with the system C++ compiler
(``$CXX``, default ``c++``, about 4 s) into ``$FALQON_JAX_CACHE_DIR`` (default
``~/.cache/falqon_jax``), written to a temporary name and renamed into place, so a failed
or concurrent build never leaves a broken library behind. Without a compiler the write
falls back to the uint8 view (the same bytes, slower) with one warning.
``FALQON_JAX_NATIVE=0`` turns the extension off. GPUs and TPUs never use it: they scatter
fp8 natively and in place.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

TARGET = "falqon_write_rows"
_SOURCE = pathlib.Path(__file__).with_name("row_write.cc")
_SYMBOL = "FalqonWriteRows"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once decided; "error": str on failure
_registered = False  # once per process, whatever _state says


def cache_dir() -> pathlib.Path:
  root = os.environ.get("FALQON_JAX_CACHE_DIR")
  if root:
    return pathlib.Path(root)
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(xdg) / "falqon_jax"


def library_path() -> pathlib.Path:
  """Where the built library for this source, jaxlib and platform lives."""
  import jaxlib

  digest = hashlib.sha256()
  digest.update(_SOURCE.read_bytes())
  digest.update(jaxlib.__version__.encode())
  digest.update(platform.machine().encode())
  return cache_dir() / f"row_write-{digest.hexdigest()[:16]}.so"


def build(path: pathlib.Path) -> None:
  """Compiles ``row_write.cc`` to ``path`` atomically; raises ``RuntimeError`` on failure."""
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX to one)")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".row_write-", suffix=".so", dir=path.parent)
  os.close(fd)
  try:
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise RuntimeError(f"{compiler} failed (exit {proc.returncode}): {last}")
    os.replace(tmp, path)  # atomic: readers see the old state or the whole library
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load() -> None:
  global _registered
  path = library_path()
  if not path.exists():
    build(path)
  lib = ctypes.cdll.LoadLibrary(str(path))
  handler = getattr(lib, _SYMBOL)
  if not _registered:  # XLA refuses a second handler under the same name
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    _registered = True


def available() -> bool:
  """Whether the CPU row-write custom call is built and registered (builds it once)."""
  with _lock:
    if "ok" not in _state:
      if os.environ.get("FALQON_JAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state.update(ok=False, error="disabled by FALQON_JAX_NATIVE=0")
      else:
        try:
          _load()
          _state.update(ok=True, error=None)
        except Exception as e:  # any failure means: fall back, once, loudly
          _state.update(ok=False, error=f"{type(e).__name__}: {e}")
          warnings.warn(
              "falqon_jax: the CPU in-place row write could not be built "
              f"({_state['error']}); CPU merges fall back to a uint8 view (same bytes, two "
              "full-size copies). Install a C++ compiler, or set FALQON_JAX_NATIVE=0 to "
              "silence this.", RuntimeWarning, stacklevel=3)
    return bool(_state["ok"])


def error() -> Optional[str]:
  """Why :func:`available` is False (None if it is True or was never asked)."""
  return _state.get("error")  # type: ignore[return-value]


def _reset_for_tests() -> None:
  with _lock:
    _state.clear()


def write_rows(target: jax.Array, rows: jax.Array, new_rows: jax.Array) -> jax.Array:
  """``target.at[rows].set(new_rows)`` in place on CPU; needs :func:`available`.

  ``target`` is (..., R, C), ``rows`` (..., k) integers, ``new_rows`` (..., k, C) of
  ``target``'s dtype. Rows outside [0, R) are skipped, like ``.at[].set`` drops them.
  Under ``jax.vmap`` the batch dims go to the handler, which loops over them.
  """
  if new_rows.dtype != target.dtype:
    raise TypeError(f"new_rows dtype {new_rows.dtype} != target dtype {target.dtype}")
  if (target.ndim < 2 or rows.shape != target.shape[:-2] + rows.shape[-1:]
      or new_rows.shape != rows.shape + target.shape[-1:]):
    raise ValueError(f"write_rows needs target (..., R, C), rows (..., k), new_rows "
                     f"(..., k, C); got {target.shape}, {rows.shape}, {new_rows.shape}")
  rows = rows.astype(jnp.int32)
  rows = jnp.where(rows < 0, rows + target.shape[-2], rows)  # numpy-style negative rows
  call = jax.ffi.ffi_call(
      TARGET, jax.ShapeDtypeStruct(target.shape, target.dtype),
      input_output_aliases={0: 0}, vmap_method="broadcast_all")
  return call(target, rows, new_rows)
