"""What only a GPU can show (skipped elsewhere).

The rest of the suite runs on a GPU too; these add the checks the CPU cannot make: the
cuBLASLt FP8 GEMMs in the compiled HLO, tensor-core FP8 numerics against the emulated
CPU path, the Pallas kernels compiled by Triton (not interpreted) against their
references (the quantizer bit for bit, the merge up to its f32 update's last bits), and
the merges writing in place. ``benchmarks/gpu_session.sh check`` runs this file first.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import falqon_jax
from falqon_jax import fp8, kernels
from falqon_jax.kernels import fp8_quantize as kq
from falqon_jax.kernels import row_merge as km
import oracle

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a GPU (jax.default_backend() is not 'gpu')")

FP8_CALL = "__cublas$lt$matmul$f8"
IN, OUT, RANK, N = 512, 384, 64, 256  # multiples of 16, as cuBLASLt FP8 wants
ROWS, COLS = 1000, 1537  # ragged against every Pallas block


def _bits(a):
  return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))


def _f64(a):
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _on_cpu(fn, *args):
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS=cuda leaves no CPU backend
    pytest.skip("no CPU backend to compare with (unset JAX_PLATFORMS)")
  return jax.jit(fn)(*jax.device_put(args, cpu))


def _melded(rng, scaling="tensor"):
  w = jnp.asarray(rng.standard_normal((IN, OUT)) * 0.05, jnp.float32)
  mk = falqon_jax.meld_kernel(w, RANK, scaling=scaling)
  delta = jnp.asarray(rng.standard_normal((OUT, RANK)) * 1e-3, jnp.float32)
  return dataclasses.replace(mk, delta=delta)


def _fwd_bwd(x, mk, g):
  y, vjp = jax.vjp(falqon_jax.melded_dense, x, mk)
  dx, dmk = vjp(g)
  return y, dx, dmk.delta


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_melded_linear_is_three_cublaslt_fp8_gemms_matching_the_cpu(rng, scaling):
  mk = _melded(rng, scaling)
  x = jnp.asarray(rng.standard_normal((N, IN)) * 2.0, jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal((N, OUT)), jnp.bfloat16)
  compiled = jax.jit(_fwd_bwd).lower(x, mk, g).compile()
  text = compiled.as_text()
  # [y | Ax] forward, dx = e5m2(g) W, dB = g^T e4m3(Ax): all three on FP8 tensor cores,
  # and no GEMM of another precision beside them.
  assert text.count(FP8_CALL) == 3, text
  assert not re.search(r'custom_call_target="__cublas\$(gemm|lt\$matmul)"', text)
  got = compiled(x, mk, g)
  # Near full precision: the quantization error of an FP8 GEMM, no more.
  y64 = _f64(x) @ np.asarray(falqon_jax.MeldedKernel.backbone(mk), np.float64)
  assert oracle.rel_err(_f64(got[0]), y64) < 0.08
  want = _on_cpu(_fwd_bwd, x, mk, g)  # the same math, FP8 emulated, exact f32 sums
  for a, b in zip(got, want):
    assert oracle.rel_err(_f64(a), _f64(b)) < 2.0**-7


def test_train_step_keeps_every_gemm_fp8_and_learns():
  import optax
  from flax import nnx
  from falqon_jax import models, train
  from falqon_jax import nnx as fnnx

  lm = models.CausalLM(models.tiny_config("llama"), rngs=nnx.Rngs(0))
  report = fnnx.meld(lm, rank=16)
  model, params = models.split(lm)
  tx = falqon_jax.proxy_update(optax.adam(3e-2), falqon_jax.REFERENCE)
  state = train.TrainState.create(params, tx)
  batch = train.example_batch(jax.random.key(1), batch_size=4, seq_len=32, vocab=256)
  step = jax.jit(train.make_train_step(model, tx, remat=True), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  layers = len(report.melded)
  # Per melded linear: the forward, its remat recompute, dx and dB.
  assert compiled.as_text().count(FP8_CALL) >= 3 * layers
  losses = []
  for _ in range(30):
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("axis", [None, -1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_quantize_compiled_by_triton_is_bit_exact(rng, fmt, axis, dtype):
  x = rng.standard_normal((ROWS, COLS)) * np.exp(rng.uniform(-4, 4, (ROWS, 1)))
  x[7] = 0.0  # an all-zero row
  x = jnp.asarray(x, dtype)
  for amax in (None, "half"):  # a known amax below the true one saturates
    a = None
    if amax:
      a = 0.5 * jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=axis is not None)
    got = kernels.quantize(x, fmt, axis=axis, amax=a, implementation="pallas", interpret=False)
    want = kq.quantize_reference(x, fmt, axis=axis, amax=a)
    np.testing.assert_array_equal(_bits(got[0]), _bits(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("scaling", ["tensor", "row"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_pallas_merge_compiled_by_triton_matches_and_is_in_place(rng, scaling, rounding):
  out, rank, n, k = ROWS, 64, COLS, 37
  w = rng.standard_normal((out + rank, n)) * np.exp(rng.uniform(-3, 3, (out + rank, 1)))
  w[3] = 0.0
  w = jnp.asarray(w, jnp.float32)
  scale = fp8.compute_scale(w, axis=-1 if scaling == "row" else None)
  qweight = fp8.quantize(w, scale)
  scale = scale[:, 0] if scaling == "row" else scale
  delta = jnp.asarray(rng.standard_normal((out, rank)) * 10.0, jnp.float32)  # saturates
  rows = kernels.select_rows(delta, k)
  key = jax.random.key(2)
  opts = dict(out_features=out, scaling=scaling, rounding=rounding)
  want = jax.jit(lambda *a: km.merge_reference(*a, **opts))(qweight, scale, delta, rows, key)
  pallas = jax.jit(lambda *a: km.merge_pallas(*a, **opts), donate_argnums=0)
  compiled = pallas.lower(qweight, scale, delta, rows, key).compile()
  mem = compiled.memory_analysis()
  assert mem.alias_size_in_bytes >= qweight.size  # the output is the donated weight
  assert mem.temp_size_in_bytes < qweight.size  # k rows' f32 math, not one weight copy
  got = compiled(jnp.copy(qweight), scale, delta, rows, key)
  # The update dot is XLA's in both, but in two programs (fused or tiled otherwise): its
  # last bits may differ, so an element may round one e4m3 step away, and a shrunk row
  # scale differ by an ulp per rounding (the rank-term sum, the divide, the multiply).
  oracle.assert_fp8_close(got[0], want[0])
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=(rank + 2) * 2.0**-23)
  changed = np.nonzero((_bits(got[0]) != _bits(qweight)).any(axis=1))[0]
  assert set(changed) <= set(np.asarray(rows).tolist())


def test_xla_merge_scatters_in_place():
  rng = np.random.default_rng(0)
  mk = _melded(rng)
  merge = jax.jit(lambda m: falqon_jax.merge_top_k(m, 64), donate_argnums=0)
  compiled = merge.lower(mk).compile()
  mem = compiled.memory_analysis()
  assert mem.alias_size_in_bytes >= mk.qweight.size
  # Temp: the reset delta and the k rows' f32 math, nothing weight-sized.
  assert mem.temp_size_in_bytes <= 2 * 4 * mk.delta.size + 3 * 64 * IN * 4
  before = _bits(mk.qweight)
  pointer = mk.qweight.unsafe_buffer_pointer()
  new = compiled(mk)
  assert new.qweight.unsafe_buffer_pointer() == pointer  # the very same device buffer
  assert ((_bits(new.qweight) != before).any(axis=1)).sum() <= 64


def test_cudnn_attention_is_flash_attention_matching_xla():
  # attention="cudnn" reaches cuDNN's fused attention (a custom call in the HLO) and gives
  # XLA's logits up to bf16 rounding (bf16 logits: 2^-8 relative, summed over a few layers).
  from flax import nnx
  from falqon_jax import models

  cfg = models.tiny_config("mistral", sliding_window=8, max_position_embeddings=64)
  ids = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
  mask = jnp.ones((2, 32), jnp.int32).at[1, 20:].set(0)
  out = {}
  for impl in ("xla", "cudnn"):
    model, params = models.split(models.CausalLM(cfg, dtype=jnp.bfloat16, attention=impl,
                                                 rngs=nnx.Rngs(0)))
    fn = jax.jit(model.apply)
    if impl == "cudnn":
      assert "cudnn$fmha" in fn.lower(params, ids, mask).compile().as_text()
    out[impl] = np.asarray(fn(params, ids, mask), np.float32)
  scale = np.abs(out["xla"]).max()
  np.testing.assert_allclose(out["cudnn"][0], out["xla"][0], atol=3e-2 * scale)
  np.testing.assert_allclose(out["cudnn"][1, :20], out["xla"][1, :20], atol=3e-2 * scale)
