"""falqon_jax.kernels.quantize: the Pallas kernel (interpret mode) against its reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax import fp8, kernels
from falqon_jax.kernels import fp8_quantize as kq

SHAPE = (37, 100)  # ragged against every block used below
SMALL_BLOCK = (16, 64)  # two-pass path: 3 x 2 grid steps per pass


def _bits(q):
  return np.asarray(jax.lax.bitcast_convert_type(q, jnp.uint8))


def _input(rng, dtype, shape=SHAPE):
  x = rng.standard_normal(shape).astype(np.float32)
  x *= np.exp(rng.uniform(-6, 6, size=(shape[0], 1))).astype(np.float32)  # varied row scales
  x[3] = 0.0  # an all-zero row: per-row scale takes the 1e-12 floor
  x[5, :7] = -1e-30  # tiny negatives round to -0
  return jnp.asarray(x, dtype)


def _assert_same(got, want):
  """Bit for bit, whichever program runs it: quantizing is exact by construction (an
  exact max, one correctly rounded divide and multiply, a round-to-nearest cast)."""
  (q1, s1), (q2, s2) = got, want
  assert q1.dtype == q2.dtype and q1.shape == q2.shape
  np.testing.assert_array_equal(_bits(q1), _bits(q2))
  assert s1.shape == s2.shape and s1.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(s1).view(np.uint32), np.asarray(s2).view(np.uint32))


# A pairwise cover of format x input dtype x scaling x path (compiles dominate the time).
# Per row, the default block holds whole rows: the single-pass kernel.
@pytest.mark.parametrize(
    "fmt, dtype, axis, block",
    [
        ("e4m3", jnp.bfloat16, None, SMALL_BLOCK),
        ("e5m2", jnp.float32, None, None),
        ("e4m3", jnp.float32, -1, SMALL_BLOCK),
        ("e5m2", jnp.bfloat16, -1, SMALL_BLOCK),
        ("e4m3", jnp.bfloat16, -1, None),
        ("e5m2", jnp.float32, -1, None),
    ],
)
def test_pallas_matches_reference(rng, fmt, dtype, axis, block):
  x = _input(rng, dtype)
  want = kq.quantize_reference(x, fmt, axis=axis)
  got = kernels.quantize(x, fmt, axis=axis, implementation="pallas", interpret=True,
                         block_shape=block)
  _assert_same(got, want)


@pytest.mark.parametrize("axis", [None, -1])
def test_known_amax_saturates(rng, axis):
  """An amax below the true one (e.g. a stale one) makes values clip at ±max, not NaN."""
  x = _input(rng, jnp.float32)
  true_amax = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None)
  amax = true_amax * 0.25
  want = kq.quantize_reference(x, fp8.E4M3, axis=axis, amax=amax)
  arg = amax[:, 0] if axis is not None else amax  # (rows,) is accepted too
  got = kernels.quantize(x, "e4m3", axis=axis, amax=arg, implementation="pallas",
                         interpret=True, block_shape=SMALL_BLOCK)
  _assert_same(got, want)
  q = np.asarray(got[0].astype(jnp.float32))
  assert np.isfinite(q).all() and (np.abs(q) == 448.0).sum() > 10


def test_all_zero_tensor():
  x = jnp.zeros((9, 20), jnp.bfloat16)
  want = kq.quantize_reference(x, "e5m2")
  got = kernels.quantize(x, "e5m2", implementation="pallas", interpret=True)
  _assert_same(got, want)


def test_xla_is_default_and_reference(rng):
  x = _input(rng, jnp.bfloat16)
  _assert_same(kernels.quantize(x, "e4m3", axis=-1), kq.quantize_reference(x, "e4m3", axis=-1))


def test_pallas_under_jit(rng):
  x = _input(rng, jnp.float32)
  f = jax.jit(functools.partial(kernels.quantize, fmt="e4m3", implementation="pallas",
                                interpret=True))
  _assert_same(f(x), kq.quantize_reference(x, "e4m3"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU default")
def test_interpret_defaults_to_cpu(rng):
  x = _input(rng, jnp.float32, (8, 16))
  _assert_same(kernels.quantize(x, implementation="pallas"), kq.quantize_reference(x))


def test_fallback_to_xla_when_pallas_cannot_compile(rng):
  x = _input(rng, jnp.float32, (8, 16))
  # interpret=False on CPU: Pallas refuses to lower, so the sequence falls through.
  got = kernels.quantize(x, implementation=("pallas", "xla"), interpret=False)
  _assert_same(got, kq.quantize_reference(x))
  if jax.default_backend() != "cpu":
    return  # compiled Pallas runs there: nothing falls through
  with pytest.raises(kernels.KernelUnavailableError, match="pallas: .*interpret"):
    kernels.quantize(x, implementation=("pallas", "pallas"), interpret=False)


@pytest.mark.parametrize("axis", [None, -1])
def test_triton_lowering(axis, cuda_target):
  """The kernels lower to Triton for a CUDA target (no GPU needed to lower)."""
  x = jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16)
  for block in (SMALL_BLOCK, None):
    f = functools.partial(kq.quantize_pallas, fmt="e4m3", per_row=axis is not None,
                          block_shape=block, interpret=False)
    with cuda_target():
      text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (np.ones((4, 4), np.int32), {}, TypeError, "bf16/f16/f32"),
        (np.ones((4, 4), jnp.float8_e4m3fn), {}, TypeError, "bf16/f16/f32"),
        (np.ones((2, 4, 4), np.float32), {}, ValueError, "2-D"),
        (np.ones((0, 4), np.float32), {}, ValueError, "non-empty"),
        (np.ones((4, 4), np.float32), {"axis": 0}, ValueError, "axis"),
        (np.ones((4, 4), np.float32), {"amax": np.ones(3, np.float32), "axis": -1},
         ValueError, "amax must"),
        (np.ones((4, 4), np.float32), {"amax": np.ones(4, np.float32)}, ValueError,
         "amax must"),
        (np.ones((4, 4), np.float32), {"implementation": "cuda"}, ValueError,
         "implementation"),
        (np.ones((4, 4), np.float32), {"implementation": ()}, ValueError, "at least one"),
        (np.ones((4, 4), np.float32), {"block_shape": (16, 48)}, ValueError,
         "powers of two"),
        (np.ones((4, 4), np.float32), {"fmt": "e3m4"}, ValueError, "unsupported FP8"),
    ],
)
def test_bad_input(x, kwargs, error, match):
  with pytest.raises(error, match=match):
    kernels.quantize(x, **kwargs)
