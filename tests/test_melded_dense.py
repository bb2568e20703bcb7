import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src import ad_checkpoint

import falqon_jax
from falqon_jax._melded_dense import _melded_matmul_fwd
import oracle

IN, OUT, RANK, N = 64, 96, 16, 32


def _setup(rng, dtype=jnp.bfloat16, scaling="tensor", shape=(IN, OUT, RANK), lead=(N,)):
  in_f, out_f, rank = shape
  k = jnp.asarray(rng.standard_normal((in_f, out_f)) * 0.05, jnp.float32)
  mk = falqon_jax.meld_kernel(k, rank, scaling=scaling)
  x = jnp.asarray(rng.standard_normal(lead + (in_f,)) * rng.uniform(0.5, 4), dtype)
  return k, mk, x


def _np(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _row_scales(mk):
  s = np.asarray(mk.scale, np.float64)
  return s if s.ndim else np.full(mk.out_features + mk.rank, s)


def _forward_oracle(x, mk):
  """Emulated FP8 GEMM from the same quantized operands, in float64."""
  x2 = np.asarray(jnp.asarray(x).astype(jnp.float32)).reshape(-1, mk.in_features)
  sx = oracle.scale(x2)
  xq = oracle.quantize(x2, sx)
  z = (xq.astype(np.float64) @ np.asarray(mk.qweight).astype(np.float64).T)
  return z / np.float64(sx) / _row_scales(mk), xq, sx


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_forward_is_one_fp8_gemm_giving_y_and_ax(rng, dtype, scaling):
  _, mk, x = _setup(rng, dtype, scaling)
  y = falqon_jax.melded_dense(x, mk)
  assert y.dtype == dtype and y.shape == (N, OUT)
  z, _, _ = _forward_oracle(x, mk)
  tol = 2.0**-8 if dtype == jnp.bfloat16 else 1e-6
  np.testing.assert_allclose(_np(y), z[:, :OUT], rtol=tol, atol=1e-6 * np.abs(z).max())
  # The saved residual is Ax, rounded to x's dtype as the reference saves it.
  y2, (ax, *_) = _melded_matmul_fwd(x, mk.qweight, mk.scale, mk.delta, OUT, scaling, "xla",
                                  False)
  assert ax.dtype == dtype and ax.shape == (N, RANK)
  # Exact: both run eagerly, the same ops one by one on the same inputs.
  np.testing.assert_array_equal(_np(y2), _np(y))
  np.testing.assert_allclose(_np(ax), z[:, OUT:], rtol=tol, atol=1e-6 * np.abs(z).max())


def test_forward_matches_plain_jnp_reference_to_one_bf16_rounding(rng):
  _, mk, x = _setup(rng)
  sx = falqon_jax.fp8.compute_scale(x)
  xq = falqon_jax.fp8.quantize(x, sx)
  inv = (1.0 / sx) * (1.0 / mk.scale)
  acc = jnp.dot(xq.astype(jnp.float32), mk.qweight.astype(jnp.float32).T,
                precision=lax.Precision.HIGHEST)
  ref = _np(acc * inv)[:, :OUT]  # f32, before the one rounding to bf16
  got = _np(falqon_jax.melded_dense(x, mk))
  # Another dot: its f32 sum may differ by IN + 2 roundings of the terms' magnitude. The
  # one bf16 rounding of anything in that interval lies between those of its ends.
  err = (IN + 2) * 2.0**-24 * (np.abs(_np(xq)) @ np.abs(_np(mk.qweight[:OUT])).T) * float(inv)
  lo, hi = (_np(jnp.asarray(ref + e, jnp.float32).astype(jnp.bfloat16)) for e in (-err, err))
  assert np.all((lo <= got) & (got <= hi))
  assert np.mean(lo == hi) > 0.9  # mostly one bf16 value: a second rounding would show


def test_forward_ignores_delta_and_handles_leading_dims_and_bias(rng):
  _, mk, x = _setup(rng, lead=(2, 3, 16))
  y = falqon_jax.melded_dense(x, mk)
  assert y.shape == (2, 3, 16, OUT)
  busy = mk.replace(delta=jnp.asarray(rng.standard_normal(mk.delta.shape), jnp.float32))
  np.testing.assert_array_equal(np.asarray(falqon_jax.melded_dense(x, busy)), np.asarray(y))
  b = jnp.asarray(rng.standard_normal(OUT), jnp.float32)
  yb = falqon_jax.melded_dense(x, mk, bias=b)
  np.testing.assert_array_equal(np.asarray(yb), np.asarray(y + b.astype(y.dtype)))


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_backward_dx_and_ddelta_match_emulated_fp8(rng, scaling):
  k, mk, x = _setup(rng, scaling=scaling)
  g = jnp.asarray(rng.standard_normal((N, OUT)) * rng.uniform(0.1, 3), jnp.bfloat16)
  _, vjp = jax.vjp(falqon_jax.melded_dense, x, mk)
  dx, dmk = vjp(g)
  assert dx.dtype == jnp.bfloat16 and dx.shape == x.shape
  assert isinstance(dmk, falqon_jax.MeldedKernel) and dmk.delta.dtype == jnp.float32
  assert not np.any(np.asarray(dmk.qweight.astype(jnp.float32)))  # no weight gradient
  assert float(dmk.scale.sum()) == 0.0

  s = _row_scales(mk)
  gf = np.asarray(g.astype(jnp.float32))
  # Row scaling folds the backbone row scales into g before quantizing it.
  g_src = gf / s[:OUT] if scaling == "row" else gf
  sg = oracle.scale(g_src, oracle.E5M2)
  gq = oracle.quantize(g_src, sg, oracle.E5M2).astype(np.float64)
  raw = np.asarray(mk.qweight).astype(np.float64)
  w_scale = 1.0 if scaling == "row" else s[0]
  dx_want = (gq @ raw[:OUT]) / np.float64(sg) / w_scale  # backbone rows only
  np.testing.assert_allclose(_np(dx), dx_want, rtol=2.0**-8, atol=2.0**-8 * np.abs(dx_want).max() * 1e-2)

  z, _, _ = _forward_oracle(x, mk)
  ax = np.asarray(jnp.asarray(z[:, OUT:], jnp.bfloat16).astype(jnp.float32))
  s_ax = oracle.scale(ax)
  axq = oracle.quantize(ax, s_ax).astype(np.float64)
  dd_want = (gq.T @ axq) / np.float64(sg) / np.float64(s_ax)
  if scaling == "row":
    dd_want = dd_want * s[:OUT, None]
  np.testing.assert_allclose(_np(dmk.delta), dd_want, rtol=2.0**-7,
                             atol=2.0**-7 * np.abs(dd_want).max() * 1e-2)

  # Loosely, d(delta) approximates the exact LoRA gradient g^T (x A^T) (no alpha/r).
  a = np.asarray(mk.lora_a(), np.float64)
  exact = gf.astype(np.float64).T @ (_np(x) @ a.T)
  cos = np.sum(exact * _np(dmk.delta)) / np.linalg.norm(exact) / np.linalg.norm(_np(dmk.delta))
  assert cos > 0.99


def test_gradient_reaches_delta_only_through_jit_grad(rng):
  _, mk, x = _setup(rng, dtype=jnp.float32)
  loss = lambda mk: jnp.mean(falqon_jax.melded_dense(x, mk) ** 2)
  g = jax.jit(jax.grad(loss))(mk)
  assert float(jnp.abs(g.delta).sum()) > 0
  assert not np.any(np.asarray(g.qweight.astype(jnp.float32))) and float(g.scale) == 0.0


def test_only_ax_is_saved_for_backward(rng):
  _, mk, x = _setup(rng)
  saved = ad_checkpoint.saved_residuals(falqon_jax.melded_dense, x, mk)
  produced = [aval for aval, src in saved if "argument" not in src]
  assert [(a.shape, a.dtype) for a in produced] == [((N, RANK), jnp.bfloat16)]
  # Under remat the same holds: nothing of size N x in survives the forward.
  remat = jax.checkpoint(falqon_jax.melded_dense)
  saved = ad_checkpoint.saved_residuals(remat, x, mk)
  assert all(a.shape != (N, IN) for a, src in saved if "argument" not in src)


def _dots(compiled_text):
  return re.findall(r"= (\w+)\[([\d,]*)\][^=]*? dot\(", compiled_text)


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="XLA CPU keeps dots as dots; tests/test_gpu.py counts cuBLASLt calls")
def test_compiled_hlo_has_one_forward_and_two_backward_fp8_dots(rng):
  _, mk, x = _setup(rng)
  fwd = jax.jit(falqon_jax.melded_dense).lower(x, mk)
  assert len(_dots(fwd.compile().as_text())) == 1
  loss = lambda x, mk: jnp.sum(falqon_jax.melded_dense(x, mk).astype(jnp.float32) ** 2)
  both = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, mk)
  shapes = sorted(tuple(int(d) for d in s.split(",")) for _, s in _dots(both.compile().as_text()))
  # forward [y|Ax], dx, d(delta); no (in, out)-shaped weight gradient.
  assert shapes == sorted([(N, OUT + RANK), (N, IN), (OUT, RANK)])
  # Before optimization: all three are FP8 x FP8, TN, DEFAULT forward / HIGHEST backward.
  stable = [l for l in both.as_text().splitlines() if "stablehlo.dot_general" in l]
  assert len(stable) == 3
  for line in stable:
    assert "contracting_dims = [1] x [1]" in line
    operands = re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)\)", line).groups()
    assert all("f8E" in t for t in operands), line
  assert sum("precision = [DEFAULT, DEFAULT]" in l for l in stable) == 1
  assert sum("precision = [HIGHEST, HIGHEST]" in l for l in stable) == 2


@pytest.mark.parametrize("seed", range(3))
def test_randomized_shapes(seed):
  r = np.random.default_rng(100 + seed)
  in_f, out_f = (int(r.integers(1, 6)) * 16 for _ in range(2))
  rank = int(r.integers(1, min(in_f, out_f) + 1))
  _, mk, x = _setup(r, shape=(in_f, out_f, rank), lead=(int(r.integers(1, 5)), 8))
  y, vjp = jax.vjp(falqon_jax.melded_dense, x, mk)
  dx, dmk = vjp(jnp.ones_like(y))
  z, _, _ = _forward_oracle(x, mk)
  assert oracle.rel_err(_np(y).reshape(-1, out_f), z[:, :out_f]) < 2.0**-8
  assert dx.shape == x.shape and dmk.delta.shape == (out_f, rank)
  assert np.all(np.isfinite(_np(dmk.delta)))


def test_bad_input_errors(rng):
  _, mk, x = _setup(rng)
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
    falqon_jax.melded_dense(x[:, :32], mk)
  with pytest.raises(TypeError, match="bf16, f16 or f32"):
    falqon_jax.melded_dense(x.astype(jnp.int32), mk)
  with pytest.raises(TypeError, match="needs a MeldedKernel"):
    falqon_jax.melded_dense(x, jnp.ones((64, 96)))


def test_pallas_quantization_gives_the_same_bits(rng):
  _, mk, x = _setup(rng, scaling="row")
  g = jnp.asarray(rng.standard_normal((N, OUT)), jnp.bfloat16)
  results = []
  for impl in ("xla", "pallas", ("pallas", "xla")):
    f = lambda x, mk: falqon_jax.melded_dense(x, mk, implementation=impl)
    y, vjp = jax.vjp(f, x, mk)
    dx, dmk = vjp(g)
    results.append([np.asarray(a).tobytes() for a in (y, dx, dmk.delta)])
  # Exact: quantizing is exact by construction (max, one correctly rounded divide and
  # multiply, a round-to-nearest cast), and the GEMMs are the same eager ops on equal bytes.
  assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("lead, scaling", [((0,), "tensor"), ((2, 0), "row")])
def test_empty_batch_gives_empty_output_and_zero_delta_gradient(rng, implementation, lead, scaling):
  _, mk, x = _setup(rng, scaling=scaling, lead=lead)
  bias = jnp.ones(OUT, jnp.float32)
  f = lambda x, mk: falqon_jax.melded_dense(x, mk, bias, implementation=implementation)
  y, vjp = jax.vjp(f, x, mk)
  assert y.shape == lead + (OUT,) and y.dtype == x.dtype
  dx, dmk = vjp(jnp.ones_like(y))
  assert dx.shape == x.shape and dx.dtype == x.dtype
  # A sum over no rows: exactly zero.
  assert dmk.delta.shape == (OUT, RANK) and not np.any(np.asarray(dmk.delta))
  g = jax.jit(jax.grad(lambda mk: jnp.sum(f(x, mk).astype(jnp.float32))))(mk)
  assert not np.any(np.asarray(g.delta))


def _live(rng, scaling="tensor"):
  """A live-delta kernel with a nonzero ΔBuffer (what waits between merges)."""
  k, mk, x = _setup(rng, scaling=scaling)
  live = falqon_jax.meld_kernel(k, RANK, scaling=scaling, live_delta=True)
  delta = jnp.asarray(rng.standard_normal((OUT, RANK)) * 0.02, jnp.float32)
  return live.replace(delta=delta), mk.replace(delta=delta), x


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_live_delta_forward_is_w_plus_ba(rng, scaling):
  """y = x (W + BA)ᵀ: the fused GEMM's y plus (Ax) Bᵀ, one rounding to bf16."""
  live, plain, x = _live(rng, scaling)
  assert live.live_delta and not plain.live_delta
  z, _, _ = _forward_oracle(x, live)
  ax = _np(jnp.asarray(z[:, OUT:], jnp.bfloat16))  # Ax as the forward keeps it
  delta_bf16 = _np(live.delta.astype(jnp.bfloat16))
  want = z[:, :OUT] + ax @ delta_bf16.T
  got = _np(falqon_jax.melded_dense(x, live))
  # One bf16 rounding of the f32 sum (2^-8 relative), plus f32 accumulation noise.
  np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=1e-5 * np.abs(want).max())
  # The delta's share is far above that tolerance: a forward that ignored it would fail.
  assert np.abs(ax @ delta_bf16.T).max() > 50 * 2.0**-8 * np.abs(want).max() / 8
  assert np.abs(_np(falqon_jax.melded_dense(x, plain)) - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_live_delta_backward_dx_is_g_times_w_plus_ba(rng, scaling):
  """dx = e5m2([g | gB]) . [W; A] and d(delta) = gᵀ e4m3(Ax), against float64."""
  live, _, x = _live(rng, scaling)
  g = jnp.asarray(rng.standard_normal((N, OUT)) * rng.uniform(0.1, 3), jnp.bfloat16)
  _, vjp = jax.vjp(falqon_jax.melded_dense, x, live)
  dx, dmk = vjp(g)
  s = _row_scales(live)
  gf = np.asarray(g.astype(jnp.float32))
  gb = _np(jnp.dot(g, live.delta.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
           .astype(jnp.bfloat16))
  g_ext = np.concatenate([gf, gb], axis=1)
  g_src = g_ext / s if scaling == "row" else g_ext
  sg = oracle.scale(g_src, oracle.E5M2)
  gq = oracle.quantize(g_src, sg, oracle.E5M2).astype(np.float64)
  raw = np.asarray(live.qweight).astype(np.float64)
  w_scale = 1.0 if scaling == "row" else s[0]
  dx_want = (gq @ raw) / np.float64(sg) / w_scale  # every melded row: W and A
  np.testing.assert_allclose(_np(dx), dx_want, rtol=2.0**-8,
                             atol=2.0**-8 * np.abs(dx_want).max() * 1e-2)
  # And loosely the exact gradient through W + BA (e5m2 keeps 2 mantissa bits of g).
  w = np.asarray(live.backbone(), np.float64).T
  exact = gf.astype(np.float64) @ (w + _np(live.delta) @ np.asarray(live.lora_a(), np.float64))
  assert np.linalg.norm(_np(dx) - exact) < 0.1 * np.linalg.norm(exact)
  z, _, _ = _forward_oracle(x, live)
  ax = np.asarray(jnp.asarray(z[:, OUT:], jnp.bfloat16).astype(jnp.float32))
  s_ax = oracle.scale(ax)
  axq = oracle.quantize(ax, s_ax).astype(np.float64)
  dd_want = (gq[:, :OUT].T @ axq) / np.float64(sg) / np.float64(s_ax)
  if scaling == "row":
    dd_want = dd_want * s[:OUT, None]
  np.testing.assert_allclose(_np(dmk.delta), dd_want, rtol=2.0**-7,
                             atol=2.0**-7 * np.abs(dd_want).max() * 1e-2)


def test_live_delta_with_zero_delta_matches_the_reference_forward_and_backward(rng):
  """Right after a full merge the ΔBuffer is zero: live or not, the same layer."""
  k, plain, x = _setup(rng)
  live = falqon_jax.meld_kernel(k, RANK, live_delta=True)
  g = jnp.asarray(rng.standard_normal((N, OUT)), jnp.bfloat16)
  outs = []
  for mk in (plain, live):
    y, vjp = jax.vjp(falqon_jax.melded_dense, x, mk)
    dx, dmk = vjp(g)
    outs.append((_np(y), _np(dx), _np(dmk.delta)))
  # Two programs, zero terms added: within one bf16 rounding of each other.
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, rtol=2.0**-8, atol=1e-6 * np.abs(a).max())


def test_live_delta_compiled_hlo_adds_only_thin_dots(rng):
  """Forward: the fused FP8 GEMM plus one (N x r x out) dot. Backward: one FP8 dx GEMM
  contracting over out + r, the FP8 d(delta) GEMM, and one (N x out x r) dot for gB."""
  live, _, x = _live(rng)
  fwd = jax.jit(falqon_jax.melded_dense).lower(x, live).compile().as_text()
  bwd = jax.jit(lambda x, mk: jax.grad(
      lambda x, d: jnp.sum(falqon_jax.melded_dense(x, mk.replace(delta=d)).astype(jnp.float32)),
      argnums=(0, 1))(x, mk.delta)).lower(x, live).compile().as_text()
  dots = lambda text: re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} dot\(", text)
  assert sorted(dots(fwd)) == sorted([f"{N},{OUT + RANK}", f"{N},{OUT}"])
  # (The forward's thin dot is dead here: the loss's cotangent does not need y.)
  assert sorted(dots(bwd)) == sorted(
      [f"{N},{OUT + RANK}", f"{N},{RANK}", f"{N},{IN}", f"{OUT},{RANK}"])
