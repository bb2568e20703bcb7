"""The melded FP8 linear: one GEMM gives ``[y | Ax]``; the backward needs only ``Ax``.

Spec: falqon-reference.md sections 3 and 4. Every GEMM is ``lax.dot_general`` on FP8
operands with ``preferred_element_type=float32``, both operands contracting on their last
dim (the "TN" layout Hopper FP8 GEMMs need), and the scales multiplied in after the dot,
so XLA can lower each one to a single cuBLASLt FP8 call.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from falqon_jax import fp8
from falqon_jax._melded_kernel import MeldedKernel

_TN = (((1,), (1,)), ((), ()))  # contract the last dim of both 2-D operands


def _fp8_gemm(a, b, inv_scale, precision, out_dtype):
  """``(a @ b.T) * inv_scale`` with fp8 operands, f32 accumulation, one final rounding."""
  acc = lax.dot_general(
      a, b, _TN, precision=precision, preferred_element_type=jnp.float32
  )
  return (acc * inv_scale).astype(out_dtype)


def _quantize(x, fmt, implementation):
  """Per-tensor scale and FP8 cast: plain jnp, or a Pallas kernel when asked for."""
  # An empty batch leaves a kernel nothing to do (kernels.quantize refuses it); jnp takes
  # its amax as 0. The shape is static, so this costs a non-empty program nothing.
  if implementation == "xla" or x.size == 0:
    scale = fp8.compute_scale(x, fmt)
    return fp8.quantize(x, scale, fmt), scale
  from falqon_jax import kernels  # imported lazily: kernels import the core
  return kernels.quantize(x, fmt, implementation=implementation)


def _forward(x2, qweight, scale, out_features, scaling, implementation, delta=None):
  xq, sx = _quantize(x2, fp8.E4M3, implementation)
  # cuBLASLt semantics: D = (1/s_a) * (1/s_b) * acc, rounded once to the output dtype.
  inv = (1.0 / sx) * (1.0 / scale)  # 0-d, or (out + rank,) with row scaling
  if delta is None:
    z = _fp8_gemm(xq, qweight, inv, lax.Precision.DEFAULT, x2.dtype)
    # Ax comes out in x's dtype (bf16 in training), as the reference saves it.
    return z[:, :out_features], z[:, out_features:]
  # live_delta: y = xWᵀ + (Ax) Bᵀ, the pending ΔBuffer through a thin (N x r x out) GEMM
  # on the Ax the fused GEMM gave, added before y's one rounding.
  z = _fp8_gemm(xq, qweight, inv, lax.Precision.DEFAULT, jnp.float32)
  ax = z[:, out_features:].astype(x2.dtype)
  y = z[:, :out_features] + jnp.dot(ax, delta.T.astype(x2.dtype),
                                    preferred_element_type=jnp.float32)
  return y.astype(x2.dtype), ax


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _melded_matmul(x2, qweight, scale, delta, out_features, scaling, implementation,
                   live_delta):
  # Without live_delta the forward ignores delta: it is zero after every full merge.
  y, _ = _forward(x2, qweight, scale, out_features, scaling, implementation,
                  delta if live_delta else None)
  return y


def _melded_matmul_fwd(x2, qweight, scale, delta, out_features, scaling, implementation,
                       live_delta):
  y, ax = _forward(x2, qweight, scale, out_features, scaling, implementation,
                   delta if live_delta else None)
  # Residuals: Ax (N x rank) plus references to inputs that live anyway. Never x.
  return y, (ax, qweight, scale, delta)


def _melded_matmul_bwd(out_features, scaling, implementation, live_delta, residuals, g):
  ax, qweight, scale, delta = residuals
  rows = out_features
  if live_delta:
    # dx = g (W + BA) = [g | gB] . [W; A]: the stored melded rows, one GEMM whose
    # contraction grows by r, after a thin (N x out x r) GEMM for gB.
    gb = jnp.dot(g, delta.astype(g.dtype), preferred_element_type=jnp.float32)
    g = jnp.concatenate([g, gb.astype(g.dtype)], axis=1)
    rows = qweight.shape[0]
  if scaling == "row":
    # Fold the row scales into g, so dx is one GEMM against the raw rows.
    row_scale = scale[:rows]
    g_src = g.astype(jnp.float32) * (1.0 / row_scale)
    inv_w = 1.0
  else:
    g_src = g
    inv_w = 1.0 / scale
  gq, sg = _quantize(g_src, fp8.E5M2, implementation)

  # dx = e5m2(g) . W: backbone rows only, unless live_delta (with delta = 0 the adapter
  # adds nothing to dx). W is stored (out, in); TN needs the contracting dim `out` last,
  # hence the fp8 transpose (1 byte per element, which XLA would otherwise insert itself).
  w_t = qweight[:rows].T
  dx = _fp8_gemm(gq, w_t, (1.0 / sg) * inv_w, lax.Precision.HIGHEST, g.dtype)
  if live_delta:
    gq = gq[:, :out_features]  # d(delta) = gᵀ . Ax takes g's own columns
    if scaling == "row":
      row_scale = row_scale[:out_features]

  # d(delta) = g^T . e4m3(Ax): no weight gradient at all, no x needed.
  axq, s_ax = _quantize(ax, fp8.E4M3, implementation)
  inv_d = (1.0 / sg) * (1.0 / s_ax)
  if scaling == "row":
    inv_d = inv_d * row_scale[:, None]
  d_delta = _fp8_gemm(gq.T, axq.T, inv_d, lax.Precision.HIGHEST, g.dtype)
  return dx, None, None, d_delta.astype(delta.dtype)


_melded_matmul.defvjp(_melded_matmul_fwd, _melded_matmul_bwd)


def melded_dense(
    x: jax.Array,
    mk: MeldedKernel,
    bias: Optional[jax.Array] = None,
    *,
    implementation: Union[str, Sequence[str]] = "xla",
) -> jax.Array:
  """``y = x @ W`` through the melded FP8 kernel, with FALQON's custom gradient.

  Forward: quantize ``x`` (e4m3, per tensor) once; one FP8 GEMM against ``[W; A]`` gives
  ``y`` and ``Ax``; only ``Ax`` is saved. Backward: ``dx = e5m2(g) . W`` and
  ``d(delta) = g^T . e4m3(Ax)``, both FP8 GEMMs. ``qweight`` and ``scale`` get no
  gradient. ``delta`` enters the forward only for a kernel melded with ``live_delta``:
  then ``y = x (W + BA)ᵀ`` (one thin GEMM on ``Ax``) and ``dx = e5m2([g | gB]) . [W; A]``.

  Args:
    x: ``(..., in)``, bf16 or f32. The output has x's dtype.
    mk: the melded kernel.
    bias: optional ``(out,)`` bias, added after the GEMM in the output dtype.
    implementation: how the three FP8 quantizations run: ``"xla"`` (plain jnp, the
      default), ``"pallas"`` (``falqon_jax.kernels``), or a sequence tried in order.

  Returns:
    ``(..., out)``; empty for an empty batch, whose ``delta`` gradient is zero.

  Example:
    >>> import jax, jax.numpy as jnp, falqon_jax
    >>> mk = falqon_jax.meld_kernel(jax.random.normal(jax.random.key(0), (64, 32)), 16)
    >>> x = jax.random.normal(jax.random.key(1), (4, 8, 64), jnp.bfloat16)
    >>> falqon_jax.melded_dense(x, mk).shape
    (4, 8, 32)
  """
  if not isinstance(mk, MeldedKernel):
    raise TypeError(
        f"melded_dense needs a MeldedKernel, got {type(mk).__name__}; meld the kernel"
        " first with falqon_jax.meld_kernel or falqon_jax.meld"
    )
  if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != mk.in_features:
    raise ValueError(
        f"x must have shape (..., {mk.in_features}) to match the kernel"
        f" ({mk.in_features}, {mk.out_features}), got {getattr(x, 'shape', type(x))}"
    )
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
    raise TypeError(f"x must be bf16, f16 or f32, got {x.dtype}")
  x2 = x.reshape(-1, mk.in_features)
  if not isinstance(implementation, str):
    implementation = tuple(implementation)  # a static argument must be hashable
  y = _melded_matmul(x2, mk.qweight, mk.scale, mk.delta, mk.out_features, mk.scaling,
                     implementation, mk.live_delta)
  y = y.reshape(*x.shape[:-1], mk.out_features)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def dense(x: jax.Array, kernel, bias: Optional[jax.Array] = None) -> jax.Array:
  """``x @ kernel + bias`` for a plain ``(in, out)`` kernel or a :class:`MeldedKernel`.

  Lets one model function run both before and after :func:`falqon_jax.meld`.
  """
  if isinstance(kernel, MeldedKernel):
    return melded_dense(x, kernel, bias)
  y = jnp.dot(x, kernel.astype(x.dtype))
  return y if bias is None else y + bias.astype(y.dtype)
