import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from falqon_jax import fp8
import oracle


def _bits(a):
  return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize("fmt", [fp8.E4M3, fp8.E5M2])
def test_scale_matches_float64_division(rng, fmt):
  amax = np.concatenate([
      np.exp(rng.uniform(-30, 30, 5000)).astype(np.float32),
      np.float32([0.0, 1e-13, np.float32(1e-12), np.nextafter(np.float32(1e-12), 1),
                  1e-12 * 0.5, 3e38]),
  ])
  got = np.asarray(fp8.scale_from_amax(amax, fmt))
  want = (fmt.max / np.maximum(amax.astype(np.float64), 1e-12)).astype(np.float32)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  assert got.dtype == np.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compute_scale_per_tensor_and_per_row(rng, dtype):
  x = jnp.asarray(rng.standard_normal((48, 80)) * rng.uniform(0.01, 10), dtype)
  xs = np.asarray(x.astype(jnp.float32))
  s = fp8.compute_scale(x)
  assert s.shape == () and s.dtype == jnp.float32
  assert float(s) == oracle.scale(xs)
  rows = fp8.compute_scale(x, fp8.E5M2, axis=-1)
  assert rows.shape == (48, 1)
  np.testing.assert_array_equal(np.asarray(rows), oracle.scale(xs, oracle.E5M2, axis=-1))


@pytest.mark.parametrize("fmt,ml", [(fp8.E4M3, oracle.E4M3), (fp8.E5M2, oracle.E5M2)])
def test_quantize_rounds_to_nearest_even_like_ml_dtypes(rng, fmt, ml):
  x = (rng.standard_normal(20000) * np.exp(rng.uniform(-8, 8, 20000))).astype(np.float32)
  s = np.float32(rng.uniform(0.1, 10))
  got = fp8.quantize(x, s, fmt)
  assert got.dtype == fmt.dtype
  np.testing.assert_array_equal(_bits(got), _bits(oracle.quantize(x, s, ml)))


def test_quantize_ties_go_to_even():
  # Midpoints between consecutive positive e4m3 codes must round to the even code.
  codes = np.arange(1, 0x7E, dtype=np.uint8)
  lo = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  hi = (codes + 1).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  mid = ((lo + hi) / 2).astype(np.float32)
  got = _bits(fp8.quantize(mid, 1.0))
  want = np.where(codes % 2 == 0, codes, codes + 1)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", [fp8.E4M3, fp8.E5M2])
def test_quantize_saturates_instead_of_nan(fmt):
  x = jnp.array([1e9, -1e9, fmt.max * 1.01, -fmt.max * 1.5, fmt.max, 0.0], jnp.float32)
  q = np.asarray(fp8.quantize(x, 1.0, fmt).astype(jnp.float32))
  assert np.all(np.isfinite(q))
  np.testing.assert_array_equal(q, [fmt.max, -fmt.max, fmt.max, -fmt.max, fmt.max, 0.0])


@pytest.mark.parametrize("fmt", [fp8.E4M3, fp8.E5M2])
def test_roundtrip_error_within_half_ulp(rng, fmt):
  x = (rng.standard_normal(4096) * 3).astype(np.float32)
  s = fp8.compute_scale(x, fmt)
  err = np.abs(np.asarray(fp8.dequantize(fp8.quantize(x, s, fmt), s), np.float64) - x)
  scaled = np.abs(x.astype(np.float64) * float(s))
  min_normal = float(jnp.finfo(fmt.dtype).smallest_normal)
  half_ulp_rel = 2.0 ** -(fmt.mantissa_bits + 1)
  normal = scaled >= min_normal
  assert np.all(err[normal] <= half_ulp_rel * np.abs(x[normal]) * (1 + 1e-6))
  sub_spacing = min_normal * 2.0 ** -fmt.mantissa_bits
  assert np.all(err[~normal] * float(s) <= sub_spacing / 2 * (1 + 1e-6))


def test_dequantize_dtype_and_per_row_broadcast(rng):
  x = rng.standard_normal((16, 32)).astype(np.float32)
  s = fp8.compute_scale(x, axis=-1)
  raw = fp8.quantize(x, s)
  y = fp8.dequantize(raw, s, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and y.shape == (16, 32)
  np.testing.assert_allclose(np.asarray(fp8.dequantize(raw, s)), oracle.dq(raw, s), rtol=1e-6)


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(rng):
  v = np.float32([1.3, -5.7, 100.0, 0.001, -0.0123, 447.9, 250.0])
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 4000)
  samples = np.stack([np.asarray(fp8.quantize_stochastic(v, k).astype(jnp.float32))
                      for k in keys[:50]])
  many = np.asarray(jax.vmap(lambda k: fp8.quantize_stochastic(v, k))(keys)
                    .astype(jnp.float32), np.float64)
  for j, x in enumerate(v.astype(np.float64)):
    near = float(np.float32(x).astype(oracle.E4M3).astype(np.float64))
    codes = np.arange(0, 0x7F, dtype=np.uint8).view(oracle.E4M3).astype(np.float64)
    mag = np.abs(x)
    lo, hi = codes[codes <= mag].max(), codes[codes >= mag].min()
    neighbours = {np.copysign(lo, x), np.copysign(hi, x)}
    assert set(np.unique(samples[:, j])) <= neighbours
    assert near in neighbours
    if lo != hi:  # unbiased: mean within 5 standard errors
      p = (mag - lo) / (hi - lo)
      se = (hi - lo) * np.sqrt(p * (1 - p) / len(keys))
      assert abs(many[:, j].mean() - x) <= 5 * se + 1e-12


def test_stochastic_rounding_keeps_representable_values_and_saturates(rng):
  exact = np.arange(0, 0x7F, dtype=np.uint8).view(oracle.E4M3).astype(np.float32)
  exact = np.concatenate([exact, -exact])
  q = fp8.quantize_stochastic(exact, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), exact)
  big = fp8.quantize_stochastic(jnp.float32([1e6, -1e6]), jax.random.key(4))
  np.testing.assert_array_equal(np.asarray(big.astype(jnp.float32)), [448.0, -448.0])


def test_get_format():
  assert fp8.get_format("E4M3") is fp8.E4M3
  assert fp8.get_format(jnp.float8_e5m2) is fp8.E5M2
  with pytest.raises(ValueError, match="unsupported FP8 format"):
    fp8.get_format("int8")
  with pytest.raises(TypeError, match="floating"):
    fp8.compute_scale(jnp.arange(4))


def test_hash_uniform_is_uniform_and_decorrelated():
  n = 1 << 20
  index = jnp.arange(n, dtype=jnp.uint32)
  u = np.asarray(fp8.hash_uniform(jnp.uint32(12345), jnp.uint32(678), index), np.float64)
  assert u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
  assert abs(u.var() - 1 / 12) < 1e-3
  counts, _ = np.histogram(u, bins=64, range=(0, 1))
  chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
  assert chi2 < 63 + 6 * np.sqrt(2 * 63)  # 63 degrees of freedom, 6 sigma
  # Neighbouring counters, and the same counters under another seed, are uncorrelated.
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(n)
  v = np.asarray(fp8.hash_uniform(jnp.uint32(12346), jnp.uint32(678), index), np.float64)
  assert abs(np.corrcoef(u, v)[0, 1]) < 5 / np.sqrt(n)
  # Same bits under jit and for any array layout of the same counters.
  again = jax.jit(fp8.hash_uniform)(jnp.uint32(12345), jnp.uint32(678), index.reshape(1024, -1))
  np.testing.assert_array_equal(np.asarray(again).ravel(), u.astype(np.float32))
