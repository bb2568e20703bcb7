"""Independent numpy oracles written from the spec (falqon-reference.md), not from the code.

Float64 where the spec's math is exact; ml_dtypes for the FP8 casts (round to nearest even).
"""

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn
E5M2 = ml_dtypes.float8_e5m2
MAX = {E4M3: 448.0, E5M2: 57344.0}


def scale(x, fmt=E4M3, axis=None):
  """fp32(max / max(amax, 1e-12)), the division in float64 as torchao does it."""
  amax = np.max(np.abs(np.asarray(x, np.float64)), axis=axis, keepdims=axis is not None)
  return (MAX[fmt] / np.maximum(amax, 1e-12)).astype(np.float32)


def quantize(x, s, fmt=E4M3):
  v = np.asarray(x, np.float32) * np.asarray(s, np.float32)
  return np.clip(v, -MAX[fmt], MAX[fmt]).astype(fmt)


def dq(raw, s):
  return np.asarray(raw, np.float64) / np.asarray(s, np.float64)


def rel_err(a, ref):
  a = np.asarray(a, np.float64)
  ref = np.asarray(ref, np.float64)
  return np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30)


def merge_full_matrix(qweight, delta, k, out):
  """The reference's apply_delta_weight: upcast the whole weight, add, recast."""
  raw = np.asarray(qweight).astype(np.float32)
  l1 = np.abs(np.asarray(delta, np.float32)).sum(-1)
  idx = np.argsort(-l1, kind="stable")[:k]
  w, a = raw[:out].copy(), raw[out:]
  w[idx] = (w[idx].astype(np.float64)
            + np.asarray(delta, np.float64)[idx] @ a.astype(np.float64)).astype(np.float32)
  new = np.clip(np.concatenate([w, a]), -448, 448).astype(E4M3)
  return new, idx


def e4m3_step(v):
  """The e4m3 spacing at |v|: 2^(e - 3) for normals, 2^-9 for subnormals."""
  a = np.abs(np.asarray(v, np.float64))
  e = np.floor(np.log2(np.maximum(a, 2.0**-6)))
  return 2.0 ** (e - 3)


def assert_fp8_close(got, want, max_fraction=0.001):
  """FP8 arrays equal but for a few elements one e4m3 step apart.

  For bytes rounded from f32 values that two different programs computed (another fusion
  or kernel, a float64 oracle, another CPU's vector width): a last-bit difference can put
  a value on the other side of an e4m3 rounding boundary. At most
  ``max(1, max_fraction * size)`` elements may differ.
  """
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  g, w = got.astype(np.float64), want.astype(np.float64)
  diff = np.abs(g - w)
  assert np.all(diff <= e4m3_step(np.maximum(np.abs(g), np.abs(w)))), np.nanmax(diff)
  differ = np.count_nonzero(got.view(np.uint8) != want.view(np.uint8))
  assert differ <= max(1, max_fraction * got.size), (differ, got.size)


def assert_merged_fp8_close(got, want):
  """Merged FP8 weights against :func:`merge_full_matrix`, the float64 oracle.

  The merge sums in f32, so a sum within its rounding error of an e4m3 boundary may round
  the other way. On CPU the product is full f32 (a last-bit error: rare flips); elsewhere
  ``_merge.MERGE_PRECISION`` (TF32 on GPUs, 3-pass bf16 on TPUs) errs by ~2^-11, so up
  to 1% of the elements may flip.
  """
  import jax

  assert_fp8_close(got, want, 0.001 if jax.default_backend() == "cpu" else 0.01)
