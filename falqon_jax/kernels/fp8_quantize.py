"""Fused FP8 quantization: amax, scale and saturating cast, per tensor or per row.

``quantize_reference`` is the oracle: exactly ``fp8.compute_scale`` + ``fp8.quantize``.
``quantize_pallas`` reproduces it bit for bit:

* pass 1 (skipped when the caller knows the amax) reads x once and writes one partial
  amax per (row, column block); XLA reduces that small array and turns it into the scale
  with ``fp8.scale_from_amax``, so the scale is the reference's to the bit;
* pass 2 reads x again, multiplies by the scale, clips and casts.

Per-row scaling whose rows fit one block (``next_pow2(cols) <= 16384``) runs as a single
pass: each program owns whole rows, so it can take their amax, form the scale and cast
from one read of x. Ragged edges are handled with masked loads and stores, so no shape
needs to be a multiple of the block.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from falqon_jax.kernels import fp8_quantize as quantize
  >>> x = jax.random.normal(jax.random.key(0), (5, 7), jnp.bfloat16)
  >>> q1, s1 = quantize.quantize_reference(x, "e4m3")
  >>> q2, s2 = quantize.quantize_pallas(x, fmt="e4m3", interpret=True)
  >>> bool((q1.view(jnp.uint8) == q2.view(jnp.uint8)).all() and s1 == s2)
  True
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from falqon_jax import fp8
from falqon_jax.kernels import _pallas
from falqon_jax.kernels._pallas import pl

MAX_FUSED_COLS = 16384
"""Per-row quantization runs in one pass while a whole (padded) row fits one block."""


def quantize_reference(
    x: jax.Array, fmt=fp8.E4M3, *, axis=None, amax: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
  """``(fp8.quantize(x, s, fmt), s)`` with ``s`` from ``x`` or from a known ``amax``."""
  if amax is None:
    scale = fp8.compute_scale(x, fmt, axis=axis)
  else:
    scale = fp8.scale_from_amax(amax, fmt)
  return fp8.quantize(x, scale, fmt), scale


def default_block_shape(m: int, n: int, per_row: bool) -> tuple[int, int]:
  """Power-of-two (rows, cols) blocks of about 8192 elements (unmeasured on GPU)."""
  if per_row and _pallas.next_pow2(n) <= MAX_FUSED_COLS:
    bn = _pallas.next_pow2(n)
  else:
    bn = min(_pallas.next_pow2(n), 1024)
  bm = min(max(1, 8192 // bn), _pallas.next_pow2(m))
  return bm, bn


def _block_mask(i, j, bm, bn, m, n):
  rows = _pallas.iota2((bm, bn), 0, i * bm)
  cols = _pallas.iota2((bm, bn), 1, j * bn)
  return (rows < m) & (cols < n)


def _amax_kernel(x_ref, amax_ref, *, m, n):
  i, j = pl.program_id(0), pl.program_id(1)
  bm, bn = x_ref.shape
  x = _pallas.load(x_ref, _block_mask(i, j, bm, bn, m, n))
  # |x| and max are exact, so taking them in f32 equals the reference's bf16 max.
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True)
  row_ok = _pallas.iota2((bm, 1), 0, i * bm) < m
  _pallas.store(amax_ref, amax, row_ok)


def _scale_kernel(x_ref, s_ref, q_ref, *, m, n, fmt, per_row):
  i, j = pl.program_id(0), pl.program_id(1)
  bm, bn = x_ref.shape
  mask = _block_mask(i, j, bm, bn, m, n)
  x = _pallas.load(x_ref, mask)
  if per_row:
    s = _pallas.load(s_ref, _pallas.iota2((bm, 1), 0, i * bm) < m)
  else:
    s = s_ref[...]
  _pallas.store(q_ref, fp8.quantize(x, s, fmt), mask)


def _fused_row_kernel(x_ref, q_ref, s_ref, *, m, n, fmt, interpret):
  i = pl.program_id(0)
  bm, bn = x_ref.shape
  mask = _block_mask(i, 0, bm, bn, m, n)
  x = _pallas.load(x_ref, mask)
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True)
  s = fp8.scale_from_amax(amax, fmt, div=functools.partial(_pallas.div_rn, interpret=interpret))
  _pallas.store(q_ref, fp8.quantize(x, s, fmt), mask)
  _pallas.store(s_ref, s, _pallas.iota2((bm, 1), 0, i * bm) < m)


def _call(kernel, grid, in_specs, out_specs, out_shape, *, interpret, num_warps):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=interpret,
      compiler_params=None if interpret else _pallas.compiler_params(num_warps),
  )


@functools.partial(
    jax.jit, static_argnames=("fmt", "per_row", "block_shape", "interpret", "num_warps")
)
def quantize_pallas(
    x: jax.Array,
    amax: Optional[jax.Array] = None,
    *,
    fmt=fp8.E4M3,
    per_row: bool = False,
    block_shape: Optional[tuple[int, int]] = None,
    interpret: bool = False,
    num_warps: Optional[int] = None,
) -> tuple[jax.Array, jax.Array]:
  """Pallas twin of :func:`quantize_reference` for a 2-D ``x`` (no input validation).

  ``amax``, if given, has shape ``()`` (per tensor) or ``(rows, 1)`` (per row) and skips
  the amax pass. Returns ``(q, scale)`` with scale ``()`` or ``(rows, 1)``.
  """
  fmt = fp8.get_format(fmt)
  m, n = x.shape
  bm, bn = block_shape or default_block_shape(m, n, per_row)
  num_warps = num_warps or (8 if bm * bn >= 8192 else 4)
  gm, gn = pl.cdiv(m, bm), pl.cdiv(n, bn)
  call = functools.partial(_call, interpret=interpret, num_warps=num_warps)
  x_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
  row_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
  q_shape = jax.ShapeDtypeStruct((m, n), fmt.dtype)

  if per_row and amax is None and gn == 1:
    kernel = functools.partial(_fused_row_kernel, m=m, n=n, fmt=fmt, interpret=interpret)
    return call(
        kernel, (gm,), [pl.BlockSpec((bm, bn), lambda i: (i, 0))],
        [pl.BlockSpec((bm, bn), lambda i: (i, 0)), pl.BlockSpec((bm, 1), lambda i: (i, 0))],
        [q_shape, jax.ShapeDtypeStruct((m, 1), jnp.float32)],
    )(x)

  if amax is None:
    partial = call(
        functools.partial(_amax_kernel, m=m, n=n), (gm, gn), [x_spec],
        pl.BlockSpec((bm, 1), lambda i, j: (i, j)),
        jax.ShapeDtypeStruct((m, gn), jnp.float32),
    )(x)
    amax = jnp.max(partial, axis=1, keepdims=True) if per_row else jnp.max(partial)
  scale = fp8.scale_from_amax(amax, fmt)
  s_in, s_spec = (scale, row_spec) if per_row else (
      scale.reshape(1, 1), pl.BlockSpec((1, 1), lambda i, j: (0, 0)))
  kernel = functools.partial(_scale_kernel, m=m, n=n, fmt=fmt, per_row=per_row)
  q = call(kernel, (gm, gn), [x_spec, s_spec], x_spec, q_shape)(x, s_in)
  return q, scale
