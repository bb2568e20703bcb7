"""Small helpers shared by the Pallas kernels (Triton backend, or interpret mode).

Why Triton and not Mosaic GPU: both kernels are memory-bound gathers, elementwise maths
and reductions with no matrix-unit work, which is what ``pallas_call`` + ``BlockSpec`` on
Triton expresses directly, with masked loads/stores for ragged edges and pointer-array
indexing for the row gather. Triton runs on every sm89+ card (L4, L40S, RTX 4090, H100,
H200), where FP8 casts exist; Mosaic GPU needs sm90a and in jax 0.10.2 its ``pallas_call``
entry point is already deprecated in favour of ``plgpu.kernel``. Triton is deprecated in
jax 0.11 but still ships there; the kernels touch only ``pallas_call``, ``BlockSpec``,
``plt.load``/``plt.store``/``plt.CompilerParams`` and ``plt.elementwise_inline_asm``, so a
later port is local to these files.

Triton rounds an f32 ``/`` to ``div.full.f32`` (not correctly rounded), while XLA divides
exactly; :func:`div_rn` emits ``div.rn.f32`` so that kernel and reference agree bit for bit.

Example:
  >>> import jax.numpy as jnp
  >>> from falqon_jax.kernels import _pallas
  >>> float(_pallas.div_rn(jnp.float32(3.0), jnp.float32(4.0), interpret=True))
  0.75
  >>> _pallas.next_pow2(100)
  128
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

with warnings.catch_warnings():
  # jax 0.11 deprecates the Triton backend; the module still ships there.
  warnings.simplefilter("ignore", DeprecationWarning)
  from jax.experimental.pallas import triton as plt


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def compiler_params(num_warps: int = 4, num_stages: int = 1):
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def div_rn(a: jax.Array, b: jax.Array, *, interpret: bool) -> jax.Array:
  """Correctly rounded float32 ``a / b`` (same shape), on Triton and in interpret mode."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape)
  if interpret:
    return a / b
  (out,) = plt.elementwise_inline_asm(
      "div.rn.f32 $0, $1, $2;",
      args=[a, b],
      constraints="=f,f,f",
      pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
  )
  return out


def iota2(shape: tuple[int, int], dim: int, offset) -> jax.Array:
  """``offset + index`` along ``dim`` of a 2-D block (int32)."""
  return offset + jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def load(ref, mask, other=0):
  """Masked load: ``other`` where ``mask`` is False (never reads out of bounds)."""
  shape = mask.shape
  return plt.load(ref, mask=mask, other=jnp.full(shape, other, ref.dtype))


def store(ref, value, mask):
  plt.store(ref, value.astype(ref.dtype), mask=mask)


__all__ = ["pl", "plt", "next_pow2", "compiler_params", "div_rn", "iota2", "load", "store"]
