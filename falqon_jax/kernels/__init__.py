"""Pallas kernels for FALQON's memory-bound steps, each beside its plain-jnp reference.

* :func:`quantize`: amax, scale and saturating FP8 cast, per tensor or per row
  (``falqon_jax.kernels.fp8_quantize``).
* :func:`merge_rows`: the in-place row merge of ``merge_top_k``
  (``falqon_jax.kernels.row_merge``); :func:`select_rows` picks the rows (in XLA).

``implementation`` is ``"xla"`` (the default: no GPU figures yet), ``"pallas"``, or a
sequence tried in order: a Pallas candidate that the backend cannot compile falls through
to the next, and :class:`KernelUnavailableError` lists every failure if none compiles.
``interpret=None`` runs Pallas in interpret mode exactly when the backend is the CPU.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from falqon_jax import kernels
  >>> x = jax.random.normal(jax.random.key(0), (6, 10), jnp.bfloat16)
  >>> q, s = kernels.quantize(x, "e4m3", axis=-1, implementation="pallas")
  >>> q.dtype, s.shape
  (dtype(float8_e4m3fn), (6, 1))
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from falqon_jax import _merge_math, fp8
from falqon_jax._melded_kernel import is_int
from falqon_jax._options import ROUNDINGS, SCALINGS
from falqon_jax.errors import UserInputError
from falqon_jax.kernels import _dispatch
from falqon_jax.kernels._dispatch import IMPLEMENTATIONS, KernelUnavailableError
from falqon_jax.kernels.row_merge import merge_pallas
from falqon_jax.kernels.fp8_quantize import quantize_pallas, quantize_reference

__all__ = [
    "IMPLEMENTATIONS",
    "KernelUnavailableError",
    "quantize",
    "merge_rows",
    "select_rows",
]


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_block_shape(block_shape):
  if block_shape is None:
    return None
  block_shape = tuple(int(b) for b in block_shape)
  if len(block_shape) != 2 or any(b < 1 or b & (b - 1) for b in block_shape):
    raise UserInputError(f"block_shape must be two powers of two, got {block_shape}")
  return block_shape


def quantize(
    x: jax.Array,
    fmt: fp8.FormatLike = fp8.E4M3,
    *,
    axis: Optional[int] = None,
    amax: Optional[jax.Array] = None,
    implementation: _dispatch.Implementation = "xla",
    interpret: Optional[bool] = None,
    block_shape: Optional[tuple[int, int]] = None,
) -> tuple[jax.Array, jax.Array]:
  """Quantizes a 2-D ``x`` to FP8; the same bits as ``fp8.compute_scale`` + ``fp8.quantize``.

  Args:
    x: bf16 / f16 / f32 array of shape ``(rows, cols)``.
    fmt: ``fp8.E4M3`` / ``fp8.E5M2`` or their names.
    axis: ``None`` for one per-tensor scale, ``-1`` (or ``1``) for one scale per row.
    amax: an already known amax (shape ``()``, or ``(rows,)`` / ``(rows, 1)`` per row),
      which skips the amax pass.
    implementation: ``"xla"``, ``"pallas"`` or a sequence of them tried in order.
    interpret: Pallas interpret mode; ``None`` means "on CPU".
    block_shape: Pallas block ``(rows, cols)``, powers of two; ``None`` picks one.

  Returns:
    ``(q, scale)``: q in the format's dtype, scale float32 of shape ``()`` or ``(rows, 1)``.
  """
  fmt = fp8.get_format(fmt)
  if not hasattr(x, "ndim"):
    x = jnp.asarray(x)
  if x.ndim != 2 or 0 in x.shape:
    raise ValueError(f"quantize needs a non-empty 2-D array, got shape {tuple(x.shape)}")
  if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise TypeError(f"quantize needs a bf16/f16/f32 array, got dtype {x.dtype}")
  if axis not in (None, -1, 1):
    raise UserInputError(f"axis must be None (per tensor) or -1 (per row), got {axis!r}")
  per_row = axis is not None
  if amax is not None:
    amax = jnp.asarray(amax)
    want = ((x.shape[0],), (x.shape[0], 1)) if per_row else ((),)
    if amax.shape not in want or not jnp.issubdtype(amax.dtype, jnp.floating):
      raise ValueError(
          f"amax must be a floating array of shape {' or '.join(map(str, want))},"
          f" got {amax.dtype}{tuple(amax.shape)}"
      )
    amax = amax.astype(jnp.float32).reshape((x.shape[0], 1) if per_row else ())
  block_shape = _check_block_shape(block_shape)
  interp = _dispatch.resolve_interpret(interpret)
  impls = {
      "xla": lambda x, a: quantize_reference(x, fmt, axis=-1 if per_row else None, amax=a),
      "pallas": functools.partial(
          quantize_pallas, fmt=fmt, per_row=per_row, block_shape=block_shape,
          interpret=interp,
      ),
  }
  return _dispatch.dispatch(
      "quantize", implementation, impls, (x, amax), (fmt.name, per_row, block_shape, interp)
  )


def select_rows(delta: jax.Array, k: int) -> jax.Array:
  """Indices of the ``k`` rows of ``delta`` with the largest L1 norm (``sum |B_ij|``).

  Also ``falqon_jax.select_rows``. The top-k runs in XLA (``lax.top_k``).
  """
  if not hasattr(delta, "ndim") or delta.ndim != 2:
    raise ValueError(f"delta must be a 2-D (out, rank) array, got {getattr(delta, 'shape', delta)}")
  if not is_int(k) or not 1 <= k <= delta.shape[0]:
    raise UserInputError(f"k must be an int in [1, rows] = [1, {delta.shape[0]}], got {k!r}")
  return _merge_math.top_rows(delta, int(k))


def check_rounding(rounding: str, key) -> None:
  """``rounding`` is one of ``ROUNDINGS``, and ``"stochastic"`` comes with a ``key``."""
  if rounding not in ROUNDINGS:
    raise UserInputError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  if rounding == "stochastic" and key is None:
    raise UserInputError('rounding="stochastic" needs key=jax.random.key(...)')


def _check_merge(qweight, scale, delta, rows, out_features, scaling, rounding, key, active):
  if getattr(qweight, "dtype", None) != fp8.E4M3.dtype or qweight.ndim != 2:
    raise TypeError(
        "qweight must be a 2-D float8_e4m3fn array, got"
        f" {getattr(qweight, 'dtype', type(qweight))}{tuple(getattr(qweight, 'shape', ()))}"
    )
  if not is_int(out_features) or not 1 <= out_features < qweight.shape[0]:
    raise UserInputError(
        f"out_features must be an int in [1, {qweight.shape[0] - 1}] for qweight of shape"
        f" {tuple(qweight.shape)}, got {out_features!r}"
    )
  rank = qweight.shape[0] - out_features
  if getattr(delta, "ndim", None) != 2 or tuple(delta.shape) != (out_features, rank):
    raise ValueError(
        f"delta must have shape (out, rank) = {(out_features, rank)},"
        f" got {tuple(getattr(delta, 'shape', ()))}"
    )
  if not jnp.issubdtype(delta.dtype, jnp.floating):
    raise TypeError(f"delta must be floating, got dtype {delta.dtype}")
  if scaling not in SCALINGS:
    raise UserInputError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
  want = () if scaling == "tensor" else (qweight.shape[0],)
  if getattr(scale, "dtype", None) != jnp.float32 or tuple(scale.shape) != want:
    raise ValueError(
        f"scale must be float32 of shape {want} for scaling={scaling!r}, got"
        f" {getattr(scale, 'dtype', type(scale))}{tuple(getattr(scale, 'shape', ()))}"
    )
  if getattr(rows, "ndim", None) != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
    raise TypeError(
        f"rows must be a 1-D integer array, got {getattr(rows, 'dtype', type(rows))}"
        f"{tuple(getattr(rows, 'shape', ()))}"
    )
  if not 1 <= rows.shape[0] <= out_features:
    raise ValueError(f"k = len(rows) must be in [1, out] = [1, {out_features}], got {rows.shape[0]}")
  if _is_concrete(rows):  # cheap outside jit; a traced rows is trusted
    r = np.asarray(rows)
    if r.min() < 0 or r.max() >= out_features:
      raise ValueError(f"rows must lie in [0, {out_features}), got min {r.min()} max {r.max()}")
    if np.unique(r).size != r.size:
      raise ValueError("rows must be distinct (a row is merged at most once)")
  check_rounding(rounding, key)
  if active is not None and (
      getattr(active, "shape", ()) != () or not jnp.issubdtype(jnp.result_type(active), jnp.integer)
  ):
    raise TypeError(f"active must be a scalar integer, got {active!r}")


def merge_rows(
    qweight: jax.Array,
    scale: jax.Array,
    delta: jax.Array,
    rows: jax.Array,
    *,
    out_features: int,
    scaling: str = "tensor",
    rounding: str = "nearest",
    key: Optional[jax.Array] = None,
    active: Optional[jax.Array] = None,
    implementation: _dispatch.Implementation = "xla",
    interpret: Optional[bool] = None,
    block_shape: Optional[tuple[int, int]] = None,
) -> tuple[jax.Array, jax.Array]:
  """Merges ``delta[rows]`` into those rows of the melded FP8 weight.

  The same bits as ``_merge_math.merge_reference``: new rows
  ``e4m3(clamp(raw[rows] + delta[rows] @ raw_A, ±448))`` (tensor scaling) or the
  scale-shrinking row-scaled variant; every other row is untouched, and so is a selected
  row whose delta is not finite (NaN or Inf). Donate ``qweight`` to the enclosing
  ``jax.jit`` so that the Pallas kernel writes it in place.

  Args:
    qweight: float8_e4m3fn ``(out + rank, in)``, rows ``[out:]`` are ``A``.
    scale: float32, ``()`` (tensor scaling) or ``(out + rank,)`` (row scaling).
    delta: ``(out, rank)`` ΔBuffer.
    rows: ``(k,)`` distinct row indices in ``[0, out)``, e.g. from :func:`select_rows`.
    out_features: ``out`` (static).
    scaling: ``"tensor"`` or ``"row"``.
    rounding: ``"nearest"`` or ``"stochastic"`` (needs ``key``; same bits as the core).
    key: PRNG key for stochastic rounding.
    active: optional traced count: only the first ``active`` rows get their update.
    implementation, interpret, block_shape: as in :func:`quantize`.

  Returns:
    ``(new_qweight, new_scale)``; the scale changes only with row scaling.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from falqon_jax import fp8, kernels
    >>> w = jax.random.normal(jax.random.key(0), (12, 16))
    >>> s = fp8.compute_scale(w)
    >>> delta = jax.random.normal(jax.random.key(1), (8, 4))
    >>> rows = kernels.select_rows(delta, 3)
    >>> q, s2 = kernels.merge_rows(fp8.quantize(w, s), s, delta, rows, out_features=8)
    >>> q.shape, bool(s2 == s)
    ((12, 16), True)
  """
  if isinstance(rows, (list, tuple, np.ndarray)):
    rows = jnp.asarray(rows)
  if active is not None and not hasattr(active, "shape"):
    active = jnp.asarray(active)
  _check_merge(qweight, scale, delta, rows, out_features, scaling, rounding, key, active)
  return merge_rows_unchecked(
      qweight, scale, delta, rows, out_features=int(out_features), scaling=scaling,
      rounding=rounding, key=key, active=active, implementation=implementation,
      interpret=interpret, block_shape=_check_block_shape(block_shape),
  )


def merge_rows_unchecked(
    qweight, scale, delta, rows, *, out_features: int, scaling: str, rounding: str,
    key=None, active=None, implementation: _dispatch.Implementation = "xla",
    interpret: Optional[bool] = None, block_shape: Optional[tuple[int, int]] = None,
) -> tuple[jax.Array, jax.Array]:
  """:func:`merge_rows` on inputs that its caller has checked (``merge_top_k`` and
  ``proxy_update`` check theirs once, at their own entry)."""
  interp = _dispatch.resolve_interpret(interpret)
  opts = dict(out_features=out_features, scaling=scaling, rounding=rounding)
  impls = {
      "xla": functools.partial(_merge_math.merge_reference, **opts),
      "pallas": functools.partial(
          merge_pallas, **opts, block_shape=block_shape, interpret=interp
      ),
  }
  if rounding != "stochastic":
    key = None
  return _dispatch.dispatch(
      "merge_rows", implementation, impls, (qweight, scale, delta, rows, key, active),
      (tuple(sorted(opts.items())), block_shape, interp),
  )
