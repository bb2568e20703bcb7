"""falqon_jax.kernels.merge_rows: the Pallas kernel (interpret mode) against its reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from falqon_jax import fp8, kernels
from falqon_jax.kernels import row_merge as km
import oracle

OUT, RANK, IN, K = 37, 5, 70, 11  # ragged against the (4, 32) block: 3 x 3 grid steps
BLOCK = (4, 32)


def _bits(q):
  return np.asarray(jax.lax.bitcast_convert_type(q, jnp.uint8))


def _case(rng, scaling, delta_scale=1.0):
  """A melded weight with zero rows, -0 codes and rows that saturate, plus delta and rows."""
  w = rng.standard_normal((OUT + RANK, IN)).astype(np.float32)
  w *= np.exp(rng.uniform(-3, 3, size=(OUT + RANK, 1))).astype(np.float32)
  w[2] = 0.0  # an all-zero backbone row
  w[4, :6] = -1e-30  # rounds to -0 under either scaling
  w = jnp.asarray(w)
  if scaling == "row":
    scale = fp8.compute_scale(w, axis=-1)
    qweight, scale = fp8.quantize(w, scale), scale[:, 0]
  else:
    scale = fp8.compute_scale(w)
    qweight = fp8.quantize(w, scale)
  delta = rng.standard_normal((OUT, RANK)).astype(np.float32) * delta_scale
  delta[2] = 0.0  # selected below, with an all-zero update
  # Rows 4 (-0 codes) and 2 (zero row, zero update) first, then row 0 (the index a
  # careless padding would reuse), then random distinct rows.
  rest = [r for r in rng.permutation(OUT) if r not in (0, 2, 4)]
  rows = jnp.asarray([4, 2, 0, *rest][:K], jnp.int32)
  return qweight, scale, jnp.asarray(delta), rows


def _assert_same(got, want):
  """The same bytes and scales: for the same XLA code run again on the same inputs."""
  np.testing.assert_array_equal(_bits(got[0]), _bits(want[0]))
  np.testing.assert_array_equal(np.asarray(got[1]).view(np.uint32),
                                np.asarray(want[1]).view(np.uint32))


def _assert_close(got, want):
  """The kernel against the reference. Both take the update ``delta[rows] @ A`` from the
  same XLA dot, but in another program, so its last bits may differ: an element may then
  round one e4m3 step away, and a shrunk row scale differ by an ulp per rounding (the
  RANK-term sum, the divide and the multiply that form it)."""
  oracle.assert_fp8_close(got[0], want[0])
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]),
                             rtol=(RANK + 2) * 2.0**-23)


@pytest.mark.parametrize(
    "scaling, rounding, active",
    [
        ("tensor", "nearest", None),
        ("tensor", "stochastic", None),
        ("row", "nearest", None),
        ("row", "stochastic", None),
        ("tensor", "stochastic", 4),  # active masking, with padded block rows
        ("row", "nearest", 4),
    ],
)
def test_pallas_matches_reference(rng, scaling, rounding, active):
  # Large updates: tensor-scaled rows clip at ±448, row-scaled rows shrink their scale.
  qweight, scale, delta, rows = _case(rng, scaling, delta_scale=40.0)
  key = jax.random.key(3) if rounding == "stochastic" else None
  act = None if active is None else jnp.int32(active)
  want = km.merge_reference(qweight, scale, delta, rows, key, act, out_features=OUT,
                            scaling=scaling, rounding=rounding)
  # BLOCK: 3 x 3 ragged steps; (16, 128): rows padded past k (16 > K), one column step.
  block = BLOCK if active is None else (16, 128)
  got = kernels.merge_rows(qweight, scale, delta, rows, out_features=OUT, scaling=scaling,
                           rounding=rounding, key=key, active=act, implementation="pallas",
                           interpret=True, block_shape=block)
  _assert_close(got, want)
  changed = (_bits(got[0]) != _bits(qweight)).any(axis=1)
  assert not changed[np.setdiff1d(np.arange(OUT + RANK), rows)].any()  # no other byte
  live = np.asarray(rows)[: K if active is None else active]
  assert changed[live].sum() >= len(live) - 1  # delta[2] is zero: row 2 may stay as is

  if scaling == "tensor":
    assert (np.abs(np.asarray(got[0][live].astype(jnp.float32))) == 448.0).any()
  else:
    assert (np.asarray(got[1])[live] < np.asarray(scale)[live]).any()


@pytest.mark.parametrize("scaling, rounding, active",
                         [("tensor", "nearest", None), ("row", "stochastic", None),
                          ("row", "nearest", 6)])
def test_non_finite_delta_rows_keep_their_bytes(rng, scaling, rounding, active):
  qweight, scale, delta, rows = _case(rng, scaling, delta_scale=40.0)
  r = np.asarray(rows)
  delta = delta.at[r[0], 1].set(jnp.nan).at[r[5], 0].set(-jnp.inf)
  key = jax.random.key(5) if rounding == "stochastic" else None
  act = None if active is None else jnp.int32(active)
  opts = dict(out_features=OUT, scaling=scaling, rounding=rounding)
  want = km.merge_reference(qweight, scale, delta, rows, key, act, **opts)
  got = kernels.merge_rows(qweight, scale, delta, rows, key=key, active=act,
                           implementation="pallas", interpret=True, block_shape=BLOCK, **opts)
  _assert_close(got, want)
  q = _bits(got[0])
  np.testing.assert_array_equal(q[r[[0, 5]]], _bits(qweight)[r[[0, 5]]])
  np.testing.assert_array_equal(np.broadcast_to(np.asarray(got[1]), (OUT + RANK,))[r[[0, 5]]],
                                np.broadcast_to(np.asarray(scale), (OUT + RANK,))[r[[0, 5]]])
  assert np.isfinite(np.asarray(got[0].astype(jnp.float32))).all()
  # The other live rows still merge (r[1] = row 2 has a zero update).
  live = r[[2, 3, 4] + list(range(6, K if active is None else active))]
  assert (q[live] != _bits(qweight)[live]).any(axis=1).all()


def test_default_block_and_untouched_inactive(rng):
  """The default (one-step) block; with active=0 the rows come back as the reference has them."""
  qweight, scale, delta, rows = _case(rng, "tensor")
  for act in (None, jnp.int32(0)):
    want = km.merge_reference(qweight, scale, delta, rows, None, act, out_features=OUT)
    got = kernels.merge_rows(qweight, scale, delta, rows, out_features=OUT, active=act,
                             implementation="pallas")
    _assert_close(got, want)


def test_in_place_under_jit_with_donation(rng):
  qweight, scale, delta, rows = _case(rng, "tensor")
  want = km.merge_reference(qweight, scale, delta, rows, out_features=OUT)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(q, s, d):
    r = kernels.select_rows(d, K)  # traced rows: no range check inside jit
    return kernels.merge_rows(q, s, d, r, out_features=OUT, implementation="pallas",
                              block_shape=(16, 128))[0]

  compiled = step.lower(qweight, scale, delta).compile()
  assert compiled.memory_analysis().alias_size_in_bytes >= qweight.size  # qweight aliased
  rows_top = kernels.select_rows(delta, K)
  want = km.merge_reference(qweight, scale, delta, rows_top, out_features=OUT)
  oracle.assert_fp8_close(step(jnp.array(qweight), scale, delta), want[0])


def test_xla_default_and_fallback(rng):
  qweight, scale, delta, rows = _case(rng, "row")
  want = km.merge_reference(qweight, scale, delta, rows, out_features=OUT, scaling="row")
  _assert_same(kernels.merge_rows(qweight, scale, delta, rows, out_features=OUT,
                                  scaling="row"), want)
  got = kernels.merge_rows(qweight, scale, delta, rows, out_features=OUT, scaling="row",
                           implementation=("pallas", "xla"), interpret=False)
  _assert_close(got, want)
  if jax.default_backend() != "cpu":
    return  # compiled Pallas runs there: nothing falls through
  with pytest.raises(kernels.KernelUnavailableError, match="merge_rows"):
    kernels.merge_rows(qweight, scale, delta, rows, out_features=OUT,
                       implementation=["pallas", "pallas"], interpret=False, scaling="row")


@pytest.mark.parametrize("scaling, rounding", [("tensor", "stochastic"), ("row", "nearest")])
def test_triton_lowering(scaling, rounding, cuda_target):
  """The kernel lowers to Triton for a CUDA target (no GPU needed to lower)."""
  sds = jax.ShapeDtypeStruct
  args = (sds((OUT + RANK, IN), jnp.float8_e4m3fn),
          sds((OUT + RANK,) if scaling == "row" else (), jnp.float32),
          sds((OUT, RANK), jnp.float32), sds((K,), jnp.int32), jax.random.key(0),
          sds((), jnp.int32))
  f = functools.partial(km.merge_pallas, out_features=OUT, scaling=scaling,
                        rounding=rounding, block_shape=BLOCK, interpret=False)
  with cuda_target():
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text.lower()


def _bad(rng, **change):
  qweight, scale, delta, rows = _case(rng, "tensor")
  args = dict(qweight=qweight, scale=scale, delta=delta, rows=rows, out_features=OUT)
  args.update(change)
  return args


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(qweight=np.zeros((OUT + RANK, IN), np.float32)), TypeError, "float8_e4m3fn"),
        (dict(qweight=jnp.zeros((OUT + RANK, IN), jnp.float8_e5m2)), TypeError,
         "float8_e4m3fn"),
        (dict(delta=jnp.zeros((OUT, RANK + 1))), ValueError, "delta must have shape"),
        (dict(delta=jnp.zeros((OUT, RANK), jnp.int32)), TypeError, "floating"),
        (dict(scale=jnp.ones((OUT + RANK,))), ValueError, "scale must be float32"),
        (dict(scale=jnp.ones((), jnp.bfloat16)), ValueError, "scale must be float32"),
        (dict(rows=jnp.arange(OUT + 1)), ValueError, "k = len"),
        (dict(rows=jnp.array([0, OUT])), ValueError, r"rows must lie in \[0, 37\)"),
        (dict(rows=jnp.array([-1, 3])), ValueError, "rows must lie"),
        (dict(rows=jnp.array([3, 3])), ValueError, "distinct"),
        (dict(rows=jnp.array([1.0, 2.0])), TypeError, "integer"),
        (dict(out_features=OUT + RANK), ValueError, "out_features"),
        (dict(out_features=True), ValueError, "out_features"),
        (dict(out_features=float(OUT)), ValueError, "out_features"),
        (dict(rounding="stochastic"), ValueError, "needs key"),
        (dict(rounding="up"), ValueError, "rounding"),
        (dict(scaling="col"), ValueError, "scaling"),
        (dict(active=jnp.ones(2, jnp.int32)), TypeError, "active"),
        (dict(implementation="triton"), ValueError, "implementation"),
    ],
)
def test_bad_input(rng, change, error, match):
  with pytest.raises(error, match=match):
    kernels.merge_rows(**_bad(rng, **change))


def test_select_rows_checks_k(rng):
  delta = jnp.asarray(rng.standard_normal((OUT, RANK)), jnp.float32)
  np.testing.assert_array_equal(kernels.select_rows(delta, 3),
                                jax.lax.top_k(jnp.abs(delta).sum(1), 3)[1])
  for k in (0, OUT + 1, 2.0, True):
    with pytest.raises(ValueError, match="k must be an int"):
      kernels.select_rows(delta, k)
  np.testing.assert_array_equal(kernels.select_rows(delta, np.int64(3)),
                                kernels.select_rows(delta, 3))


def test_numpy_integer_out_features(rng):
  qweight, scale, delta, rows = _case(rng, "tensor")
  want = kernels.merge_rows(qweight, scale, delta, rows, out_features=OUT)
  got = kernels.merge_rows(qweight, scale, delta, rows, out_features=np.int64(OUT),
                           implementation="pallas")
  _assert_close(got, want)
