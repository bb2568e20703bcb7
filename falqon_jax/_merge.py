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
from jax import lax

from falqon_jax import fp8
from falqon_jax._melded_kernel import MeldedKernel, is_int
from falqon_jax.errors import UserInputError

Reset = Literal["all", "merged", "residual"]
Rounding = Literal["nearest", "stochastic"]
Implementation = Union[str, Sequence[str]]

RESETS = ("all", "merged", "residual")
ROUNDINGS = ("nearest", "stochastic")

# The merge's f32 product delta[rows] @ raw_A. The reference runs it with allow_tf32, and
# HIGH is that on GPUs (TF32 tensor cores), 3-pass bf16 on TPUs and exact f32 on CPU.
# Its ~2^-11 relative error is far below the e4m3 step (2^-4) the sum is rounded to;
# HIGHEST (f32 without tensor cores) would cost GPU time on every step that merges all
# rows (top_k="all": 0.8 TFLOP per LLaMA-7B step at rank 64).
MERGE_PRECISION = lax.Precision.HIGH


def select_rows(delta: jax.Array, k: int) -> jax.Array:
  """Indices of the ``k`` rows of ``delta`` with the largest L1 norm (``sum |B_ij|``)."""
  _, rows = lax.top_k(jnp.sum(jnp.abs(delta), axis=-1), k)
  return rows


def write_rows(qweight: jax.Array, rows: jax.Array, new_rows: jax.Array, *, via_bits=None):
  """``qweight.at[rows].set(new_rows)``, written so the k rows update in place.

  GPU and TPU scatter fp8 natively, in place when ``qweight`` is donated. CPU XLA
  upcasts the *whole* array to f32 around an fp8 scatter, so on CPU the write is a small
  custom call that aliases its output to ``qweight`` (``falqon_jax._native``, built on
  first use). Without a C++ compiler it falls back to a uint8 view, which costs two
  full-size byte copies (``via_bits=True`` forces that path). All give the same bytes.
  """
  new_rows = new_rows.astype(qweight.dtype)
  if via_bits is None and jax.default_backend() == "cpu":
    from falqon_jax import _native

    if _native.available():
      return _native.write_rows(qweight, rows, new_rows)
    via_bits = True
  if not via_bits:
    return qweight.at[rows].set(new_rows, unique_indices=True)
  bits = fp8._bitcast(qweight, jnp.uint8)
  bits = bits.at[rows].set(fp8._bitcast(new_rows, jnp.uint8), unique_indices=True)
  return fp8._bitcast(bits, qweight.dtype)


def live_rows(delta_rows: jax.Array, active: Optional[jax.Array] = None) -> jax.Array:
  """Which of the selected rows really merge: ``(k,)`` bool.

  A row whose delta holds a NaN or an Inf is dropped: its update would write NaN (or
  saturated) bytes. With ``active``, rows past the first ``active`` are dropped too. The
  test reads only the ``(k, rank)`` deltas, the same in the XLA merge and the kernel.
  """
  live = jnp.all(jnp.isfinite(delta_rows), axis=-1)
  if active is not None:
    live = live & (jnp.arange(delta_rows.shape[0]) < active)
  return live


def merge_counters(rows: jax.Array, cols: jax.Array, width: int) -> jax.Array:
  """Each merged element's position ``row * width + col`` in the weight (broadcasting
  ``rows`` against ``cols``): its stochastic-rounding counter, the same in the XLA merge
  and in the Pallas kernel whatever the row order."""
  return rows.astype(jnp.uint32) * jnp.uint32(width) + cols.astype(jnp.uint32)


def compute_merged_rows(
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
) -> tuple[jax.Array, jax.Array]:
  """New raw FP8 rows and their scales for ``rows``; the plain-jnp merge math.

  Tensor scaling (the reference): ``e4m3(clamp(raw[rows] + delta[rows] @ raw_A, ±448))``.
  Both raw operands share one scale, so no descale is needed.

  Row scaling: the update is computed in value space, and a row whose new amax would
  saturate gets a smaller scale (a wider range) instead of clipping.

  Only the rows :func:`live_rows` keeps are merged: rows with a finite delta and, when
  ``active`` (a traced count) is given, among the first ``active`` in top-k order. The
  others come back with their own bytes and scales.

  Returns:
    ``(new_rows_fp8 (k, in), new_row_scales (k,) or the unchanged 0-d scale)``.
  """
  bits = fp8._bitcast(qweight, jnp.uint8)
  raw_rows = fp8._bitcast(bits[rows], qweight.dtype).astype(jnp.float32)
  raw_a = fp8._bitcast(bits[out_features:], qweight.dtype).astype(jnp.float32)
  d_rows = delta[rows].astype(jnp.float32)
  # A dropped row keeps its raw values, which every rounding gives back as they are: its
  # own bytes (adding a zero update would turn a -0 code into +0) and, as its amax cannot
  # exceed 448, its scale. Selecting here, where raw_rows is read anyway, reads no row twice.
  live = live_rows(d_rows, active)[:, None]
  hi = MERGE_PRECISION
  if scaling == "row":
    row_scale = scale[rows]
    a_values = raw_a / scale[out_features:, None]
    v = raw_rows + row_scale[:, None] * jnp.dot(d_rows, a_values, precision=hi)
    v = jnp.where(live, v, raw_rows)
    amax = jnp.max(jnp.abs(v), axis=-1)
    shrink = jnp.where(amax > fp8.E4M3.max, fp8.E4M3.max / amax, 1.0)
    v = v * shrink[:, None]
    new_scale = row_scale * shrink
  else:
    v = jnp.where(live, raw_rows + jnp.dot(d_rows, raw_a, precision=hi), raw_rows)
    new_scale = scale
  if rounding == "stochastic":
    n = v.shape[1]
    counters = merge_counters(rows[:, None], lax.broadcasted_iota(jnp.int32, (1, n), 1), n)
    new = fp8.quantize_stochastic(v, key, fp8.E4M3, index=counters)
  else:
    new = fp8.quantize(v, 1.0, fp8.E4M3)
  return new, new_scale


def rounding_residual(
    mk: MeldedKernel,
    rows: jax.Array,
    new_rows: jax.Array,
    new_scale: jax.Array,
) -> jax.Array:
  """The part of ``delta[rows] @ A`` that the new FP8 rows could not hold, in delta units.

  The merge wants ``W[rows] + delta[rows] @ A`` but stores its e4m3 rounding. The error
  ``e`` (k, in, in value units) is projected back onto A's row space by least squares,
  ``r = e Aᵀ (A Aᵀ)⁻¹``, so that ``r @ A`` is the closest correction the ΔBuffer can
  express. Keeping ``r`` as the merged rows' new delta (``reset="residual"``) is error
  feedback: updates below half an FP8 step accumulate until they land, instead of being
  rounded away every step. A's rows are frozen, so its Gram matrix is well conditioned as
  long as A has full rank (SVD init guarantees it; a tiny ridge covers the rest).

  Returns:
    (k, rank) float32, the new ``delta`` of the merged rows.
  """
  out = mk.out_features
  bits = fp8._bitcast(mk.qweight, jnp.uint8)
  raw_rows = fp8._bitcast(bits[rows], mk.qweight.dtype).astype(jnp.float32)
  raw_a = fp8._bitcast(bits[out:], mk.qweight.dtype).astype(jnp.float32)
  if mk.scaling == "row":
    old_scale, a_scale = mk.scale[rows][:, None], mk.scale[out:][:, None]
    new_scale = new_scale[:, None]
  else:
    old_scale = a_scale = mk.scale
  a = raw_a / a_scale
  hi = lax.Precision.HIGHEST
  wanted = raw_rows / old_scale + jnp.dot(mk.delta[rows].astype(jnp.float32), a, precision=hi)
  err = wanted - new_rows.astype(jnp.float32) / new_scale
  gram = jnp.dot(a, a.T, precision=hi)
  gram = gram + 1e-6 * jnp.trace(gram) / mk.rank * jnp.eye(mk.rank, dtype=gram.dtype)
  rhs = jnp.dot(a, err.T, precision=hi)  # (rank, k): A eᵀ
  factor = jax.scipy.linalg.cho_factor(gram)
  return jax.scipy.linalg.cho_solve(factor, rhs).T.astype(mk.delta.dtype)


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
  """:func:`merge_top_k` with an optional traced ``active`` count (no validation)."""
  rows = select_rows(mk.delta, k)
  if implementation == "xla":
    new_rows, new_row_scale = compute_merged_rows(
        mk.qweight, mk.scale, mk.delta, rows,
        out_features=mk.out_features, scaling=mk.scaling,
        rounding=rounding, key=key, active=active,
    )
    qweight = write_rows(mk.qweight, rows, new_rows)
    scale = mk.scale
    if mk.scaling == "row":
      scale = scale.at[rows].set(new_row_scale, unique_indices=True)
  else:
    from falqon_jax import kernels  # imported lazily: kernels import this module
    qweight, scale = kernels.merge_rows(
        mk.qweight, mk.scale, mk.delta, rows, out_features=mk.out_features,
        scaling=mk.scaling, rounding=rounding, key=key, active=active,
        implementation=implementation,
    )
    if reset == "residual":  # the kernel wrote in place: read its k rows back
      new_rows = fp8._bitcast(fp8._bitcast(qweight, jnp.uint8)[rows], qweight.dtype)
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
  if rounding not in ROUNDINGS:
    raise UserInputError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  if rounding == "stochastic" and key is None:
    raise UserInputError('rounding="stochastic" needs key=jax.random.key(...)')


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
