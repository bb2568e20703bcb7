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


def assert_merged_fp8_equal(got, want, max_fraction=0.01):
  """Merged FP8 weights equal bit for bit where the merge product is exact f32 (CPU).

  Elsewhere the product runs at ``_merge.MERGE_PRECISION`` (TF32 on GPUs, 3-pass bf16 on
  TPUs), whose ~2^-11 relative error can move a sum across an e4m3 rounding boundary:
  there a few elements may differ, by one e4m3 step at most.
  """
  import jax

  got, want = np.asarray(got), np.asarray(want)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    return
  g, w = got.astype(np.float64), want.astype(np.float64)
  diff = np.abs(g - w)
  assert np.all(diff <= e4m3_step(np.maximum(np.abs(g), np.abs(w)))), np.max(diff)
  assert np.mean(diff > 0) <= max_fraction, np.mean(diff > 0)
