"""The row merge's math, the one copy that the XLA merge and the Pallas kernel both run.

Spec: falqon-reference.md section 5 (``apply_delta_weight``). The merged rows are
``e4m3(clamp(raw[rows] + delta[rows] @ raw_A, ±448))`` (tensor scaling) or the row-scaled
variant that shrinks a row's scale instead of clipping. The pieces here are plain jnp on
arrays of any block size, so the kernel calls them on the blocks it loads:

* :func:`row_update`: the f32 update ``delta[rows] @ A`` in raw units (run in XLA by both:
  an f32 dot's bits depend on its shapes, so a blocked in-kernel dot would not match);
* :func:`shrink_factor`: row scaling's per-row scale shrink from the new amax;
* :func:`round_rows`: clamp and round to nearest, or stochastically with the counter-based
  uniforms of ``fp8.hash_uniform`` keyed by each element's position (:func:`merge_counters`);
* :func:`compute_merged_rows` / :func:`merge_reference`: the whole XLA merge;
* :func:`rounding_residual`: what the new FP8 rows could not hold, for ``reset="residual"``.

``div`` arguments take a correctly rounded f32 division: ``/`` in XLA, ``div.rn`` on Triton.
Nothing here validates its inputs; the public entry points do.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from falqon_jax import _native, fp8

FMT = fp8.E4M3

Divide = Callable[[jax.Array, jax.Array], jax.Array]

# The merge's f32 product delta[rows] @ raw_A. The reference runs it with allow_tf32, and
# HIGH is that on GPUs (TF32 tensor cores), 3-pass bf16 on TPUs and exact f32 on CPU.
# Its ~2^-11 relative error is far below the e4m3 step (2^-4) the sum is rounded to;
# HIGHEST (f32 without tensor cores) would cost GPU time on every step that merges all
# rows (top_k="all": 0.8 TFLOP per LLaMA-7B step at rank 64).
MERGE_PRECISION = lax.Precision.HIGH


def top_rows(delta: jax.Array, k: int) -> jax.Array:
  """Indices of the ``k`` rows of ``delta`` with the largest L1 norm (``sum |B_ij|``)."""
  _, rows = lax.top_k(jnp.sum(jnp.abs(delta), axis=-1), k)
  return rows


def gather_rows(qweight: jax.Array, rows: jax.Array) -> jax.Array:
  """``qweight[rows]`` through a uint8 view (CPU XLA would upcast an fp8 gather)."""
  bits = fp8._bitcast(qweight, jnp.uint8)
  return fp8._bitcast(bits[rows], qweight.dtype)


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


def row_update(
    qweight: jax.Array, scale: jax.Array, d_rows: jax.Array, rows: jax.Array, *,
    out_features: int, scaling: str,
) -> jax.Array:
  """The f32 ``(k, in)`` update ``d_rows @ A`` in the raw units of ``qweight[rows]``.

  Tensor scaling: both raw operands share one scale, so ``d_rows @ raw_A`` needs no
  descale. Row scaling: ``A``'s values, rescaled by each merged row's own scale.
  """
  raw_a = gather_rows(qweight, slice(out_features, None)).astype(jnp.float32)
  if scaling == "row":
    a_values = raw_a / scale[out_features:, None]
    return scale[rows][:, None] * jnp.dot(d_rows, a_values, precision=MERGE_PRECISION)
  return jnp.dot(d_rows, raw_a, precision=MERGE_PRECISION)


def shrink_factor(amax: jax.Array, div: Divide = jnp.divide) -> jax.Array:
  """Row scaling: the factor on a row (and its scale) whose ``amax`` would saturate e4m3."""
  ratio = div(jnp.full(amax.shape, FMT.max, jnp.float32), amax)
  return jnp.where(amax > FMT.max, ratio, 1.0)


def round_rows(
    v: jax.Array, rows: jax.Array, cols: jax.Array, width: int,
    seed: Optional[tuple[jax.Array, jax.Array]] = None, div: Divide = jnp.divide,
) -> jax.Array:
  """f32 merged values ``v`` to e4m3, clamped to ±448.

  Round to nearest without ``seed``. With ``seed`` (the two words of
  ``fp8.stochastic_seed``), round stochastically with the uniforms hashed from each
  element's position (:func:`merge_counters` of ``rows``, ``cols`` broadcast to ``v``).
  """
  if seed is None:
    return jnp.clip(v, -FMT.max, FMT.max).astype(FMT.dtype)
  u = fp8.hash_uniform(seed[0], seed[1], merge_counters(rows, cols, width))
  return fp8.round_stochastic(v, u, FMT, div=div)


def compute_merged_rows(
    qweight, scale, delta, rows, key=None, active=None, *,
    out_features: int, scaling: str = "tensor", rounding: str = "nearest",
) -> tuple[jax.Array, jax.Array]:
  """New raw FP8 rows and their scales for ``rows``: the XLA merge.

  Row scaling computes the update in value space, and a row whose new amax would
  saturate gets a smaller scale (a wider range) instead of clipping.

  Only the rows :func:`live_rows` keeps are merged: rows with a finite delta and, when
  ``active`` (a traced count) is given, among the first ``active`` in top-k order. The
  others come back with their own bytes and scales.

  Returns:
    ``(new_rows_fp8 (k, in), new_row_scales (k,) or the unchanged 0-d scale)``.
  """
  raw_rows = gather_rows(qweight, rows).astype(jnp.float32)
  d_rows = delta[rows].astype(jnp.float32)
  # A dropped row keeps its raw values, which every rounding gives back as they are: its
  # own bytes (adding a zero update would turn a -0 code into +0) and, as its amax cannot
  # exceed 448, its scale. Selecting here, where raw_rows is read anyway, reads no row twice.
  live = live_rows(d_rows, active)[:, None]
  update = row_update(qweight, scale, d_rows, rows, out_features=out_features,
                      scaling=scaling)
  v = jnp.where(live, raw_rows + update, raw_rows)
  new_scale = scale
  if scaling == "row":
    shrink = shrink_factor(jnp.max(jnp.abs(v), axis=-1, keepdims=True))
    v = v * shrink
    new_scale = scale[rows] * shrink[:, 0]
  n = v.shape[1]
  seed = fp8.stochastic_seed(key) if rounding == "stochastic" else None
  new = round_rows(v, rows[:, None], lax.broadcasted_iota(jnp.int32, (1, n), 1), n, seed)
  return new, new_scale


def merge_reference(
    qweight, scale, delta, rows, key=None, active=None, *,
    out_features: int, scaling: str = "tensor", rounding: str = "nearest",
) -> tuple[jax.Array, jax.Array]:
  """``(qweight with the k rows rewritten, scale)``: :func:`compute_merged_rows`, written."""
  new_rows, new_row_scale = compute_merged_rows(
      qweight, scale, delta, rows, out_features=out_features, scaling=scaling,
      rounding=rounding, key=key, active=active,
  )
  qweight = write_rows(qweight, rows, new_rows)
  if scaling == "row":
    scale = scale.at[rows].set(new_row_scale, unique_indices=True)
  return qweight, scale


def rounding_residual(mk, rows: jax.Array, new_rows: jax.Array, new_scale: jax.Array) -> jax.Array:
  """The part of ``delta[rows] @ A`` that the new FP8 rows could not hold, in delta units.

  The merge wants ``W[rows] + delta[rows] @ A`` but stores its e4m3 rounding. The error
  ``e`` (k, in, in value units) is projected back onto A's row space by least squares,
  ``r = e Aᵀ (A Aᵀ)⁻¹``, so that ``r @ A`` is the closest correction the ΔBuffer can
  express. Keeping ``r`` as the merged rows' new delta (``reset="residual"``) is error
  feedback: updates below half an FP8 step accumulate until they land, instead of being
  rounded away every step. A's rows are frozen, so its Gram matrix is well conditioned as
  long as A has full rank (SVD init guarantees it; a tiny ridge covers the rest).

  Args:
    mk: the :class:`~falqon_jax.MeldedKernel` before the merge.
    rows: the merged rows ``(k,)``.
    new_rows: their new raw e4m3 bytes ``(k, in)``.
    new_scale: their new scales ``(k,)`` (row scaling) or the 0-d scale.

  Returns:
    (k, rank) float32, the new ``delta`` of the merged rows.
  """
  out = mk.out_features
  raw_rows = gather_rows(mk.qweight, rows).astype(jnp.float32)
  raw_a = gather_rows(mk.qweight, slice(out, None)).astype(jnp.float32)
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
