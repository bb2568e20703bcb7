import jax
import jax.numpy as jnp
import numpy as np
import pytest

import falqon_jax
from falqon_jax import fp8
from falqon_jax._melded_kernel import _svd_lora_a
import oracle


def _kernel(rng, shape, dtype=jnp.float32, std=0.05):
  return jnp.asarray(rng.standard_normal(shape) * std, dtype)


def _random_shapes(n=4, seed=7):
  r = np.random.default_rng(seed)
  return [(int(r.integers(1, 7)) * 16, int(r.integers(1, 7)) * 16) for _ in range(n)]


@pytest.mark.parametrize("in_f,out_f", [(64, 96)] + _random_shapes())
def test_svd_init_matches_the_reference(rng, in_f, out_f):
  rank = int(rng.integers(1, min(in_f, out_f) // 2 + 1))
  k = _kernel(rng, (in_f, out_f))
  mk = falqon_jax.meld_kernel(k, rank)
  assert mk.qweight.dtype == jnp.float8_e4m3fn and mk.qweight.shape == (out_f + rank, in_f)
  assert mk.delta.dtype == jnp.float32 and mk.delta.shape == (out_f, rank)
  assert not np.any(np.asarray(mk.delta))
  assert (mk.in_features, mk.out_features, mk.rank, mk.scaling) == (in_f, out_f, rank, "tensor")

  w = np.asarray(k, np.float32).T
  # A = sqrt(S_r) Vh_r of E = W - DQ(Q(W; s(W))), from an independent float64 SVD.
  s0 = oracle.scale(w)
  err = w.astype(np.float64) - oracle.dq(oracle.quantize(w, s0), s0)
  _, sv, vh = np.linalg.svd(err, full_matrices=False)
  a = np.asarray(_svd_lora_a(jnp.asarray(w), rank, "tensor"), np.float64)
  # Up to a per-row sign: A A^T = diag(S_r), and A spans the top-r right singular space.
  np.testing.assert_allclose(a @ a.T, np.diag(sv[:rank]), atol=1e-4 * sv[0])
  proj = a @ vh[:rank].T @ vh[:rank]
  np.testing.assert_allclose(proj, a, atol=1e-4 * np.sqrt(sv[0]))

  # One scale over [W; A]; backbone rows are Q(W; s_W), A rows Q(A; s_W). This f32 A
  # comes from another program than meld_kernel's, so its last bits may differ: in the
  # scale if A holds the amax, and by one e4m3 step where a rounding boundary lies between.
  a32 = np.asarray(jax.jit(_svd_lora_a, static_argnums=(1, 2))(jnp.asarray(w), rank, "tensor"))
  s_w = float(mk.scale)
  np.testing.assert_allclose(s_w, oracle.scale(np.concatenate([w, a32])), rtol=1e-5)
  q = np.asarray(mk.qweight).view(np.uint8)
  np.testing.assert_array_equal(q[:out_f], oracle.quantize(w, s_w).view(np.uint8))
  oracle.assert_fp8_close(np.asarray(mk.qweight)[out_f:], oracle.quantize(a32, s_w))


def test_bf16_kernel_error_taken_in_bf16(rng):
  k = _kernel(rng, (64, 48), jnp.bfloat16)
  mk = falqon_jax.meld_kernel(k, 8)
  w = k.T
  s0 = fp8.compute_scale(w)
  err_bf16 = w - fp8.dequantize(fp8.quantize(w, s0), s0, jnp.bfloat16)
  assert err_bf16.dtype == jnp.bfloat16
  _, sv, _ = np.linalg.svd(np.asarray(err_bf16, np.float64))
  a = mk.lora_a()
  # Dequantized A carries sqrt(S) of the bf16 error, within e4m3 rounding.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=1) ** 2, sv[:8], rtol=0.15)


def test_helpers_dequantize_backbone_and_a(rng):
  k = _kernel(rng, (64, 32))
  mk = falqon_jax.meld_kernel(k, 16)
  back = mk.backbone()
  assert back.shape == (64, 32) and mk.shape == (64, 32)
  np.testing.assert_allclose(np.asarray(back), np.asarray(k), atol=np.abs(k).max() / 16)
  assert mk.backbone(jnp.bfloat16).dtype == jnp.bfloat16
  q = np.asarray(mk.qweight)
  np.testing.assert_allclose(np.asarray(mk.lora_a()), oracle.dq(q[32:], mk.scale), rtol=1e-6)


def test_row_scaling_gives_each_row_its_own_scale(rng):
  k = _kernel(rng, (64, 48)) * jnp.asarray(np.exp(rng.uniform(-6, 6, 48)), jnp.float32)
  mk = falqon_jax.meld_kernel(k, 16, scaling="row")
  assert mk.scale.shape == (64,)
  raw = np.asarray(mk.qweight.astype(jnp.float32))
  # Every row uses its whole range, and the backbone rows are Q(W_i; s_i).
  np.testing.assert_array_equal(np.abs(raw).max(axis=1), 448.0)
  w = np.asarray(k).T
  s_rows = oracle.scale(w, axis=-1)[:, 0]
  np.testing.assert_array_equal(np.asarray(mk.scale[:48]), s_rows)
  np.testing.assert_array_equal(np.asarray(mk.qweight[:48]).view(np.uint8),
                                oracle.quantize(w, s_rows[:, None]).view(np.uint8))
  # Row scaling reconstructs small-magnitude rows far better than one tensor scale.
  def worst_row_rel_err(m):
    err = np.linalg.norm(np.asarray(m.backbone()) - np.asarray(k), axis=0)
    return float((err / np.linalg.norm(np.asarray(k), axis=0)).max())
  assert worst_row_rel_err(mk) < 0.5 * worst_row_rel_err(falqon_jax.meld_kernel(k, 16))


def test_random_init_is_clipped_to_w_range_and_keyed(rng):
  k = _kernel(rng, (64, 32))
  a1 = falqon_jax.meld_kernel(k, 8, init="random", key=jax.random.key(1)).lora_a()
  a2 = falqon_jax.meld_kernel(k, 8, init="random", key=jax.random.key(2)).lora_a()
  assert not np.array_equal(np.asarray(a1), np.asarray(a2))
  assert float(a1.max()) <= float(k.max()) * 1.07 and float(a1.min()) >= float(k.min()) * 1.07


def test_is_a_pytree_with_static_sizes(rng):
  mk = falqon_jax.meld_kernel(_kernel(rng, (32, 32)), 16)
  leaves, treedef = jax.tree_util.tree_flatten(mk)
  assert [l.dtype for l in leaves] == [jnp.float8_e4m3fn, jnp.float32, jnp.float32]
  back = jax.jit(lambda m: m)(mk)
  assert isinstance(back, falqon_jax.MeldedKernel) and back.rank == 16
  with pytest.raises(dataclasses_FrozenInstanceError()):
    mk.rank = 3


def dataclasses_FrozenInstanceError():
  import dataclasses
  return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("kernel,rank,kw,err,msg", [
    (np.zeros((32, 32, 2), np.float32), 4, {}, ValueError, "2-D"),
    (np.ones((32, 32), np.int32), 4, {}, TypeError, "floating"),
    (np.full((32, 32), np.nan, np.float32), 4, {}, ValueError, "NaN or Inf"),
    (np.ones((32, 48), np.float32), 0, {}, ValueError, "rank must be a positive int"),
    (np.ones((32, 48), np.float32), 33, {}, ValueError, r"\[1, 32\]"),
    (np.ones((32, 48), np.float32), 4, {"init": "pca"}, ValueError, "init must be"),
    (np.ones((32, 48), np.float32), 4, {"scaling": "block"}, ValueError, "scaling must be"),
])
def test_bad_input_errors(kernel, rank, kw, err, msg):
  with pytest.raises(err, match=msg):
    falqon_jax.meld_kernel(kernel, rank, **kw)


def test_numpy_integer_rank_is_stored_as_a_python_int(rng):
  k = _kernel(rng, (32, 48))
  mk = falqon_jax.meld_kernel(k, np.int32(8))
  assert type(mk.rank) is int and mk.rank == 8
  # The same static fields, so the same pytree structure as an int rank gives.
  assert jax.tree_util.tree_structure(mk) == jax.tree_util.tree_structure(falqon_jax.meld_kernel(k, 8))
  for bad in (True, np.bool_(True), 8.0):
    with pytest.raises(TypeError, match="rank must be an int"):
      falqon_jax.meld_kernel(k, bad)
