"""The in-place row merge: new FP8 rows for the selected rows, written where they are.

``merge_reference`` is the oracle: ``_merge.compute_merged_rows`` then ``write_rows``
(and, with row scaling, the new row scales). ``merge_pallas`` reproduces it: the same
bytes wherever the two programs compute the f32 update with the same bits (a last-bit
difference can move an element by one e4m3 step):

* XLA computes the small update ``delta[rows] @ raw_A`` (k x rank x in MACs), written
  exactly as the reference writes it. An f32 dot's summation order depends on its shapes
  (on CPU, a (k, r) x (r, 32) block gives different bits from the same columns of a
  (k, r) x (r, in) product), so a blocked in-kernel dot could not match the oracle;
* the kernel gathers the k raw rows, adds the update, (row scaling) takes each row's amax
  and shrinks its scale instead of clipping, rounds to nearest or stochastically (hashing
  the reference's counter-based uniforms in registers, ``fp8.hash_uniform``, so nothing
  random is read from memory), and stores the rows into ``qweight``
  in place through ``input_output_aliases``. No other byte is read or written, nor are
  the rows ``_merge.live_rows`` drops (a non-finite delta, or past ``active``).

Row selection (top-k of the row L1 norms) stays in XLA: no Pallas GPU backend lowers
``top_k``, and at k <= 64 over a few thousand rows it is a negligible kernel.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from falqon_jax import fp8
  >>> from falqon_jax.kernels import row_merge as merge
  >>> w = jax.random.normal(jax.random.key(0), (10, 8))
  >>> s = fp8.compute_scale(w)
  >>> q = fp8.quantize(w, s)
  >>> delta = jax.random.normal(jax.random.key(1), (8, 2))
  >>> rows = jnp.array([5, 1, 6])
  >>> q1, _ = merge.merge_reference(q, s, delta, rows, out_features=8)
  >>> q2, _ = merge.merge_pallas(q, s, delta, rows, out_features=8, interpret=True)
  >>> step = jnp.abs(q1.astype(jnp.float32) - q2.astype(jnp.float32))  # e4m3 steps apart
  >>> bool((step <= jnp.abs(q1.astype(jnp.float32)) / 8 + 2.0**-9).all())
  True
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from falqon_jax import _merge, fp8
from falqon_jax.kernels import _pallas
from falqon_jax.kernels._pallas import pl

FMT = fp8.E4M3


def merge_reference(
    qweight, scale, delta, rows, key=None, active=None, *,
    out_features: int, scaling: str = "tensor", rounding: str = "nearest",
) -> tuple[jax.Array, jax.Array]:
  """``(qweight with the k rows rewritten, scale)``, via the core's plain-jnp merge."""
  new_rows, new_row_scale = _merge.compute_merged_rows(
      qweight, scale, delta, rows, out_features=out_features, scaling=scaling,
      rounding=rounding, key=key, active=active,
  )
  qweight = _merge.write_rows(qweight, rows, new_rows)
  if scaling == "row":
    scale = scale.at[rows].set(new_row_scale, unique_indices=True)
  return qweight, scale


def _update(qweight, scale, delta, rows, live, out_features, scaling):
  """The f32 ``(k, in)`` update, with the same ops as ``compute_merged_rows``; zero for
  dropped rows, so that no NaN reaches the kernel (a row-scaled row's amax included)."""
  bits = fp8._bitcast(qweight, jnp.uint8)
  raw_a = fp8._bitcast(bits[out_features:], qweight.dtype).astype(jnp.float32)
  d_rows = jnp.where(live[:, None], delta[rows].astype(jnp.float32), 0.0)
  hi = _merge.MERGE_PRECISION
  if scaling == "row":
    a_values = raw_a / scale[out_features:, None]
    return scale[rows][:, None] * jnp.dot(d_rows, a_values, precision=hi)
  return jnp.dot(d_rows, raw_a, precision=hi)


def default_block_shape(k: int, n: int, scaling: str) -> tuple[int, int]:
  """Power-of-two (selected rows, cols) blocks (unmeasured on GPU)."""
  if scaling == "row":  # one program per row block loops over the columns twice
    return min(_pallas.next_pow2(k), 4), min(_pallas.next_pow2(n), 1024)
  return min(_pallas.next_pow2(k), 8), min(_pallas.next_pow2(n), 512)


def _round_stochastic(v, u, interpret):
  """``fp8.quantize_stochastic`` given its uniforms ``u`` (same bits, e4m3)."""
  v = jnp.clip(v, -FMT.max, FMT.max)
  mag = jnp.abs(v)
  as_bits = lambda x: lax.bitcast_convert_type(x, jnp.uint8)
  as_val = lambda b: lax.bitcast_convert_type(b, FMT.dtype).astype(jnp.float32)
  near = as_bits(mag.astype(FMT.dtype))
  lo = jnp.where(as_val(near) > mag, near - 1, near).astype(jnp.uint8)
  top = int(np.array(FMT.max, FMT.dtype).view(np.uint8))
  hi = jnp.minimum(lo + 1, top).astype(jnp.uint8)
  lo_val, hi_val = as_val(lo), as_val(hi)
  gap = hi_val - lo_val
  safe_gap = jnp.where(gap > 0, gap, 1.0)
  p_up = jnp.where(gap > 0, _pallas.div_rn(mag - lo_val, safe_gap, interpret=interpret), 0.0)
  code = jnp.where(u < p_up, hi, lo)
  sign = jnp.where(jnp.signbit(v), jnp.uint8(0x80), jnp.uint8(0))
  return lax.bitcast_convert_type(code | sign, FMT.dtype)


def _merge_kernel(live_ref, rows_ref, upd_ref, seed_ref, rs_ref, q_in_ref, q_ref, ns_ref, *,
                  k, n, bn, stochastic, row_scaling, interpret):
  del q_in_ref  # aliased with q_ref: read and write through the output ref
  i = pl.program_id(0)
  (kb,) = rows_ref.shape
  live = live_ref[...][:, None] != 0  # dropped rows keep their own bytes: never written
  row_ok = _pallas.iota2((kb, 1), 0, i * kb) < k
  rows = rows_ref[...][:, None]  # padded to the block: in bounds, pads point past the end
  sel = _pallas.iota2((kb, bn), 0, i * kb)  # position among the k selected rows

  def chunk(c0):
    cols = _pallas.iota2((kb, bn), 1, c0)
    mask = (sel < k) & (cols < n)
    qrows = jnp.broadcast_to(rows, (kb, bn))
    raw = _pallas.load(q_ref.at[qrows, cols], mask).astype(jnp.float32)
    return raw + _pallas.load(upd_ref.at[sel, cols], mask), qrows, cols, mask

  def write(c0, shrink):
    v, qrows, cols, mask = chunk(c0)
    if shrink is not None:
      v = v * shrink
    if stochastic:  # the reference's uniforms, hashed here from each element's position
      u = fp8.hash_uniform(seed_ref[0], seed_ref[1], _merge.merge_counters(qrows, cols, n))
      new = _round_stochastic(v, u, interpret)
    else:
      new = jnp.clip(v, -FMT.max, FMT.max).astype(FMT.dtype)
    _pallas.store(q_ref.at[qrows, cols], new, mask & live)

  if not row_scaling:
    write(pl.program_id(1) * bn, None)
    return
  # Row scaling needs each row's amax before any of it is rounded: two sweeps.
  num_chunks = pl.cdiv(n, bn)

  def amax_body(c, acc):
    v, _, _, mask = chunk(c * bn)
    return jnp.maximum(acc, jnp.max(jnp.where(mask, jnp.abs(v), 0.0), axis=1, keepdims=True))

  amax = lax.fori_loop(0, num_chunks, amax_body, jnp.zeros((kb, 1), jnp.float32))
  ratio = _pallas.div_rn(jnp.full((kb, 1), FMT.max, jnp.float32), amax, interpret=interpret)
  shrink = jnp.where(amax > FMT.max, ratio, 1.0)

  def write_body(c, carry):
    write(c * bn, shrink)
    return carry

  lax.fori_loop(0, num_chunks, write_body, 0)
  _pallas.store(ns_ref, rs_ref[...] * shrink, row_ok)


@functools.partial(
    jax.jit,
    static_argnames=("out_features", "scaling", "rounding", "block_shape", "interpret",
                     "num_warps"),
)
def merge_pallas(
    qweight, scale, delta, rows, key=None, active=None, *,
    out_features: int, scaling: str = "tensor", rounding: str = "nearest",
    block_shape: Optional[tuple[int, int]] = None, interpret: bool = False,
    num_warps: int = 4,
) -> tuple[jax.Array, jax.Array]:
  """Pallas twin of :func:`merge_reference` (no input validation).

  Donate ``qweight`` to the enclosing ``jax.jit`` for a true in-place write.
  """
  k = rows.shape[0]
  m, n = qweight.shape
  kb, bn = block_shape or default_block_shape(k, n, scaling)
  row_scaling, stochastic = scaling == "row", rounding == "stochastic"
  rows = rows.astype(jnp.int32)
  live = _merge.live_rows(delta[rows], active)
  upd = _update(qweight, scale, delta, rows, live, out_features, scaling)
  # The seed of the reference's counter-based uniforms: the kernel hashes its own.
  seed = fp8.stochastic_seed(key) if stochastic else jnp.zeros((2,), jnp.uint32)
  gk = pl.cdiv(k, kb)
  # Padding rows point past the end: masked on Triton, and dropped (not a duplicate of a
  # real row, which would race with it) by interpret mode's scatter.
  rows_p = jnp.pad(rows, (0, gk * kb - k), constant_values=m)
  live_p = jnp.pad(live.astype(jnp.int32), (0, gk * kb - k))
  rs = scale[rows][:, None] if row_scaling else jnp.zeros((k, 1), jnp.float32)
  rs = jnp.pad(rs, ((0, gk * kb - k), (0, 0)))
  grid = (gk, 1 if row_scaling else pl.cdiv(n, bn))
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
  kernel = functools.partial(
      _merge_kernel, k=k, n=n, bn=bn, stochastic=stochastic, row_scaling=row_scaling,
      interpret=interpret,
  )
  new_q, new_rs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((kb,), lambda i, j: (i,)), pl.BlockSpec((kb,), lambda i, j: (i,)),
          whole(upd), whole(seed),
          pl.BlockSpec((kb, 1), lambda i, j: (i, 0)), whole(qweight),
      ],
      out_specs=[whole(qweight), pl.BlockSpec((kb, 1), lambda i, j: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct(qweight.shape, qweight.dtype),
                 jax.ShapeDtypeStruct(rs.shape, jnp.float32)],
      input_output_aliases={5: 0},
      interpret=interpret,
      compiler_params=None if interpret else _pallas.compiler_params(num_warps),
  )(live_p, rows_p, upd, seed, rs, qweight)
  if row_scaling:
    scale = scale.at[rows].set(new_rs[:k, 0], unique_indices=True)
  return new_q, scale
