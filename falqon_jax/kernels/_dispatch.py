"""Choosing an implementation: a name or a sequence of names tried in order.

A single name runs as asked, and any failure surfaces as it happens. In a sequence, each
Pallas candidate is first lowered and compiled on abstract inputs (cached per signature),
so a backend that cannot compile it (a CPU without interpret mode, a GPU below sm89 for
fp8 casts) falls through to the next name before anything is traced into the caller's
program. "xla" always compiles, so it needs no probe.

Example:
  >>> from falqon_jax.kernels import _dispatch
  >>> _dispatch.normalize(("pallas", "xla"))
  ('pallas', 'xla')
"""

from __future__ import annotations

from typing import Callable

import jax

from falqon_jax._options import IMPLEMENTATIONS, Implementation, check_implementation  # noqa: F401


class KernelUnavailableError(RuntimeError):
  """Every requested implementation failed to compile; ``errors`` maps name -> exception."""

  def __init__(self, op: str, errors: dict):
    self.errors = dict(errors)
    detail = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in self.errors.items())
    super().__init__(f"no implementation of {op} compiled here ({detail})")


def normalize(implementation: Implementation) -> tuple[str, ...]:
  """Validates ``implementation`` and returns it as a non-empty tuple of names."""
  names = check_implementation(implementation)
  return (names,) if isinstance(names, str) else names


def resolve_interpret(interpret) -> bool:
  """``None`` means interpret exactly when the default backend is the CPU."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


_PROBES: dict = {}


def _signature(args) -> tuple:
  return tuple(
      None if a is None else (tuple(a.shape), str(a.dtype)) for a in args
  )


def _probe(key, fn: Callable, args) -> None:
  """Lowers and compiles ``fn`` on abstract ``args`` once per key; re-raises a failure."""
  if key not in _PROBES:
    try:
      avals = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
      jax.jit(fn).trace(*avals).lower().compile()
      _PROBES[key] = None
    except Exception as e:  # the backend's own error, kept to report it
      _PROBES[key] = e
  if _PROBES[key] is not None:
    raise _PROBES[key]


def dispatch(op: str, implementation: Implementation, impls: dict, args, static: tuple):
  """Runs ``impls[name](*args)`` for the first name in ``implementation`` that compiles.

  Args:
    op: the op's name, for error messages.
    implementation: a name or a sequence of names.
    impls: name -> callable taking ``args`` positionally (static options already bound).
    args: the array arguments (``None`` allowed).
    static: hashable static options, part of the probe's cache key.
  """
  names = normalize(implementation)
  if len(names) == 1:
    return impls[names[0]](*args)
  errors = {}
  for name in names:
    if name == "xla":
      return impls[name](*args)
    key = (op, name, jax.default_backend(), _signature(args), static)
    try:
      _probe(key, impls[name], args)
    except Exception as e:
      errors[name] = e
      continue
    return impls[name](*args)
  raise KernelUnavailableError(op, errors)
