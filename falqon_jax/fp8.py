"""FP8 formats and per-tensor / per-row scaling, as the FALQON reference computes them.

The reference is torchao v0.8.0 (``float8_utils.amax_to_scale``, ``to_fp8_saturated``,
``Float8Tensor``). In that convention the *scale multiplies*: the stored raw value is
``x * scale`` and the dequantized value is ``raw / scale``.

* ``compute_scale(x, fmt)`` is ``fp32(max_fmt / max(amax(x), 1e-12))``. torchao divides in
  float64 and rounds to float32; a correctly rounded float32 division gives the same bits
  (53 >= 2*24 + 2, so double rounding is innocuous), which keeps this x64-free.
* ``quantize(x, scale, fmt)`` saturates: ``cast(clip(f32(x) * scale, -max, max))``. A plain
  cast would turn overflow into NaN (e4m3fn has no infinity).
* ``dequantize(raw, scale, dtype)`` is ``raw / scale``.
* ``quantize_stochastic(scaled, key)`` rounds to a neighbouring FP8 value at random,
  unbiased, with counter-based uniforms (``hash_uniform``) that need no random-bits buffer.

Example:
  >>> import jax.numpy as jnp
  >>> from falqon_jax import fp8
  >>> x = jnp.array([[0.5, -2.0], [3.0, 1e-3]])
  >>> s = fp8.compute_scale(x, fp8.E4M3)
  >>> raw = fp8.quantize(x, s, fp8.E4M3)
  >>> err = jnp.abs(fp8.dequantize(raw, s) - x) / jnp.abs(x)
  >>> bool(jnp.all(err <= 2.0**-4))  # half an ULP: 3 mantissa bits
  True
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from falqon_jax.errors import UserInputError

__all__ = [
    "Format",
    "E4M3",
    "E5M2",
    "FORMATS",
    "AMAX_EPS",
    "get_format",
    "compute_scale",
    "scale_from_amax",
    "quantize",
    "dequantize",
    "quantize_stochastic",
    "round_stochastic",
    "stochastic_seed",
    "hash_uniform",
]

AMAX_EPS = 1e-12
"""torchao's floor on amax (``EPS`` in ``float8_utils``), applied in float64 there."""


@dataclasses.dataclass(frozen=True)
class Format:
  """An FP8 storage format: its dtype and its largest finite magnitude."""

  name: str
  dtype: jnp.dtype
  max: float
  mantissa_bits: int

  def __repr__(self) -> str:
    return f"fp8.{self.name.upper()}"


E4M3 = Format("e4m3", jnp.dtype(jnp.float8_e4m3fn), 448.0, 3)
"""float8_e4m3fn: weights and activations (max 448, no infinities)."""

E5M2 = Format("e5m2", jnp.dtype(jnp.float8_e5m2), 57344.0, 2)
"""float8_e5m2: output gradients (max 57344)."""

FORMATS = {"e4m3": E4M3, "e5m2": E5M2}

FormatLike = Union[Format, str, jnp.dtype, type]


def get_format(fmt: FormatLike) -> Format:
  """Returns the :class:`Format` for a Format, a name ('e4m3'/'e5m2') or a dtype."""
  if isinstance(fmt, Format):
    return fmt
  if isinstance(fmt, str) and fmt.lower() in FORMATS:
    return FORMATS[fmt.lower()]
  try:
    dtype = jnp.dtype(fmt)
  except TypeError:
    dtype = None
  for f in FORMATS.values():
    if dtype == f.dtype:
      return f
  raise UserInputError(
      f"unsupported FP8 format {fmt!r}: use fp8.E4M3, fp8.E5M2, 'e4m3' or 'e5m2'"
  )


def _eps_threshold() -> np.float32:
  # amax is float32; torchao clamps it in float64 at 1e-12. float32(1e-12) is just below
  # 1e-12, so every float32 amax <= float32(1e-12) clamps to exactly 1e-12.
  return np.float32(AMAX_EPS)


def scale_from_amax(amax: jax.Array, fmt: FormatLike, *, div=jnp.divide) -> jax.Array:
  """``fp32(max_fmt / max(amax, 1e-12))`` for an amax of any shape.

  ``div`` is a correctly rounded float32 division (a Pallas kernel passes its own).
  """
  fmt = get_format(fmt)
  amax = jnp.asarray(amax, jnp.float32)
  tiny_scale = np.float32(fmt.max / AMAX_EPS)  # the float64 quotient, rounded once
  ratio = div(jnp.full(amax.shape, fmt.max, jnp.float32), amax)
  return jnp.where(amax <= _eps_threshold(), tiny_scale, ratio).astype(jnp.float32)


def _amax(x: jax.Array, axis: Optional[Union[int, Sequence[int]]]) -> jax.Array:
  # |x| and max are exact in x's own dtype; upcast the (small) result only. An empty
  # reduction needs an identity: |x| >= 0, so 0 is one. It is passed for empty x only,
  # which leaves every other program as it is.
  initial = 0 if x.size == 0 else None
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None, initial=initial)
  return amax.astype(jnp.float32)


def compute_scale(
    x: jax.Array,
    fmt: FormatLike = E4M3,
    *,
    axis: Optional[Union[int, Sequence[int]]] = None,
) -> jax.Array:
  """The scale that maps ``amax(x)`` onto the format's largest value.

  The amax of nothing (an empty ``x``, or empty reduced axes) is 0, which gives the
  largest scale, as an all-zero ``x`` does.

  Args:
    x: a floating array.
    fmt: the target format.
    axis: ``None`` for one per-tensor scale (a 0-d float32, the reference's default);
      otherwise the axis or axes reduced for the amax, kept with size 1 so that the
      scale broadcasts against ``x`` (e.g. ``axis=-1`` gives one scale per row).

  Returns:
    float32 scale(s).
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"compute_scale needs a floating array, got {x.dtype}")
  return scale_from_amax(_amax(x, axis), fmt)


def quantize(x: jax.Array, scale: jax.Array, fmt: FormatLike = E4M3) -> jax.Array:
  """Saturating cast of ``x * scale`` to FP8, rounding to nearest even."""
  fmt = get_format(fmt)
  scaled = jnp.asarray(x).astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
  return jnp.clip(scaled, -fmt.max, fmt.max).astype(fmt.dtype)


def dequantize(
    raw: jax.Array, scale: jax.Array, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
  """``raw / scale`` computed in float32, returned in ``dtype``."""
  raw = jnp.asarray(raw)
  return (raw.astype(jnp.float32) / jnp.asarray(scale, jnp.float32)).astype(dtype)


def stochastic_seed(key: jax.Array) -> jax.Array:
  """The two uint32 words that seed :func:`hash_uniform`, drawn from a PRNG key."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _mix32(x):
  # "lowbias32" (C. Wellons): a 32-bit bijection with near-ideal avalanche.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_uniform(seed0: jax.Array, seed1: jax.Array, index: jax.Array) -> jax.Array:
  """Counter-based uniforms in [0, 1): float32 with 24 random bits, one per ``index``.

  A keyed hash of each element's uint32 counter, in integer ops only. Unlike
  ``jax.random.uniform`` it needs no random-bits buffer: it fuses into its consumer on
  every backend and runs inside Pallas kernels, with the same bits everywhere, so the
  stochastic merge draws nothing weight-sized. Distinct counters give distinct hashes
  for one seed (the mixer is a bijection).
  """
  x = _mix32(index.astype(jnp.uint32) ^ seed0)
  x = _mix32(x ^ seed1)
  return (x >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def quantize_stochastic(
    scaled: jax.Array, key: jax.Array, fmt: FormatLike = E4M3, *,
    index: Optional[jax.Array] = None,
) -> jax.Array:
  """Stochastically rounds already-scaled float32 values to FP8, with saturation.

  Each value goes to one of its two neighbouring FP8 values, up with probability equal to
  its distance from the lower one over the gap, so the result is unbiased: a small merge
  update survives in expectation instead of always rounding away. Values that are
  exactly representable (including zero) come back unchanged, with no randomness.

  The uniforms are :func:`hash_uniform` of ``index`` (default: each element's flat
  position) under a seed drawn from ``key``; pass the elements' positions in a larger
  array as ``index`` to draw the same numbers a kernel working on that array draws.
  """
  fmt = get_format(fmt)
  v = jnp.asarray(scaled, jnp.float32)
  if index is None:
    index = lax.broadcasted_iota(jnp.uint32, (v.size,), 0).reshape(v.shape)
  seed = stochastic_seed(key)
  u = hash_uniform(seed[0], seed[1], jnp.broadcast_to(index, v.shape))
  return round_stochastic(v, u, fmt)


def round_stochastic(
    v: jax.Array, u: jax.Array, fmt: FormatLike = E4M3, *, div=jnp.divide
) -> jax.Array:
  """:func:`quantize_stochastic` given its float32 uniforms ``u`` (shaped like ``v``).

  Plain jnp on any shape, so a Pallas kernel runs it on its blocks; ``div`` is a
  correctly rounded float32 division (a kernel passes its own, ``/`` is not one on Triton).
  """
  fmt = get_format(fmt)
  v = jnp.clip(v, -fmt.max, fmt.max)
  mag = jnp.abs(v)
  # Non-negative FP8 values are monotone in their bit patterns, so the two neighbours of
  # |v| are adjacent codes: take the nearest code, then step down if it overshot.
  near = _bitcast(mag.astype(fmt.dtype), jnp.uint8)
  near_val = _bitcast(near, fmt.dtype).astype(jnp.float32)
  lo = jnp.where(near_val > mag, near - 1, near).astype(jnp.uint8)
  top = int(np.array(fmt.max, fmt.dtype).view(np.uint8))
  hi = jnp.minimum(lo + 1, top).astype(jnp.uint8)
  lo_val = _bitcast(lo, fmt.dtype).astype(jnp.float32)
  hi_val = _bitcast(hi, fmt.dtype).astype(jnp.float32)
  gap = hi_val - lo_val
  p_up = jnp.where(gap > 0, div(mag - lo_val, jnp.where(gap > 0, gap, 1.0)), 0.0)
  code = jnp.where(u < p_up, hi, lo)
  sign = jnp.where(jnp.signbit(v), jnp.uint8(0x80), jnp.uint8(0))
  return _bitcast(code | sign, fmt.dtype)


def _bitcast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Same-width bit reinterpretation (fp8 <-> uint8)."""
  return jax.lax.bitcast_convert_type(x, dtype)
