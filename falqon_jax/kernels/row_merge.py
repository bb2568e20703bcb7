"""The in-place row merge: new FP8 rows for the selected rows, written where they are.

The merge's math is ``falqon_jax._merge_math``, run here on the blocks the kernel loads;
this file holds only what is Pallas-specific: the grid, the blocks and their masks, the
in-place write through ``input_output_aliases``, and the two sweeps row scaling needs.
``merge_pallas`` gives the bytes of ``_merge_math.merge_reference`` wherever the two
programs compute the f32 update with the same bits (a last-bit difference can move an
element by one e4m3 step):

* XLA computes the small update (``_merge_math.row_update``, k x rank x in MACs) as the
  reference does: an f32 dot's summation order depends on its shapes (on CPU, a (k, r) x
  (r, 32) block gives different bits from the same columns of a (k, r) x (r, in)
  product), so a blocked in-kernel dot could not match;
* the kernel gathers the k raw rows, adds the update, (row scaling) shrinks a saturating
  row's scale, rounds (``_merge_math.round_rows``, hashing the stochastic uniforms in
  registers, so nothing random is read from memory), and stores the rows into ``qweight``
  in place. No other byte is read or written, nor are the rows ``live_rows`` drops (a
  non-finite delta, or past ``active``).

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
from jax import lax

from falqon_jax import _merge_math, fp8
from falqon_jax._merge_math import merge_reference  # the oracle, beside its twin
from falqon_jax.kernels import _pallas
from falqon_jax.kernels._pallas import pl

__all__ = ["default_block_shape", "merge_pallas", "merge_reference"]


def default_block_shape(k: int, n: int, scaling: str) -> tuple[int, int]:
  """Power-of-two (selected rows, cols) blocks (unmeasured on GPU)."""
  if scaling == "row":  # one program per row block loops over the columns twice
    return min(_pallas.next_pow2(k), 4), min(_pallas.next_pow2(n), 1024)
  return min(_pallas.next_pow2(k), 8), min(_pallas.next_pow2(n), 512)


def _merge_kernel(live_ref, rows_ref, upd_ref, seed_ref, rs_ref, q_in_ref, q_ref, ns_ref, *,
                  k, n, bn, stochastic, row_scaling, interpret):
  del q_in_ref  # aliased with q_ref: read and write through the output ref
  i = pl.program_id(0)
  (kb,) = rows_ref.shape
  live = live_ref[...][:, None] != 0  # dropped rows keep their own bytes: never written
  row_ok = _pallas.iota2((kb, 1), 0, i * kb) < k
  rows = rows_ref[...][:, None]  # padded to the block: in bounds, pads point past the end
  sel = _pallas.iota2((kb, bn), 0, i * kb)  # position among the k selected rows
  div = functools.partial(_pallas.div_rn, interpret=interpret)

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
    seed = (seed_ref[0], seed_ref[1]) if stochastic else None
    new = _merge_math.round_rows(v, qrows, cols, n, seed, div=div)
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
  shrink = _merge_math.shrink_factor(amax, div)

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
  live = _merge_math.live_rows(delta[rows], active)
  # Zero for dropped rows, so that no NaN reaches the kernel (a row-scaled amax included).
  d_rows = jnp.where(live[:, None], delta[rows].astype(jnp.float32), 0.0)
  upd = _merge_math.row_update(qweight, scale, d_rows, rows, out_features=out_features,
                               scaling=scaling)
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
