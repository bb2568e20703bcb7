"""The row-wise proxy update: merge the top-k rows of the ΔBuffer into the FP8 backbone.

Spec: falqon-reference.md section 5 (``apply_delta_weight``). The reference upcasts the
whole weight every step; here only the k selected rows are read, computed and written, so
with donated buffers the write is in place (on CPU through a small custom call, see
:func:`write_rows`).
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from falqon_jax import _merge_math, kernels
from falqon_jax._melded_kernel import MeldedKernel, is_int
# Re-exported: the public select_rows and rounding_residual, and the merge's pieces.
from falqon_jax._merge_math import (  # noqa: F401
    MERGE_PRECISION,
    compute_merged_rows,
    live_rows,
    merge_counters,
    rounding_residual,
    write_rows,
)
from falqon_jax.errors import UserInputError
from falqon_jax.kernels import select_rows  # noqa: F401

Reset = Literal["all", "merged", "residual"]
Rounding = Literal["nearest", "stochastic"]
Implementation = Union[str, Sequence[str]]

from falqon_jax._options import RESETS, ROUNDINGS  # noqa: E402

def merge_rows(
    mk: MeldedKernel,
    k: int,
    *,
    reset: Reset = "all",
    rounding: Rounding = "nearest",
    key: Optional[jax.Array] = None,
    active: Optional[jax.Array] = None,
    implementation: Implementation = "xla",
) -> MeldedKernel:
  """:func:`merge_top_k` with an optional traced ``active`` count.

  It checks nothing: ``merge_top_k`` and ``proxy_update`` check their inputs at entry.
  """
  rows = _merge_math.top_rows(mk.delta, k)
  qweight, scale = kernels.merge_rows_unchecked(
      mk.qweight, mk.scale, mk.delta, rows, out_features=mk.out_features,
      scaling=mk.scaling, rounding=rounding, key=key, active=active,
      implementation=implementation,
  )
  if reset == "residual":  # the rows were written in place: read them back
    new_rows = _merge_math.gather_rows(qweight, rows)
    new_row_scale = scale[rows] if mk.scaling == "row" else scale
  if reset == "all":
    delta = jnp.zeros_like(mk.delta)
    if active is not None:  # a step that merges nothing (a skipped step) resets nothing
      delta = jnp.where(active > 0, delta, mk.delta)
  else:
    if reset == "residual":
      cleared = rounding_residual(mk, rows, new_rows, new_row_scale)
      # A dropped non-finite update leaves no residual worth keeping.
      cleared = jnp.where(live_rows(mk.delta[rows])[:, None], cleared, 0.0)
    else:
      cleared = jnp.zeros((k, mk.rank), mk.delta.dtype)
    if active is not None:
      live = (jnp.arange(k) < active)[:, None]
      cleared = jnp.where(live, cleared, mk.delta[rows])
    delta = mk.delta.at[rows].set(cleared, unique_indices=True)
  return mk.replace(qweight=qweight, scale=scale, delta=delta)


def check_merge_options(reset: str, rounding: str, key) -> None:
  if reset not in RESETS:
    raise UserInputError(f"reset must be one of {RESETS}, got {reset!r}")
  kernels.check_rounding(rounding, key)


def merge_top_k(
    mk: MeldedKernel,
    k: int,
    *,
    reset: Reset = "all",
    rounding: Rounding = "nearest",
    key: Optional[jax.Array] = None,
    implementation: Implementation = "xla",
) -> MeldedKernel:
  """Merges the ``k`` rows of ``delta`` with the largest L1 norm into the FP8 backbone.

  New raw rows are ``e4m3(clamp(raw[rows] + delta[rows] @ raw_A, ±448))``; every other
  byte of ``qweight`` and the scale stay as they were. Then ``delta`` is reset: all of it
  with ``reset="all"`` (the reference), only the merged rows with ``reset="merged"``, and
  with ``reset="residual"`` the merged rows keep what the FP8 grid could not hold
  (:func:`rounding_residual`).

  A selected row whose delta is not finite (NaN or Inf) is dropped: its weight bytes and
  scale stay as they were and its delta is cleared like a merged row's, so one bad update
  neither corrupts the weight nor keeps its row from merging again.

  Args:
    mk: the melded kernel.
    k: how many rows to merge (static), ``1 <= k <= out``.
    reset: ``"all"``, ``"merged"`` or ``"residual"``.
    rounding: ``"nearest"`` (the reference) or ``"stochastic"`` (needs ``key``).
    key: PRNG key for stochastic rounding.
    implementation: ``"xla"`` (plain jnp, the default), ``"pallas"`` (the in-place row
      kernel in ``falqon_jax.kernels``), or a sequence tried in order.

  Example:
    >>> import jax, falqon_jax
    >>> mk = falqon_jax.meld_kernel(jax.random.normal(jax.random.key(0), (64, 32)), 16)
    >>> mk = mk.replace(delta=jax.random.normal(jax.random.key(1), mk.delta.shape))
    >>> new = falqon_jax.merge_top_k(mk, k=4)
    >>> int((new.qweight != mk.qweight).any(axis=1).sum()) <= 4, float(abs(new.delta).sum())
    (True, 0.0)
  """
  if not isinstance(mk, MeldedKernel):
    raise TypeError(f"merge_top_k needs a MeldedKernel, got {type(mk).__name__}")
  if not is_int(k) or not 1 <= k <= mk.out_features:
    raise UserInputError(
        f"k must be an int in [1, out] = [1, {mk.out_features}], got {k!r}"
    )
  check_merge_options(reset, rounding, key)
  return merge_rows(mk, int(k), reset=reset, rounding=rounding, key=key,
                    implementation=implementation)
